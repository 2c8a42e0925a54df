"""`vlm-bench serve` on loopback with tiny-vila on the CPU, driven by the official openai client and by
`vlm-bench run --endpoint`; the server is a real subprocess (one for the module)."""
import base64
import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT

MODEL = "tiny-vila"
SERVE = ["--preset", MODEL, "--device", "cpu", "--variants", "prefix", "--max-new-tokens", "8", "--max-batch", "4",
         "--batch-window-ms", "20", "--cpu-threads", "1", "--max-request-mb", "1"]
LIMIT = 1 << 20  # --max-request-mb 1, in bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(args: list[str], log):
    """`vlm-bench serve ARGS` on a free loopback port, once /health answers: {url, port, proc, log};
    killed on leaving however the test ends."""
    port = _free_port()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "serve", *args, "--port", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield {"url": url, "port": port, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process, stopped at the end of the module however its tests end."""
    with _serving(SERVE, tmp_path_factory.mktemp("serve") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def image_url():
    from bench.run.config import DEMO_IMAGE

    return "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()


def _messages(question, image_url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def _requests(url: str, status: str) -> float:
    """vlm-bench serve's count of requests by outcome (cancelled: their clients went away before they
    finished; invalid: refused)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vlm_requests_total" and s.labels.get("status") == status)


def test_openai_client_streamed_and_not_match_the_in_process_engine(server, client, image_url):
    from bench.models.visual import VisualInput, load_image
    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.loading import load_engine, model_source

    question = "What is in the picture?"
    assert [m.id for m in client.models.list().data] == [MODEL]
    whole = client.chat.completions.create(model=MODEL, messages=_messages(question, image_url), max_tokens=8)
    text = whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=_messages(question, image_url), max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and chunks[-1].usage.completion_tokens == 8
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # token by token, not one blob
    # where the time went on the server (`timings`, on the response and on the last chunk with choices)
    for timings in (whole.timings, next(c for c in chunks if c.choices and c.choices[0].finish_reason).timings):
        phases = [timings[f"{p}_ms"] for p in ("preprocess", "lookup", "restore", "vision", "prefill")]
        assert min(phases) >= 0 and timings["prefill_ms"] > 0 and timings["queue_ms"] >= 0 <= timings["store_ms"]
        assert sum(phases) + timings["queue_ms"] < timings["ttft_ms"]  # the engine's part of the server's TTFT
    # the image and system prompt were seen before: the second request's prefix came from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

    cfg = config_class()(preset=MODEL, device="cpu", variants="prefix", cpu_threads=1)
    engine, _, _ = load_engine(cfg, model_source(cfg))
    visual = VisualInput((load_image(DEMO_IMAGE),), encoded=(DEMO_IMAGE.read_bytes(),))
    order, store = [], engine.policy.store_prefix
    engine.policy.store_prefix = lambda *a: (order.append("store"), store(*a))[1]
    engine.token_hook = lambda tokens: order.append("token")
    cold = engine.adapter.decode(engine.run(visual, question, 8).tokens)
    assert order[:2] == ["token", "store"]  # a cold request's first token goes out before its prefix is stored
    engine.policy.clear()
    order.clear()
    engine.run_batch([(visual, question), (visual, "And the colours?")], 2)  # one prefix both rows miss on
    assert order[:2] == ["token", "store"]
    engine.token_hook = None
    warm = engine.adapter.decode(engine.run(visual, question, 8).tokens)
    assert text in (cold, warm)  # greedy: the in-process engine's text, cache miss or hit as on the server
    seen = []
    engine.token_hook = seen.append  # what the server streams from: every position as it is generated
    tokens = engine.run(visual, question, 8).tokens
    assert [row[0] for row in seen] == tokens and engine.adapter.decode(tokens) == warm


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _data_url(buf.getvalue())


