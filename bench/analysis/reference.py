"""Reference runs (results/reference/<gpu>/<model>-<scenario>/): their MANIFEST, written from the
run's own env.json, and docs/findings.md, written from their MANIFESTs and summary.csv files.

A MANIFEST is `key: value` lines. `date`, `command`, `gpu` and `weights` come from env.json;
`commit` is the code that ran (given, because a run made from a copy of the tree can record
another sha in env.json: `env_git_sha` then says which); `shows` is the one line a person writes,
what the run is evidence of.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd

from bench.errors import UsageError
from bench.measure.schema import POINT_DEFAULTS, point_label

REFERENCE_ROOT = Path("results/reference")
REQUIRED_FIELDS = ("date", "commit", "gpu", "weights", "command", "shows")


def manifest_fields(run_dir: Path, commit: str, shows: str) -> dict[str, str]:
    """The MANIFEST of the results directory `run_dir` (which holds env.json)."""
    env_path = run_dir / "env.json"
    if not env_path.is_file():
        raise UsageError(f"{run_dir}: no env.json (not a results directory)")
    env = json.loads(env_path.read_text())
    if not commit.strip() or not shows.strip():
        raise UsageError("a MANIFEST needs the commit that ran and what the run shows")
    run_id = str(env.get("run_id", ""))
    if len(run_id) < 8 or not run_id[:8].isdigit():
        raise UsageError(f"{env_path}: run_id {run_id!r} does not start with the run's date (YYYYMMDD)")
    recorded = _argv(env.get("command"))
    if not recorded:
        raise UsageError(f"{env_path}: no command recorded")
    argv = ["python", *recorded] if recorded[0].endswith(".py") else recorded
    fields = {
        "date": f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}",
        "commit": commit.strip(),
        "gpu": (f"{env.get('gpu_name') or env.get('cpu') or env.get('device')} (driver {env.get('driver')}), "
                f"torch {env.get('torch')}, transformers {env.get('transformers')}"),
        "weights": str(env.get("weights", "")),
    }
    if env.get("server"):  # an endpoint run: the client's machine; the server's model is its own
        fields["gpu"] = (f"served by {env['server']} (its GPU: see shows); client {env.get('cpu')}, "
                         f"torch {env.get('torch')}")
        served = env.get("served") if isinstance(env.get("served"), dict) else {}
        fields["weights"] = f"{served['weights']} (the server's)" if served.get("weights") else "the server's"
    fields |= {
        "command": shlex.join(argv),
        "shows": " ".join(shows.split()),
    }
    resumed = [r for r in env.get("resumed") or [] if isinstance(r, dict) and r.get("at")]
    if resumed:  # finished by later processes (`run --resume`) after the first stopped
        fields["resumed"] = (f"{len(resumed)} time{'s' if len(resumed) > 1 else ''} with the command above plus "
                             "--resume (or as shown), at "
                             + ", ".join(str(r["at"]) + ("" if _argv(r.get("command")) == [*recorded, "--resume"] else
                                                         f" ({shlex.join(_argv(r.get('command')))})") for r in resumed))
    sha = str(env.get("git_sha", ""))
    if sha and not sha.startswith(commit.strip()) and not commit.strip().startswith(sha):
        fields["env_git_sha"] = f"{sha[:7]} (env.json's record; the code that ran is the commit above)"
    return fields


def _argv(command) -> list[str]:
    """An env.json command (a string, or a list from older versions) as argv."""
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def processes(run_dir: Path) -> list[int] | None:
    """The runs.csv row (0-based, in file order) each process that wrote `run_dir` began at: [0]
    for a run written by one process, then one per `--resume` that added rows (runs.csv is only
    appended to). None where a resume's first row was not recorded (written before it was)."""
    env_path = Path(run_dir) / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    records = [env, *((env.get("runs") or {}).values())]  # --append: each run's own record too
    resumed = [r for rec in records if isinstance(rec, dict) for r in rec.get("resumed") or [] if isinstance(r, dict)]
    if any(not isinstance(r.get("first_row"), int) for r in resumed):
        return None
    return [0, *sorted({r["first_row"] for r in resumed})]


def process_of(starts: list[int], row: int) -> int:
    """The index in `starts` (processes()) of the process that wrote runs.csv's row `row`."""
    return sum(1 for s in starts[1:] if s <= row)


