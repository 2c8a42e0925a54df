"""`vlm-bench run --endpoint URL --model NAME`: the run's workload against an OpenAI-compatible server
(bench.serve.client), written as a results directory like an in-process run's."""
from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

from bench.analysis.console import NARROW
from bench.cli import PROG
from bench.errors import ArgumentParser, UsageError, check_seed, clipped, path_problem
from bench.measure.results import printable


MAX_PROMPTS = 100_000  # measured requests per point: their bodies are made before the first is sent


def wants_endpoint(argv: list[str]) -> bool:
    return any(a == "--endpoint" or a.startswith("--endpoint=") for a in argv)


def parser(prog: str = f"{PROG} run") -> ArgumentParser:
    ap = ArgumentParser(prog=f"{prog} --endpoint", description="Measure an OpenAI-compatible server on the run's "
                        "workload (streamed chat completions with the image as a data: URL).")
    ap.add_argument("--endpoint", required=True, help="the server's OpenAI API base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True, help="the model name the server serves (its /v1/models id)")
    ap.add_argument("--concurrency", default="1", help="requests in flight at most; a list sweeps it, e.g. 1,4,16 "
                    "(default: 1)")
    ap.add_argument("--request-rate", default="inf", help="mean request arrivals per second (seeded Poisson), inf: "
                    "all at once; a list sweeps it, e.g. 2,8,inf (default: inf)")
    ap.add_argument("--num-prompts", type=int, default=None, help="measured requests per point (default: 10)")
    ap.add_argument("--duration", type=float, default=None, help="seconds each point sends requests for, instead "
                    "of --num-prompts (at rate inf: a new request whenever a concurrency slot frees; default: none)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before each point, one at a time "
                    "(default: 2, as in-process runs: after one, a served llava-1.5-7b still met a cold first "
                    "request)")
    ap.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", default="128",
                    help="max_tokens of each request; a list sweeps it (default: 128)")
    ap.add_argument("--prompt-lengths", default=None, help="question lengths in tokens to sweep, e.g. 16,128,512 "
                    "(questions are repeated or cut to length, counted with --tokenizer; default: as written)")
    ap.add_argument("--tokenizer", default=None, help="a local directory with the served model's tokenizer files "
                    "(tokenizer.json or tokenizer.model with its config), which --prompt-lengths counts tokens "
                    "with (required by it; default: none)")
    ap.add_argument("--num-images", default="1", help="images per prompt (the image, then flips/rotations of it, "
                    "one image_url part each); a list sweeps it (default: 1)")
    ap.add_argument("--image-path", default=None, help="image file (default: the demo image)")
    ap.add_argument("--text-prompt", default=None, help="the question (default: the built-in list)")
    ap.add_argument("--questions", default=None, help="file with one question per line")
    ap.add_argument("--prefix", choices=("shared", "distinct"), default="shared",
                    help="shared: every request shows the same image (a prefix cache can reuse it); distinct: "
                         "each request a different image (default: shared)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default: 0)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default: 600.0)")
    ap.add_argument("--max-cv", type=float, default=0.10, help="summary validity: largest coefficient of variation (default: 0.1)")
    ap.add_argument("--slo", default=None, help="goodput: bounds a request must meet, e.g. ttft_ms=500,tpot_ms=50 "
                    f"(any of {', '.join(SLO_METRICS)}; default: none)")
    ap.add_argument("--output-dir", default=None, help="results directory, new or empty (default: results/local/...)")
    ap.add_argument("--wide", action="store_true", help="console summary with every column at the terminal's width "
                    f"(otherwise the key columns in {NARROW} columns; the CSV files hold everything either way)")
    return ap


SLO_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "itl_p99_ms")


def _slo(text: str | None) -> dict | None:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if name not in SLO_METRICS or not bound > 0:
            raise UsageError(f"--slo takes name=bound pairs of {', '.join(SLO_METRICS)} with positive bounds, "
                             f"got {text!r}")
        out[name] = bound
    return out


def _rates(text: str) -> list[float]:
    out = []
    for x in text.split(","):
        x = x.strip()
        try:
            v = math.inf if x == "inf" else float(x)
        except ValueError:
            v = -1.0
        if not v > 0:
            raise UsageError(f"--request-rate takes positive numbers or inf, got {text!r}")
        out.append(v)
    return list(dict.fromkeys(out))