def test_an_image_past_the_pixel_limit_is_a_400_and_no_warning_on_the_servers_stderr(server, client, tmp_path):
    """An image between PIL's limit and twice it (PIL warns, two lines, on opening it): refused with
    its size and the limit, and the server's log holds no warning of PIL's."""
    from PIL import Image

    from tests.test_bad_inputs import png_header

    bomb = png_header(tmp_path / "bomb.png", 10_000, 10_000).read_bytes()  # 1e8 pixels: a header, a few bytes
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_messages("What?", _data_url(bomb)), max_tokens=2)
    assert (f"(10000x10000 = 100,000,000 pixels) is too large to decode safely; send at most "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels") in str(e.value)
    assert "DecompressionBombWarning" not in server["log"].read_text()


def test_an_image_sent_again_in_the_same_bytes_is_not_decoded_again(server, client):
    from PIL import Image

    image = Image.new("RGB", (40, 30), (12, 200, 7))
    image.putpixel((3, 4), (0, 0, 255))
    first, same_pixels = _png_url(image), _png_url(image.convert("RGBA"))  # other bytes, same picture
    hits, misses = (_metric(server["url"], f"vlm_image_cache_{k}_total") for k in ("hits", "misses"))
    answers = [client.chat.completions.create(model=MODEL, messages=_messages("Colour?", url), max_tokens=4)
               .choices[0].message.content for url in (first, first, same_pixels)]
    assert _metric(server["url"], "vlm_image_cache_hits_total") - hits == 1
    assert _metric(server["url"], "vlm_image_cache_misses_total") - misses == 2
    assert answers[0] == answers[1] == answers[2]  # the kept image is the one decoding gives


def test_a_streamed_text_holds_back_a_character_split_over_byte_tokens(tiny_vila_dir):
    """Byte-fallback tokens: a character whose bytes are not all there yet is held back, not sent
    as U+FFFD (after which nothing more was sent); the deltas add up to the decoded whole, and a
    character cut off at the end goes out as the unstreamed text has it."""
    from transformers import AutoTokenizer

    from bench.serve.app import TextStream

    tok = AutoTokenizer.from_pretrained(tiny_vila_dir / "llm")

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    for text in ("Café é naïve", "I like 😀 and 日本語 too"):
        ids = tok.encode(text, add_special_tokens=False)
        assert any("\ufffd" in decode(ids[:k]) for k in range(1, len(ids))), "no split character to test"
        for cut in (len(ids), len(ids) - 1):
            stream = TextStream(decode)
            deltas = [stream.add(i) for i in ids[:cut]]
            assert not any("\ufffd" in d for d in deltas)
            assert "".join(deltas) + stream.rest() == decode(ids[:cut])
        assert decode(ids).strip() == text


def test_decoded_images_keep_what_fits_and_count_lookups():
    from PIL import Image

    from bench.serve.image_cache import DecodedImages

    looked, decoded = [], []

    def decode(data):
        decoded.append(data)
        return Image.new("RGB", (512, 512) if data == b"big" else (8, 8))

    cache = DecodedImages(0.5, looked.append)  # 512 KiB: an 8x8 image fits, a 512x512 one (768 KiB) does not
    a = cache.get_or_decode(b"small", decode)
    assert cache.get_or_decode(b"small", decode) is a
    cache.get_or_decode(b"big", decode)
    cache.get_or_decode(b"big", decode)
    assert decoded == [b"small", b"big", b"big"] and looked == [False, True, False, False]


def _malformed_pngs() -> dict[str, bytes]:
    """PNGs whose decoding raises other than UnidentifiedImageError/OSError: a text chunk that
    inflates past PIL's limit (ValueError) and an IDAT chunk of the wrong length (SyntaxError)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info, text = PngInfo(), io.BytesIO()
    info.add_text("k", "v" * 10_000_000, zip=True)
    Image.new("RGB", (8, 8)).save(text, "PNG", pnginfo=info)
    broken = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(broken, "PNG")
    data = bytearray(broken.getvalue())
    assert data[37:41] == b"IDAT"
    data[36] -= 43  # the IDAT chunk's length
    return {"text chunk": text.getvalue(), "chunk length": bytes(data)}


def test_a_malformed_request_gets_a_400_counted_once_and_the_next_one_succeeds(server, client, image_url):
    url = f"{server['url']}/v1/chat/completions"
    before = _requests(server["url"], "invalid")
    refused = 0
    for body in (b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"max_tokens": ' + b"9" * 5000 + b"}"):
        r = httpx.post(url, content=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert "not valid JSON" in r.json()["error"]["message"]
        refused += 1
    bad_parts = [*({"type": "image_url", "image_url": {"url": _data_url(png)}} for png in _malformed_pngs().values()),
                 {"type": "image_url", "image_url": {"url": "/tmp/" + "a" * 5000}},
                 {"type": "image_url", "image_url": {"url": str(ROOT)}},  # a folder
                 {"type": "text", "text": 5}, {"type": "text", "text": "\ud800"}]  # a lone surrogate: no character
    said = []
    for part in bad_parts:
        body = {"model": MODEL, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi?"}]}]}
        r = httpx.post(url, content=json.dumps(body).encode(), timeout=30)  # ASCII JSON: \ud800 as its escape
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]", r.text
        said.append(r.json()["error"]["message"])
        refused += 1
    assert any(m.startswith("a directory, not a file on the server") for m in said), said
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_messages("Hi?", image_url), temperature=0.7)
    assert "greedy" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "no image"}])
    with pytest.raises(openai.BadRequestError) as e:  # 4,096 new tokens after the prompt: past tiny-vila's positions
        client.chat.completions.create(model=MODEL, messages=_messages("Hi?", image_url), max_tokens=4096)
    assert "positions" in str(e.value)
    refused += 3
    assert _requests(server["url"], "invalid") == before + refused  # each refusal once
    ok = client.chat.completions.create(model=MODEL, messages=_messages("Hi?", image_url), max_tokens=3)
    assert ok.usage.completion_tokens == 3
    body = {"model": MODEL, "messages": _messages("Hi?", image_url), "max_completion_tokens": None, "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=60).json()["usage"]["completion_tokens"] == 2


def test_a_requests_images_together_are_held_to_a_pixel_budget(monkeypatch):
    """Each image within the one-image limit, yet together past the request's budget: a 400
    naming the first image past it, found decoded or not (small compressible images in a body
    within --max-request-mb could otherwise make the server decode tens of GB)."""
    from PIL import Image

    from bench.serve import protocol
    from bench.serve.image_cache import DecodedImages

    monkeypatch.setattr(protocol, "REQUEST_PIXELS", 3 * 64 * 64)
    url = _png_url(Image.new("L", (64, 64), 128))

    def body(n):
        parts = [{"type": "image_url", "image_url": {"url": url}}] * n
        return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Hi?"}]}]}

    cache = DecodedImages(64)
    for decoded, blocking in ((None, True), (cache, True), (cache, False)):  # (cache, False): all found decoded
        assert len(protocol.parse_chat(body(3), 4, 64, decoded=decoded, blocking=blocking).visual.images) == 3
        with pytest.raises(protocol.ApiError, match="more than 12,288 pixels together") as e:
            protocol.parse_chat(body(4), 4, 64, decoded=decoded, blocking=blocking)
        assert e.value.param == "messages[0].content[3]" and e.value.status == 400


def test_a_video_that_cannot_be_decoded_is_refused_in_the_clients_terms():
    """Not in run's (--video-path) nor with the server's temporary file's name."""
    from bench.serve.protocol import ApiError, parse_chat

    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"\0" * 64).decode()}}
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi?"}]}]}, 4, 64)
    assert str(e.value).startswith("the video cannot be decoded (") and e.value.param == "messages[0].content[0]"
    assert "--video-path" not in str(e.value) and "/tmp" not in str(e.value) and ".mp4" not in str(e.value)


def _too_large(r: httpx.Response, declared: int | None = None):
    error = r.json()["error"]
    assert r.status_code == 413 and r.headers["connection"] == "close", r.text
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert f"limit of {LIMIT:,} bytes" in error["message"]
    assert declared is None or f"({declared:,} bytes)" in error["message"]


def test_a_body_past_the_limit_gets_a_413_before_it_is_read_whole(server, client, image_url):
    import h11

    before = _requests(server["url"], "invalid")
    # a Content-Length past the limit: answered from the headers, with only the body's first bytes sent
    declared, conn = 1 << 30, h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as s:
        s.sendall(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[
            ("host", "127.0.0.1"), ("content-type", "application/json"), ("content-length", str(declared))])))
        s.sendall(conn.send(h11.Data(data=b"{" + b" " * 1023)))
        events = []
        while not events or not isinstance(events[-1], (h11.EndOfMessage, h11.ConnectionClosed)):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(s.recv(65536))
            else:
                events.append(event)
    head, data = events[0], b"".join(e.data for e in events if isinstance(e, h11.Data))
    _too_large(httpx.Response(head.status_code, headers=head.headers, content=data), declared)

    # a chunked body that would not end (64 MiB): refused once past the limit, the connection closed and
    # the upload stopped
    sent = 0

    def chunks(cap=64 * LIMIT):
        nonlocal sent
        while sent < cap:
            sent += 65536
            yield b" " * 65536

    _too_large(httpx.post(f"{server['url']}/v1/chat/completions", content=chunks(), timeout=30))
    assert sent < 32 * LIMIT  # what the sockets' buffers hold past the limit, not the whole 64 MiB
    assert _requests(server["url"], "invalid") == before + 2

    # under the limit: 0.9 MiB (of a system message, which the model is not shown) is served
    system = {"role": "system", "content": "x" * (9 * LIMIT // 10)}
    ok = client.chat.completions.create(model=MODEL, messages=[system, *_messages("Hi?", image_url)], max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client, image_url):
    before = _requests(server["url"], "cancelled")
    body = {"model": MODEL, "max_tokens": 400, "stream": True, "messages": _messages("Go on.", image_url)}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body, timeout=30) as r:
        chunks = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))
        assert next(c for c in chunks if c["choices"][0]["delta"].get("content"))  # the engine is generating
    # closed with most of the 400 tokens to come: the engine stops at its next token
    deadline = time.monotonic() + 30
    while _requests(server["url"], "cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _requests(server["url"], "cancelled") == before + 1
    ok = client.chat.completions.create(model=MODEL, messages=_messages("And now?", image_url), max_tokens=2)
    assert ok.usage.completion_tokens == 2 and server["proc"].poll() is None


def test_a_client_that_leaves_before_its_body_is_read_leaves_no_traceback(server, client, image_url):
    body = json.dumps({"model": MODEL, "max_tokens": 2, "messages": _messages("Hi.", image_url)}).encode()
    with socket.create_connection(("127.0.0.1", server["port"])) as s:  # half the body, then gone
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:len(body) // 2])
        time.sleep(0.2)
    ok = client.chat.completions.create(model=MODEL, messages=_messages("And now?", image_url), max_tokens=2)
    assert ok.usage.completion_tokens == 2 and server["proc"].poll() is None
    log = server["log"].read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-2000:]