def write_manifest(run_dir: Path, commit: str, shows: str) -> Path:
    path = Path(run_dir) / "MANIFEST"
    fields = manifest_fields(Path(run_dir), commit, shows)
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def read_manifest(run_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (Path(run_dir) / "MANIFEST").read_text().splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def reference_dirs(root: Path = REFERENCE_ROOT) -> list[Path]:
    """Every reference run: root/<gpu>/<model>-<scenario>/."""
    return sorted(p for p in Path(root).glob("*/*") if p.is_dir())


# The findings table: a few metrics' medians per result (docs/findings.md).
FINDING_METRICS = {"ttft_ms": "TTFT ms", "prefill_ms": "prefill ms", "vision_ms": "vision ms",
                   "tpot_ms": "TPOT ms", "peak_alloc_mb": "peak MiB", "token_agree": "token agree",
                   "engine_kl_mean": "engine KL"}


def _fmt(v) -> str:
    if v is None or pd.isna(v):
        return "-"
    v = float(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _text(v) -> str:
    return "-" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


def findings_table(summary: pd.DataFrame) -> str:
    """One row per (model, variant, engine, cache state, dtype, device, workload point): medians;
    valid = TTFT and TPOT valid, else the rows' status where they did not run (skipped, failed)."""
    summary = summary.copy()
    points = [c for c in POINT_DEFAULTS if c in summary]
    cells = summary[points].astype(object)
    summary["point"] = [point_label(r) for r in cells.where(cells.notna(), None).to_dict("records")] if points else "-"
    key = ["model", "variant", "engine", "cache_state", "dtype", "device", "point"]
    head = ["model", "variant", "cache", "point", "dtype", "device", *FINDING_METRICS.values(), "valid"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, g in summary.groupby(key, sort=False, dropna=False):
        row = dict(zip(key, k))
        med = dict(zip(g["metric"], g["median"]))
        valid = g[g["metric"].isin(["ttft_ms", "tpot_ms"])]["valid"].astype(str).str.lower()
        status = set(g["status"].dropna()) - {"ok"} if "status" in g else set()
        verdict = "yes" if len(valid) and (valid == "true").all() else ", ".join(sorted(status)) or "no"
        cells = [*(_text(row[c]) for c in ("model", "variant", "cache_state", "point", "dtype", "device")),
                 *(_fmt(med.get(m)) for m in FINDING_METRICS), verdict]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


FINDINGS_HEADER = """# Findings

Measured results, newest first, each named by date and the commit whose code ran. Every section is
generated from a reference run under `results/reference/<gpu>/<model>-<scenario>/` (its MANIFEST
and `summary.csv`) by `python scripts/write_docs.py`; nothing here is typed by hand, and a test
fails when this file is not what the reference runs give.

Presets have **random weights**: timings are real (shapes decide time); generated text is
meaningless, so `token agree` and `engine KL` (against the fp16 baseline on the `hf` engine, KL
teacher-forced through the variant's own engine) measure numeric fidelity only. Values are
medians over the measured runs; `valid` says whether TTFT and TPOT had enough runs and a
coefficient of variation under the run's `--max-cv`. Column definitions:
[results/README.md](../results/README.md).

<!-- generated by python scripts/write_docs.py from results/reference; do not edit -->
"""


def render_findings(root: Path = REFERENCE_ROOT, link_prefix: str = "../") -> str:
    sections = []
    for d in reference_dirs(root):
        m = read_manifest(d)
        summary = pd.read_csv(d / "summary.csv")
        rel = REFERENCE_ROOT / d.parent.name / d.name
        sections.append((m["date"], m["commit"], (
            f"## {m['date']}, commit {m['commit']}: {d.name} on {d.parent.name}\n\n"
            f"{m['shows']}\n\n"
            f"- run: [`{rel.as_posix()}/`]({link_prefix}{rel.as_posix()}/) ({m['gpu']}; weights {m['weights']})\n"
            f"- command: `{m['command']}`\n\n"
            + findings_table(summary) + "\n")))
    sections.sort(key=lambda s: (s[0], s[1]), reverse=True)
    return FINDINGS_HEADER + "\n" + "\n".join(s[2] for s in sections)