def _check_url(url: str) -> None:
    """An http(s) URL with a host and a valid port (what the server is reached at is checked by
    the run, bench.serve.client.check_server)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port past 65535 or not a number, or a bracketed IPv6 host left open
        parts, port_ok = urlsplit(""), False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise UsageError(f"--endpoint {url!r}: give an http:// or https:// URL with a host (and a port from 1 to "
                         "65535), e.g. http://127.0.0.1:8000/v1")
    if parts.query or parts.fragment or url.strip() != url:  # paths are appended to it: BASE/chat/completions
        raise UsageError(f"--endpoint {url!r}: give the API's base URL alone (no ?query, #fragment or surrounding "
                         "space), e.g. http://127.0.0.1:8000/v1")
    if parts.username is not None or parts.password is not None:  # env.json and runs.csv keep the URL
        raise UsageError("--endpoint holds a user name or password, which the results files would keep; give the "
                         "URL without them and the API key in OPENAI_API_KEY")


def main(argv: list[str], prog: str = f"{PROG} run") -> int:
    from bench.measure.results import check_output_dir
    from bench.run.config import DEMO_IMAGE
    from bench.run.questions import load_questions
    from bench.run.workload import int_list

    try:
        ns = parser(prog).parse_args(argv)
        from bench.cli.serve import need_serve_extra

        need_serve_extra()
        from bench.models.visual import check_image_file
        from bench.run.summary import ValidityRule
        from bench.serve import client, endpoint_run

        _check_url(ns.endpoint)
        if not ns.model.strip():
            raise UsageError("--model is empty; give the model id the server serves (its /v1/models id)")
        if ns.duration is not None and ns.num_prompts is not None:
            raise UsageError("give --duration (send for that long) or --num-prompts (send that many), not both")
        ns.num_prompts = 10 if ns.num_prompts is None else ns.num_prompts
        for flag, what in (("image_path", "an image file"), ("questions", "a file"), ("output_dir", "a directory")):
            value = getattr(ns, flag)  # empty is a mistake, not the default (the demo image, results/local)
            if value is not None and not value.strip():
                raise UsageError(f"--{flag.replace('_', '-')} is empty; give {what} or leave the flag out")
        if ns.tokenizer is not None:  # local inputs are checked before the server is asked anything
            problem = path_problem(ns.tokenizer, "directory") if ns.tokenizer.strip() else "empty"
            if problem:
                raise UsageError(f"--tokenizer {ns.tokenizer}: {problem}; give the served model's tokenizer folder")
        if ns.output_dir is not None:  # written anew: endpoint mode neither appends nor resumes
            check_output_dir(Path(ns.output_dir), "fresh")
        from bench.run.config import MAX_WARMUP

        if not 1 <= ns.num_prompts <= MAX_PROMPTS:
            raise UsageError(f"--num-prompts must be between 1 and {MAX_PROMPTS:,} (requests made up front), "
                             f"got {ns.num_prompts}")
        if not 0 <= ns.warmup <= MAX_WARMUP:
            raise UsageError(f"--warmup must be between 0 and {MAX_WARMUP} warm-up requests, got {ns.warmup}")
        check_seed(ns.seed)  # the range an in-process run takes
        for flag, value in (("--duration", ns.duration), ("--timeout", ns.timeout)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} must be a positive, finite number of seconds, got {value}")
        ValidityRule(ns.num_prompts, 0.0, ns.max_cv)  # --max-cv as summaries check it
        api_key = os.environ.get("OPENAI_API_KEY")
        if api_key is not None:
            api_key = api_key.strip()  # a key read from a file keeps its line end
            if not api_key.isprintable():
                raise UsageError("OPENAI_API_KEY holds control characters; give the key alone")
        image = str(DEMO_IMAGE) if ns.image_path is None else ns.image_path
        check_image_file(image, "--image-path")
        points = [client.Point(c, r) for c in int_list(ns.concurrency, "--concurrency")
                  for r in _rates(ns.request_rate)]
        cfg = endpoint_run.EndpointConfig(
            ns.endpoint, ns.model, points, ns.num_prompts, int_list(ns.new_tokens, "--max-new-tokens"), image,
            load_questions(ns.questions, ns.text_prompt), ns.prefix == "distinct", ns.warmup, ns.seed,
            None if ns.output_dir is None else Path(ns.output_dir), ns.timeout, ns.max_cv, api_key or None,
            _slo(ns.slo), ns.duration, int_list(ns.prompt_lengths, "--prompt-lengths"),
            int_list(ns.num_images, "--num-images"), ns.tokenizer)
        import signal

        from bench.run.interrupt import signals_interrupt

        # SIGTERM (a CI job's timeout) stops it as Ctrl-C does (Ctrl-C: asyncio's own handling)
        with signals_interrupt((signal.SIGTERM,)):
            out, rows, summary = endpoint_run.run(cfg, shlex.join([*prog.split(), *argv]))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # endpoint_run.Interrupted once the run has a directory
        out, n = getattr(e, "out", None), getattr(e, "rows", 0)
        where = ("nothing measured was kept" if out is None else
                 f"no request had finished; {out} holds no row" if not n else
                 f"the rows of the {n} requests that finished (the last point's without its rates) and their "
                 f"summary are in {out}")
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    from bench.analysis.console import print_summary

    measured = [r for r in rows if r["kind"] == "measured"]
    ok = [r for r in measured if r["status"] == "ok"]
    # as the server states it (vlm-bench serve does: bench.serve.client.served_identity), else "served"
    print_summary(summary, out, rows[0]["weights"] if rows else "served", wide=ns.wide)
    print(f"{len(ok)}/{len(measured)} measured requests ok")
    if not ok:  # as an in-process run that measured nothing says it
        failed = next((r for r in measured if r.get("error")), None)
        first = printable(failed["error"]) if failed else ""  # one line, as runs.csv has it (a proxy's HTML page)
        why = f" (the first: {clipped(first, 200)})" if first else ""
        print(f"error: nothing measured: every request failed{why}; the errors are in {out / 'runs.csv'}",
              file=sys.stderr)
        return 3
    return 1 if len(ok) < len(measured) else 0