def test_endpoint_mode_sweeps_concurrency_and_rate_into_runs_csv(server, tmp_path, capsys):
    import pandas as pd

    from bench.cli import main

    out = tmp_path / "endpoint"
    code = main(["run", "--endpoint", server["url"] + "/v1", "--model", MODEL, "--concurrency", "1,4",
                 "--request-rate", "50,inf", "--num-prompts", "4", "--max-new-tokens", "4", "--slo", "ttft_ms=1e9",
                 "--output-dir", str(out)])
    assert code == 0
    # the end-of-run table: one line per point, the client's and the server's TTFT, no in-process columns
    printed = capsys.readouterr().out
    # the server states what it runs (its /v1/models entry)
    assert f"median per request: model {MODEL}, device cpu, weights=random" in printed
    lines = {v: next(line for line in printed.splitlines() if line.startswith(v + " "))
             for v in ("c1 r50", "c1 rinf", "c4 r50", "c4 rinf")}
    assert all(" endpoint " in line for line in lines.values())
    assert "server" in printed and "req/s" in printed and "MB" not in printed and "agree" not in printed
    assert "16/16 measured requests ok" in printed and "results in " in printed
    runs = pd.read_csv(out / "runs.csv")
    measured = runs[runs["kind"] == "measured"]
    assert len(measured) == 16 and set(measured["status"]) == {"ok"} and set(runs["engine"]) == {"endpoint"}
    # what the server runs, from its /v1/models entry: the identity columns an in-process row has
    identity = runs[["model", "family", "weights", "device", "dtype"]].drop_duplicates().to_dict("records")
    assert identity == [{"model": MODEL, "family": "vila", "weights": "random", "device": "cpu", "dtype": "float32"}]
    assert sorted(set(measured["variant"])) == ["c1 r50", "c1 rinf", "c4 r50", "c4 rinf"]
    assert set(runs["engine_detail"]) == {"served prefix on the hf engine"}
    assert sorted(set(measured["concurrency"])) == [1, 4]
    assert (measured["output_tokens"] == 4).all() and (measured["new_tokens"] == 4).all()
    assert (measured["ttft_ms"] > 0).all() and (measured["ttft_ms"] < measured["e2e_ms"]).all()
    assert (measured["tpot_ms"] > 0).all() and measured["itl_p50_ms"].notna().all()
    # one shared image: after each point's warm-up every request reuses the server's cached prefix
    assert (measured["server_prefix_hit_rate"] == 1.0).all()
    assert measured["cache_hit"].all() and (measured["cached_tokens"] > 0).all()  # the server's usage says so
    # each request's own server TTFT and engine phases (the response's timings): part of the client's TTFT
    assert (measured["server_ttft_ms"] > 0).all() and (measured["server_ttft_ms"] < measured["ttft_ms"]).all()
    phases = measured[[f"{p}_ms" for p in ("preprocess", "lookup", "restore", "vision", "prefill")]]
    assert phases.notna().all().all() and (measured["prefill_ms"] > 0).all() and measured["store_ms"].notna().all()
    assert (phases.sum(axis=1) < measured["server_ttft_ms"]).all()
    # and the server's own pieces of it: disjoint intervals, so with the phases before the first
    # token they add up to at most the server's TTFT
    parts = measured[["server_intake_ms", "server_queue_ms", "server_handoff_ms"]]
    assert parts.notna().all().all() and (parts >= 0).all().all() and (measured["server_handoff_ms"] > 0).all()
    before_first = phases.sum(axis=1)  # preprocess ... prefill
    assert (before_first + parts.sum(axis=1) <= measured["server_ttft_ms"] + 1e-3).all()
    # the point's mean from /metrics: its own column, one value per point, never summarized as requests
    assert (measured.groupby("variant")["server_mean_ttft_ms"].nunique() == 1).all()
    assert measured["server_ttft_ms"].nunique() > 1
    assert measured["server"].str.contains("uvicorn").all()
    assert measured["slo_met"].all() and (measured["goodput_rps"] > 0).all()  # a bound every request meets
    # the point's throughput: one value per point (every request met the SLO: goodput is all of it);
    # with 4 in flight more requests per second than one request's own rate
    per_point = measured.groupby("variant")[["point_rps", "goodput_rps", "point_output_tok_s"]].agg(["nunique", "first"])
    assert (per_point[("point_rps", "nunique")] == 1).all()
    assert per_point[("point_rps", "first")].tolist() == pytest.approx(per_point[("goodput_rps", "first")].tolist(),
                                                                      rel=1e-4)  # (6 significant digits in CSV)
    assert per_point[("point_output_tok_s", "first")].tolist() == pytest.approx(
        (4 * per_point[("point_rps", "first")]).tolist(), rel=1e-4)
    c4 = measured[measured["variant"] == "c4 rinf"]
    assert c4["point_rps"].iloc[0] > c4["requests_per_s"].median()
    summary = pd.read_csv(out / "summary.csv")
    ttft = summary[summary["metric"] == "ttft_ms"]
    assert len(ttft) == 4 and (ttft["n"] == 4).all()
    assert "server_ttft_ms" in set(summary["metric"]) and "server_mean_ttft_ms" not in set(summary["metric"])
    rps = summary[summary["metric"] == "point_rps"]  # one measurement per point, not 4 samples of it
    assert len(rps) == 4 and (rps["n"] == 1).all()
    assert main(["compare", str(out), str(out), "--metrics", "point_rps"]) == 2  # 1 sample a side: inconclusive
    env = json.loads((out / "env.json").read_text())
    assert env["engine"] == "endpoint" and "uvicorn" in env["server"] and env["client_event_loop"] == "uvloop"
    assert env["served"] == {"model": MODEL, "family": "vila", "weights": "random", "variant": "prefix",
                             "engine": "hf", "device": "cpu", "dtype": "float32"}
    assert main(["summarize", str(out)]) == 0  # the results directory is an ordinary one

    distinct = tmp_path / "distinct"  # for a second, two requests in flight, each with an image never sent before
    assert main(["run", "--endpoint", server["url"] + "/v1", "--model", MODEL, "--prefix", "distinct",
                 "--duration", "1", "--concurrency", "2", "--max-new-tokens", "2", "--num-images", "1,2",
                 "--output-dir", str(distinct)]) == 0
    rows = pd.read_csv(distinct / "runs.csv")
    measured = rows[rows["kind"] == "measured"]
    assert len(measured) >= 4 and (measured["status"] == "ok").all() and set(measured["num_images"]) == {1, 2}
    assert (measured["server_prefix_hit_rate"] == 0.0).all()
    assert not measured["cache_hit"].any() and (measured["cached_tokens"] == 0).all()
    summary = pd.read_csv(distinct / "summary.csv")  # a point's rate: one value over its requests, as many
    assert summary.query("metric == 'point_rps'")["valid"].all()

    brief = tmp_path / "brief"  # a point too short for the fewest requests a summary needs
    assert main(["run", "--endpoint", server["url"] + "/v1", "--model", MODEL, "--duration", "0.05",
                 "--max-new-tokens", "2", "--output-dir", str(brief)]) == 0
    ttft = pd.read_csv(brief / "summary.csv").query("metric == 'ttft_ms'")
    assert (ttft["n"] < 10).all() and ttft["invalid_reason"].str.contains("requests < --duration's minimum of 10").all()
    before = ttft["invalid_reason"].tolist()
    assert main(["summarize", str(brief)]) == 0  # rebuilt from env.json's config: the same reasons
    assert pd.read_csv(brief / "summary.csv").query("metric == 'ttft_ms'")["invalid_reason"].tolist() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_endpoint_run_keeps_the_requests_its_last_point_finished(server, tmp_path, sig):
    """Ctrl-C or SIGTERM in the middle of a point: the requests that ended have their rows and a
    summary, nothing is printed but the one line; exit 130."""
    import pandas as pd

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--endpoint", server["url"] + "/v1", "--model",
                             MODEL, "--num-prompts", "100000", "--max-new-tokens", "2", "--warmup", "0",
                             "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    before, deadline = _requests(server["url"], "ok"), time.monotonic() + 120
    while _requests(server["url"], "ok") < before + 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "requests that finished" in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err, err[-2000:]
    finished = int(re.search(r"the rows of the (\d+) requests", err).group(1))
    rows = pd.read_csv(out / "runs.csv")
    assert len(rows) == finished >= 5 and (rows["kind"] == "measured").all() and (rows["status"] == "ok").all()
    assert sorted(rows["run_index"]) == list(range(len(rows)))  # the first ones sent, each once
    assert pd.read_csv(out / "summary.csv").query("metric == 'ttft_ms'")["n"].item() == len(rows)


def test_a_second_signal_while_the_finished_requests_are_written_loses_none(server, tmp_path, monkeypatch, capsys):
    """SIGTERM stops a point; another comes while its finished requests' rows are being written
    (`timeout` signals the command and then its process group): every finished request keeps
    its row. The second signal used to stop the writing, a run of 1000 finished requests keeping
    one row."""
    import asyncio
    import os

    from bench.cli import main
    from bench.measure.results import read_runs
    from bench.serve import endpoint_run

    run_point, emit, measured = endpoint_run.cl.run_point, endpoint_run._emit, []

    async def stopped_part_way(client, body, point, seed, count, duration=None, finished=None):
        work = asyncio.ensure_future(run_point(client, body, point, seed, count, duration, finished))
        if finished is not None:  # (None: the warm-ups)
            while len(finished) < 12 and not work.done():
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
        return await work

    def emit_signalled(writer, row):
        if row["kind"] == "measured" and not measured:
            os.kill(os.getpid(), signal.SIGTERM)  # while the first of them is written
        measured.append(row["kind"] == "measured")
        return emit(writer, row)

    monkeypatch.setattr(endpoint_run.cl, "run_point", stopped_part_way)
    monkeypatch.setattr(endpoint_run, "_emit", emit_signalled)
    out = tmp_path / "cut"
    assert main(["run", "--endpoint", server["url"] + "/v1", "--model", MODEL, "--num-prompts", "100000",
                 "--max-new-tokens", "2", "--warmup", "0", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    finished = int(re.search(r"the rows of the (\d+) requests", err).group(1))
    assert finished == len(read_runs(out / "runs.csv")) == sum(measured) >= 12


@pytest.mark.parametrize("host,url", [("127.0.0.1", "http://127.0.0.1:8000/v1"), ("::1", "http://[::1]:8000/v1"),
                                      ("localhost", "http://localhost:8000/v1")])
def test_the_url_a_server_announces_is_one_a_client_can_give(host, url):
    from urllib.parse import urlsplit

    from bench.cli.serve import base_url

    assert base_url(host, 8000) == url
    assert (urlsplit(url).hostname, urlsplit(url).port) == (host, 8000)


def test_a_servers_model_entry_states_what_it_runs_in_strings_only():
    """vlm-bench serve's "vlm_bench" object in /v1/models is read; another server's entry (vLLM's
    has no such object) or one whose values are not strings states nothing."""
    from bench.serve.client import served_identity

    assert served_identity({"id": "m", "vlm_bench": {"weights": "random", "device": "cuda"}}) == \
        {"weights": "random", "device": "cuda"}
    assert served_identity({"id": "m", "root": "llava-hf/llava-1.5-7b-hf", "max_model_len": 4096}) == {}
    assert served_identity({"id": "m", "vlm_bench": ["random"]}) == {}
    assert served_identity({"id": "m", "vlm_bench": {"weights": 1, "family": None, "dtype": "float16"}}) == \
        {"dtype": "float16"}
    # an empty or blank value, or one that would break a line of the console's table, states nothing
    assert served_identity({"id": "m", "vlm_bench": {"weights": "", "family": " ", "device": "cuda\n0"}}) == {}


def test_endpoint_mode_sweeps_prompt_lengths_and_images_as_in_process_runs_do(server, tiny_vila_dir, tmp_path):
    import pandas as pd

    from bench.cli import main
    from bench.models.native import local_tokenizer

    out, tokenizer = tmp_path / "axes", tiny_vila_dir / "llm"  # the served preset's tokenizer files
    assert main(["run", "--endpoint", server["url"] + "/v1", "--model", MODEL, "--prompt-lengths", "8,24",
                 "--tokenizer", str(tokenizer), "--num-images", "1,2", "--num-prompts", "2", "--max-new-tokens", "2",
                 "--output-dir", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    measured = runs[runs["kind"] == "measured"]
    assert (measured["status"] == "ok").all() and len(measured) == 8
    points = list(dict.fromkeys(zip(runs["question_tokens"], runs["num_images"])))
    assert points == [(8, 1), (8, 2), (24, 1), (24, 2)]  # prompt length, then images per prompt
    tok = local_tokenizer(tokenizer, "--tokenizer")
    for n, question in zip(runs["question_tokens"], runs["question"]):  # warm-ups too: the point's shape
        assert len(tok.encode(question, add_special_tokens=False)) == n
    # the server's own count: 16 more question tokens, and a second image's tokens
    prompt = measured.groupby(["question_tokens", "num_images"])["prompt_tokens"].agg(set).to_dict()
    assert all(len(v) == 1 for v in prompt.values())
    prompt = {k: v.pop() for k, v in prompt.items()}
    assert prompt[24, 1] - prompt[8, 1] == prompt[24, 2] - prompt[8, 2] == 16 and prompt[8, 2] > prompt[8, 1]
    assert (measured["server_prefix_hit_rate"] == 1.0).all()  # the shared images, both of them, cached
    summary = pd.read_csv(out / "summary.csv")
    ttft = summary[summary["metric"] == "ttft_ms"]
    assert sorted(zip(ttft["question_tokens"], ttft["num_images"])) == sorted(points) and (ttft["n"] == 2).all()


def test_endpoint_mode_refuses_a_bad_flag_and_writes_nothing(tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "never"
    bad = [[flag, value] for flag, value in (("--request-rate", "0"), ("--slo", "ttft=5"), ("--concurrency", "0"),
                                             ("--duration", "0"), ("--num-images", "0"))]
    bad += [["--prompt-lengths", "8"],  # no tokenizer to count its tokens with: --tokenizer named
            ["--tokenizer", str(tmp_path), "--prompt-lengths", "8"]]  # a directory with no tokenizer files
    for args in bad:
        flag = "--tokenizer" if "--prompt-lengths" in args else args[0]
        assert main(["run", "--endpoint", "http://127.0.0.1:9/v1", "--model", MODEL, *args,
                     "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_server_stops_cleanly_on_sigterm(server):
    """Last: it ends the module's server."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = server["log"].read_text()
    assert "server stopped" in log and "Traceback" not in log


def test_a_server_stopped_while_it_loads_exits_at_once_with_code_0(tmp_path):
    """Ctrl-C or SIGTERM while the model loads on its engine thread (or warms up there): the
    process ends without waiting for the load, exit code 0 as when serving, no traceback."""
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        log = (tmp_path / f"{sig.name}.log").open("w+")
        procs[sig] = log, subprocess.Popen(  # SIGINT as a terminal sends it (a shell's & may ignore it)
            [sys.executable, "-m", "bench", "serve", *SERVE, "--port", str(_free_port())], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=log, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for sig, (log, proc) in procs.items():
        deadline = time.monotonic() + 60
        while "loading" not in (tmp_path / f"{sig.name}.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
    for sig, (log, proc) in procs.items():
        rc = proc.wait(timeout=30)
        text = (tmp_path / f"{sig.name}.log").read_text()
        log.close()
        assert rc == 0 and "Traceback" not in text, (sig.name, rc, text[-2000:])
        assert "stopped before serving" in text or "server stopped" in text


def test_a_served_prompt_is_tokenized_once():
    """The server checks that a request fits with the prompt the engine then runs (not a second
    tokenization on the engine thread)."""
    import base64

    from fastapi.testclient import TestClient

    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1)
    engine, _, name = load_engine(cfg, model_source(cfg))
    adapter, calls = engine.adapter, []
    tokenize = adapter.prepare_text
    adapter.prepare_text = lambda *a, **k: calls.append(a) or tokenize(*a, **k)
    url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    body = {"model": name, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
    with TestClient(create_app(engine, name, 4)) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert len(calls) == 1


def test_a_served_image_embedding_hit_says_cache_hit_with_no_cached_tokens():
    """embedcache reuses image embeddings but no prompt tokens' keys and values: the response's
    timings say cache_hit, as the in-process row does, where cached_tokens 0 cannot."""
    import base64

    from fastapi.testclient import TestClient

    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1, variants="embedcache")
    engine, _, name = load_engine(cfg, model_source(cfg))
    url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    body = {"model": name, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
    with TestClient(create_app(engine, name, 4)) as client:
        cold, warm = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (cold, warm)] == [0, 0]
    assert [r["timings"]["cache_hit"] for r in (cold, warm)] == [False, True]


def test_the_engine_is_loaded_and_served_on_one_thread_of_its_own():
    """On the CPU a model run on one thread (warm-up) and served from another ran twice as slowly
    (bench.serve.worker): the server loads, warms up and serves on its engine thread."""
    import base64
    import threading

    from fastapi.testclient import TestClient

    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source
    from bench.serve.worker import EngineThread

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1)
    engine_thread, seen = EngineThread(), []
    engine, _, name = engine_thread.call(load_engine, cfg, model_source(cfg))
    loaded_on = engine_thread.call(threading.get_ident)
    run_batch = engine.run_batch
    engine.run_batch = lambda *a: seen.append(threading.get_ident()) or run_batch(*a)
    url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    body = {"model": name, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}
    with TestClient(create_app(engine, name, 4, engine_thread=engine_thread)) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert seen == [loaded_on] and loaded_on != threading.get_ident()
    with pytest.raises(ValueError, match="invalid literal"):  # a failure there is raised to the caller
        engine_thread.call(int, "not a number")


def test_a_signal_another_thread_receives_interrupts_a_wait_on_the_engine_thread():
    """The kernel may deliver a Ctrl-C or SIGTERM to any thread of the server (the engine's while
    it loads a model, a math library's): the main thread, waiting for the engine thread's call,
    still runs the handler at once, not when the call returns (a flaky stop-while-loading test
    under load: the server went on loading past the test's 30 s)."""
    import threading

    from bench.serve.worker import EngineThread

    engine_thread, released, late = EngineThread(), threading.Event(), []

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def signalled_on_the_engine_thread():  # the main thread is waiting for this call by now
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        if not released.wait(20):  # the main thread never woke: return, and say so
            late.append(True)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine_thread.call(signalled_on_the_engine_thread)
    finally:
        released.set()
        signal.signal(signal.SIGUSR1, previous)
    assert not late, "the handler ran only when the engine thread's call returned"


def test_a_batch_hands_each_steps_tokens_to_the_event_loop_in_one_call():
    """Two requests batched together: every position's two tokens reach the server's event loop
    in one call (one wake-up per step, not one per request), and each stream gets its own."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1)
    engine, _, name = load_engine(cfg, model_source(cfg))
    url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()

    def body(question):
        return {"model": name, "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}

    with TestClient(create_app(engine, name, 4, max_batch=2, window_s=2.0)) as client:
        from bench.serve.worker import _put_tokens

        worker, posts = client.app.state.worker, []
        post = worker.post
        worker.post = lambda fn, *args: (fn is _put_tokens and posts.append(len(args[0]))) or post(fn, *args)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda q: client.post("/v1/chat/completions", json=body(q)),
                                    ["What is it?", "Which colours?"]))
    assert [a.status_code for a in answers] == [200, 200]
    assert all(a.json()["usage"]["completion_tokens"] == 5 for a in answers)
    assert posts == [2] * 5  # one call per position, carrying both requests' tokens


def test_a_server_warms_up_every_batch_size_before_it_listens(server):
    from bench.models.visual import VisualInput, load_image
    from bench.run.config import DEMO_IMAGE, config_class
    from bench.serve.loading import load_engine, model_source, warm_up

    assert "warming up: every batch size up to 4" in server["log"].read_text()
    cfg = config_class()(preset=MODEL, device="cpu", variants="prefix", cpu_threads=1)
    engine, _, _ = load_engine(cfg, model_source(cfg))
    assert warm_up(engine, load_image(DEMO_IMAGE), 3, 2, DEMO_IMAGE.read_bytes()) == 6  # sizes 1-3, twice each
    stats = engine.policy.stats()  # one lookup per row: the first misses and stores, every later one hits
    assert (stats["misses"], stats["hits"]) == (1, 1 + 2 * 2 + 2 * 3)
    # keyed by the file's bytes, as a served request sending that file: its first request is a hit
    visual = VisualInput((load_image(DEMO_IMAGE),), encoded=(DEMO_IMAGE.read_bytes(),))
    assert engine.run(visual, "Another question?", 2).cache_hit


def test_server_counters_read_vllm_metrics_too(tmp_path):
    """vLLM's /metrics names (prefix-cache queries and hits in tokens, its TTFT histogram), served by a
    real HTTP server on loopback: the point's hit rate and mean server TTFT from before and after."""
    import asyncio
    import functools
    import http.server
    import threading

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from bench.serve.client import Api, server_counters

    reg = CollectorRegistry()
    queries = Counter("vllm:prefix_cache_queries", "tokens looked up", ["model_name"], registry=reg)
    hits = Counter("vllm:prefix_cache_hits", "tokens hit", ["model_name"], registry=reg)
    ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", ["model_name"], registry=reg)
    (tmp_path / "metrics").write_bytes(b"")

    def publish():
        (tmp_path / "metrics").write_bytes(generate_latest(reg))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        api_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # /metrics beside it

        async def read():
            async with Api(api_url, {}, 30.0) as api:
                return await server_counters(api)

        queries.labels("m").inc(100)
        hits.labels("m").inc(10)
        ttft.labels("m").observe(0.5)
        publish()
        before = asyncio.run(read())
        queries.labels("m").inc(300)
        hits.labels("m").inc(240)
        ttft.labels("m").observe(0.02)
        ttft.labels("m").observe(0.04)
        publish()
        after = asyncio.run(read())
        httpd.shutdown()
    assert after.prefix_hit_rate(before) == pytest.approx(0.8)
    assert after.mean_ttft_ms(before) == pytest.approx(30.0)
    assert after.mean_ttft_ms(after) is None  # no request between: no mean


def test_a_model_that_takes_images_in_fours_serves_after_warming_up_with_four(tmp_path):
    """InternVideo2.5 merges every 4 images: the server checks and warms up with 4, answers a
    request of 4 and refuses one of 1 with a 400."""
    args = ["--preset", "tiny-internvideo", "--device", "cpu", "--cpu-threads", "1", "--max-new-tokens", "3",
            "--max-batch", "2"]
    with _serving(args, tmp_path / "server.log") as running:
        url = running["url"] + "/v1/chat/completions"
        from PIL import Image

        urls = [_png_url(Image.new("RGB", (32, 32), (40 * i, 90, 200))) for i in range(4)]

        def ask(k):
            return httpx.post(url, timeout=60, json={"model": "tiny-internvideo", "messages": [{"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": u}} for u in urls[:k]), {"type": "text", "text": "What?"}]}]})
        assert ask(4).json()["usage"]["completion_tokens"] == 3
        refused = ask(1)
        message = refused.json()["error"]["message"]
        assert refused.status_code == 400 and "multiple of 4 image_url parts" in message and "--" not in message
        assert "warming up: every batch size up to 2" in running["log"].read_text()


def test_garbage_that_outlives_a_batch_is_collected_on_a_server_that_is_never_idle():
    """The collector is off during each batch and only the young generation is collected after
    it; objects a batch's end finds alive (a request's response still being sent) move to an older
    generation, which must still be collected when batches run back to back."""
    import gc
    import weakref

    from bench.run import host

    class Node:
        pass

    gc.collect()
    refs, held = [], None
    for _ in range(100):
        with host.one_request():
            node = Node()
            node.self = node  # a cycle: only the collector frees it
            refs.append(weakref.ref(node))
            held, node = node, None  # alive at the batch's end, garbage during the next batch
    del held
    assert sum(r() is not None for r in refs) <= 2 * gc.get_threshold()[1]


@contextlib.contextmanager
def _uvicorn(app):
    """`app` served by uvicorn on a free loopback port from a thread of this process: its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _served_tiny_vila(run_batch_around, **app_options):
    """tiny-vila on the CPU in an app (create_app's `app_options`) whose engine's run_batch is
    `run_batch_around(run_batch)`."""
    from bench.run.config import config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1)
    engine, _, name = load_engine(cfg, model_source(cfg))
    engine.run_batch = run_batch_around(engine.run_batch)
    return create_app(engine, name, 4, **app_options), name


def test_a_streamed_response_starts_while_the_engine_works_on_its_first_token(image_url):
    """The response's status and headers go out once the request's batch starts, so only the
    first chunk is left to send when the first token comes (a client's TTFT then has one write
    of HTTP in it, not the response's start too)."""
    import threading

    headers_seen, waited = threading.Event(), []

    def around(run_batch):
        def held(*args):
            waited.append(headers_seen.wait(10))  # the client has the response's head before any token
            return run_batch(*args)
        return held

    app, name = _served_tiny_vila(around)
    body = {"model": name, "max_tokens": 3, "stream": True, "messages": _messages("What is it?", image_url)}
    with _uvicorn(app) as url, httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        headers_seen.set()
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert waited == [True]
    timings = json.loads(lines[-2][5:])["timings"]
    assert lines[-1] == "data: [DONE]" and timings["ttft_ms"] > 0


def test_a_batch_that_fails_after_its_response_started_ends_the_stream_with_an_error(image_url):
    """A streamed request whose batch fails gets OpenAI's in-stream error event (its status went
    out when the batch started), which endpoint mode files as a failed row; unstreamed, a 500;
    the server serves the next request."""
    import asyncio

    from bench.serve.client import Api, one_request

    failures = [RuntimeError("the engine failed"), RuntimeError("the engine failed again")]

    def around(run_batch):
        return lambda *args: run_batch(*args) if not failures else (_ for _ in ()).throw(failures.pop(0))

    app, name = _served_tiny_vila(around)
    body = {"model": name, "max_tokens": 3, "stream": True, "messages": _messages("What is it?", image_url)}

    async def streamed(url):
        async with Api(f"{url}/v1", {}, 60) as api:
            return await one_request(api, body)

    with _uvicorn(app) as url:
        row = asyncio.run(streamed(url))
        plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        ok = asyncio.run(streamed(url))
    assert row == {"status": "failed", "error": "RuntimeError: the engine failed"}
    assert plain.status_code == 500 and plain.json()["error"] == {
        "message": "RuntimeError: the engine failed again", "type": "server_error", "param": None, "code": None}
    assert ok["status"] == "ok" and ok["output_tokens"] == 3


def test_a_request_whose_images_were_decoded_before_is_checked_on_the_event_loop(monkeypatch, image_url):
    """An image seen before (the shared prefix's) needs no decoding, so its request is checked on
    the event loop without a hop to a thread and back; a new image is decoded on a thread (it
    would hold up every connection); each lookup counted once either way."""
    import threading

    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    import bench.serve.app as served
    from bench.serve.protocol import parse_chat

    calls = []

    def recorded(*args):  # (blocking, outcome, thread) of each parse
        outcome = "would block"
        try:
            result = parse_chat(*args)
            outcome = "parsed"
            return result
        finally:
            calls.append((args[-1], outcome, threading.get_ident()))

    monkeypatch.setattr(served, "parse_chat", recorded)
    app, name = _served_tiny_vila(lambda run_batch: run_batch)
    body = {"model": name, "max_tokens": 2, "messages": _messages("What is it?", image_url)}
    with TestClient(app) as client:
        per_request = []
        for _ in range(2):
            calls.clear()
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            per_request.append(list(calls))
        counts = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
                  for s in f.samples}
    first, again = per_request
    assert [c[:2] for c in first] == [(False, "would block"), (True, "parsed")]
    assert [c[:2] for c in again] == [(False, "parsed")]
    loop_thread = first[0][2]
    assert first[1][2] != loop_thread and again[0][2] == loop_thread
    assert counts["vlm_image_cache_hits_total"] == 1 and counts["vlm_image_cache_misses_total"] == 1


def test_a_stop_signal_handled_inside_a_finalizer_still_stops_the_load():
    """Python runs a signal handler wherever the main thread is, a `__del__` included, where an
    exception raised by the handler is printed and dropped: a SIGTERM during warm-up was lost so
    and the server went on to serve. The handler sets a flag the wait on the engine thread sees."""
    from bench.run.interrupt import requested, signals_interrupt
    from bench.serve.worker import EngineThread

    class SignalledWhileFinalized:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the finalizer

    before = signal.getsignal(signal.SIGTERM)
    with signals_interrupt(raise_now=False):
        finalized = SignalledWhileFinalized()
        del finalized
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            EngineThread(requested).call(time.sleep, 10)  # a load
    assert time.monotonic() - start < 5 and signal.getsignal(signal.SIGTERM) is before


def test_a_stop_signal_that_lands_before_uvicorn_takes_the_signals_over_still_stops_the_server():
    """A SIGTERM after the load's last check of the flag but before uvicorn installs its own
    handlers (the event loop's setup) only sets the flag: the server stops rather than serve on."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from bench.cli.serve import _server_class
    from bench.run.interrupt import requested, signals_interrupt

    server = _server_class(requested)(uvicorn.Config(FastAPI(), host="127.0.0.1", port=_free_port(), log_level="warning"))
    went_on = []

    def stop_it_anyway():  # the server has ignored the signal: end the test
        if not server.should_exit:
            went_on.append(server.started)
            server.should_exit = True

    timer = threading.Timer(10, stop_it_anyway)
    timer.start()
    try:
        with signals_interrupt(raise_now=False), pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            server.run()
    finally:
        timer.cancel()
    assert went_on == [] and not server.started


def _counted(url: str) -> dict:
    """vlm-bench serve's /metrics samples by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples}


def test_a_client_that_leaves_while_its_request_is_queued_never_gets_it_run(image_url):
    """The request waits behind another's batch; its client disconnects: the worker drops it when
    it comes to it (no prefill for no one), counted as cancelled, and the server serves on."""
    import threading

    release, ran = threading.Event(), []

    def around(run_batch):
        def held(requests, *args):
            ran.append(requests[0][1])
            assert release.wait(30)
            return run_batch(requests, *args)
        return held

    app, name = _served_tiny_vila(around)
    body = {"model": name, "max_tokens": 2, "stream": True}
    with _uvicorn(app) as url:
        first = threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",),
                                 kwargs={"json": {**body, "messages": _messages("First?", image_url)}, "timeout": 60})
        first.start()
        deadline = time.monotonic() + 30
        while not ran and time.monotonic() < deadline:  # the first request's batch holds the engine
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # queued behind it, then the client leaves
            httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": _messages("Left?", image_url)},
                       timeout=httpx.Timeout(60, read=0.5))
        queued = app.state.worker.jobs.queue
        while not (queued and queued[0].cancelled.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the server has seen the disconnect
        release.set()
        first.join(60)
        ok = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": _messages("Next?", image_url)},
                        timeout=60)
        counts = _counted(url)
    assert ok.status_code == 200 and ran == ["First?", "Next?"]
    assert counts[("vlm_requests_total", (("status", "cancelled"),))] == 1
    assert counts[("vlm_requests_total", (("status", "ok"),))] == 2


def test_a_response_reaches_its_client_after_the_server_has_counted_it(image_url):
    """/metrics read right after a response already counts it (endpoint mode reads the prefix
    counters after a point's last response)."""
    from fastapi.testclient import TestClient

    app, name = _served_tiny_vila(lambda run_batch: run_batch)
    body = {"model": name, "max_tokens": 2, "messages": _messages("What is it?", image_url)}
    with TestClient(app) as client:
        worker, seen = app.state.worker, []
        post = worker.post

        def recorded(fn, *args):
            if args and args[0] == "done":
                seen.append(worker.metrics.requests.labels("ok")._value.get())
            return post(fn, *args)

        worker.post = recorded
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert seen == [1, 2, 3]


def test_a_client_that_leaves_a_batch_others_finish_is_counted_cancelled(image_url):
    """Two requests batched; one client leaves after its first token, the other reads to the end:
    the batch runs on for the one, and /metrics counts one ok and one cancelled."""
    import threading

    app, name = _served_tiny_vila(lambda run_batch: run_batch, max_batch=2, window_s=2.0)
    body = {"model": name, "max_tokens": 300, "stream": True}  # long enough to outlast the disconnect
    with _uvicorn(app) as url:
        def leave_early():
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              json={**body, "messages": _messages("Leaving?", image_url)}) as r:
                chunks = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))
                assert next(c for c in chunks if c["choices"][0]["delta"].get("content"))

        leaving = threading.Thread(target=leave_early)
        leaving.start()
        stayed = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                            json={**body, "messages": _messages("Staying?", image_url)})
        leaving.join(60)
        counts = _counted(url)
    assert stayed.status_code == 200 and stayed.text.rstrip().endswith("data: [DONE]")
    assert counts[("vlm_requests_total", (("status", "cancelled"),))] == 1
    assert counts[("vlm_requests_total", (("status", "ok"),))] == 1


def test_an_unstreamed_client_that_leaves_mid_generation_stops_its_batch(image_url):
    """An unstreamed request's client gives up while its tokens are being generated: the batch (its
    alone) stops at its next token instead of generating the rest for no one, is counted
    cancelled, and the server serves on."""
    import threading

    steps, generating = [], threading.Event()

    def around(run_batch):
        engine = run_batch.__self__

        def slowed(*args):
            hook = engine.token_hook

            def hook_slowly(tokens):
                steps.append(len(tokens))
                generating.set()
                time.sleep(0.01)  # 300 tokens take 3 s at least
                hook(tokens)
            engine.token_hook = hook_slowly
            return run_batch(*args)
        return slowed

    app, name = _served_tiny_vila(around)
    body = {"model": name, "max_tokens": 300, "messages": _messages("Go on?", image_url)}
    with _uvicorn(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        assert generating.is_set()
        deadline = time.monotonic() + 30
        while _counted(url).get(("vlm_requests_total", (("status", "cancelled"),))) != 1:
            assert time.monotonic() < deadline, "the batch was not stopped"
            time.sleep(0.05)
        ok = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
        counts = _counted(url)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert 0 < len(steps) - 2 < 200  # stopped well before its 300 tokens (the 2: the last request's)
    assert counts[("vlm_requests_total", (("status", "ok"),))] == 1


def test_a_request_held_back_for_the_next_batch_counts_the_batch_before_it_as_queued(image_url):
    """With --max-batch 2, a request that arrives while a batch is being formed but cannot join it
    (another max_tokens) is held back for the next batch: until that starts it is still waiting,
    so its queue_ms (and the queue-time histogram) covers the batch before it, as a request left
    in the queue would, and the server's own part is not put down to anything else."""
    import threading

    runs = {}  # max_tokens -> (start, end) of its batch, perf_counter s

    def around(run_batch):
        def timed(requests, max_tokens, *rest):
            start = time.perf_counter()
            time.sleep(0.2)  # the batch before the held request takes a while
            try:
                return run_batch(requests, max_tokens, *rest)
            finally:
                runs[max_tokens] = (start, time.perf_counter())
        return timed

    app, name = _served_tiny_vila(around, max_batch=2, window_s=1.0)
    bodies = [{"model": name, "max_tokens": n, "messages": _messages("Which?", image_url)} for n in (3, 2)]
    answers = {}

    def post(body):
        answers[body["max_tokens"]] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

    with _uvicorn(app) as url:
        threads = [threading.Thread(target=post, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # the second arrives within the first's batching window
        for thread in threads:
            thread.join(60)
        counts = _counted(url)
    assert {n: a.status_code for n, a in answers.items()} == {3: 200, 2: 200} and len(runs) == 2
    first, held = sorted(runs, key=lambda n: runs[n][0])
    before = runs[first][1] - runs[first][0]
    assert answers[held].json()["timings"]["queue_ms"] >= before * 1e3
    assert counts[("vlm_request_queue_time_seconds_count", ())] == 2
    assert counts[("vlm_request_queue_time_seconds_sum", ())] >= before
    assert counts[("vlm_queue_depth", ())] == 0


def test_a_batchs_requests_report_their_own_prompts_and_the_batching_window_as_queued(image_url):
    """Two questions of different lengths batched together report the prompt_tokens each has
    alone (not the batch's longest), and a request alone in its batch has the batching window it
    waited out in queue_ms (it was in none of the parts the server reports)."""
    import threading

    batches = []  # the requests of each batch run

    def around(run_batch):
        def counted(requests, *rest):
            batches.append(len(requests))
            return run_batch(requests, *rest)
        return counted

    app, name = _served_tiny_vila(around, max_batch=2, window_s=0.3)
    questions = ["Which?", "Which colour is the largest shape, and where is it in the picture? " * 4]

    def post(question, answers):
        body = {"model": name, "max_tokens": 2, "messages": _messages(question, image_url)}
        answers[question] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()

    with _uvicorn(app) as url:
        alone, together = {}, {}
        for question in questions:
            post(question, alone)
        threads = [threading.Thread(target=post, args=(question, together)) for question in questions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        counts = _counted(url)
    assert batches == [1, 1, 2]  # alone, alone, together
    prompts = {q: a["usage"]["prompt_tokens"] for q, a in alone.items()}
    assert prompts[questions[1]] > prompts[questions[0]]
    assert {q: a["usage"]["prompt_tokens"] for q, a in together.items()} == prompts
    assert all(a["usage"]["total_tokens"] == prompts[q] + 2 for q, a in together.items())
    assert all(a["timings"]["queue_ms"] >= 300 for a in alone.values())  # the window, waited out alone
    assert counts[("vlm_prompt_tokens_total", ())] == 2 * sum(prompts.values())


def test_a_request_whose_prompt_cannot_be_made_gets_a_500_and_the_server_serves_on(image_url):
    """An unexpected failure while the engine thread tokenizes a request (before its batch) is that
    request's 500, streamed or not, counted as an error; the engine thread serves the next one."""
    app, name = _served_tiny_vila(lambda run_batch: run_batch)
    adapter = app.state.worker.engine.adapter
    prepare = adapter.prepare_text

    def failing(question, visual):
        if question == "Boom?":
            raise RuntimeError("tokenizer broke")
        return prepare(question, visual)

    adapter.prepare_text = failing
    body = {"model": name, "max_tokens": 2}
    with _uvicorn(app) as url:
        for stream in (False, True):
            bad = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                             json={**body, "stream": stream, "messages": _messages("Boom?", image_url)})
            assert bad.status_code == 500 and "tokenizer broke" in bad.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": _messages("Fine?", image_url)},
                        timeout=60)
        counts = _counted(url)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert counts[("vlm_requests_total", (("status", "error"),))] == 2
