"""`vlm-bench serve`: an OpenAI-compatible HTTP server (bench.serve) over one model, variant and engine,
chosen with `run`'s flags (e.g. `--preset tiny-vila --variants awq4+prefix --engine static`)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import warnings
from pathlib import Path

from bench.cli import PROG, describe
from bench.quiet import quiet_libraries
from bench.errors import UsageError

SERVE_FLAGS = ("host", "port", "max_batch", "batch_window_ms", "served_model_name", "max_tokens_limit",
               "max_request_mb", "image_cache_mb", "prewarm")
# run's flags a server has no use for: refused. It runs no sweep (executors, workload points,
# measured questions and media), measures nothing and writes no results directory.
NOT_SERVED = ("executor", "gpus", "workers", "ray_address", "worker_timeout", "output_dir", "append", "resume",
              "batch_size", "prompt_lengths", "new_tokens", "num_images", "text_prompt", "questions", "video_path",
              "frames_dir", "video_mode", "loader", "num_runs", "min_seconds", "max_runs", "warmup", "max_cv",
              "fidelity", "calibrate", "wide")
EXIT_CODES = """exit codes:
  0  stopped (Ctrl-C or SIGTERM): once the running batch is done; while loading or warming up, at once
  2  usage error (bad flag, a taken port, a variant this device cannot run); nothing served"""
MAX_WINDOW_MS = 60_000.0


def parser():
    quiet_libraries()
    from bench.run.config import build_parser
    from bench.serve.body_limit import MAX_REQUEST_MB
    from bench.serve.image_cache import DEFAULT_MB as DEFAULT_IMAGE_CACHE_MB

    ap = build_parser(prog=f"{PROG} serve", description=describe("serve") + " Model, variant and engine flags "
                      "are `run`'s; --max-new-tokens is a request's default max_tokens.", leave_out=NOT_SERVED)
    ap.epilog = EXIT_CODES  # not run's
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="requests run together as one batch at most (default: 1)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0,
                    help="with --max-batch above 1: how long the worker waits for more requests (default: 5.0)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model id clients send and /v1/models lists (default: the preset or checkpoint name)")
    ap.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted (default: 4096)")
    ap.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB, metavar="MIB",
                    help="largest request body accepted, in MiB (images travel in it as base64 data: URLs); a "
                         f"larger one gets HTTP 413 before it is read whole (default: {MAX_REQUEST_MB:g})")
    ap.add_argument("--image-cache-mb", type=float, default=DEFAULT_IMAGE_CACHE_MB, metavar="MIB",
                    help="MiB of decoded request images kept by their bytes, so an image sent again is not "
                         f"decoded again; 0 turns it off (default: {DEFAULT_IMAGE_CACHE_MB})")
    ap.add_argument("--prewarm", action=argparse.BooleanOptionalAction, default=True,
                    help="before listening, run --image-path at every batch size up to --max-batch "
                         "(--max-new-tokens each), so no request waits for a batch shape's compilation "
                         "(default: on)")
    return ap


def main(argv: list[str]) -> int:
    quiet_libraries()
    # PIL warns (two lines on stderr) on opening an image past Image.MAX_IMAGE_PIXELS; a request's
    # image is refused then, a 400 saying so (bench.serve.protocol._decode)
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    from bench.run.config import config_class

    ns = vars(parser().parse_args(argv))
    serve = {k: ns.pop(k) for k in SERVE_FLAGS}
    if serve["max_batch"] < 1 or serve["max_tokens_limit"] < 1:
        raise UsageError("--max-batch and --max-tokens-limit must be at least 1")
    if not 0 <= serve["batch_window_ms"] <= MAX_WINDOW_MS:  # nan and inf too
        raise UsageError(f"--batch-window-ms must be from 0 to {MAX_WINDOW_MS:,.0f}, got {serve['batch_window_ms']}")
    if not 0 < serve["max_request_mb"] < float("inf"):  # nan too
        raise UsageError(f"--max-request-mb must be a positive, finite number of MiB, got {serve['max_request_mb']}")
    if not 0 <= serve["image_cache_mb"] < float("inf"):  # nan too
        raise UsageError(f"--image-cache-mb must be 0 (off) or a positive, finite number of MiB, got "
                         f"{serve['image_cache_mb']}")
    if not serve["host"].strip():
        raise UsageError("--host is empty; give an address to listen on (0.0.0.0: every interface)")
    if serve["served_model_name"] is not None and not serve["served_model_name"].strip():
        raise UsageError("--served-model-name is empty; give the model id clients send, or leave the flag out")
    if serve["served_model_name"] is not None and not serve["served_model_name"].isprintable():
        raise UsageError(f"--served-model-name {serve['served_model_name']!r} holds control characters (a line "
                         "break, a tab); give the model id clients send")
    if not 0 < serve["port"] < 65536:
        raise UsageError(f"--port {serve['port']}: not a TCP port")
    cfg = config_class()(**ns)
    if cfg.max_new_tokens > serve["max_tokens_limit"]:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens} (a request's default max_tokens) is past "
                         f"--max-tokens-limit {serve['max_tokens_limit']}")
    need_serve_extra()
    from bench.serve.loading import check_default_request, model_source, served_identity

    source = model_source(cfg)
    check_default_request(cfg, source)
    sock = listening_socket(serve["host"], serve["port"])  # taken before the model loads

    import uvicorn

    from bench.log import status
    from bench.run import host, interrupt
    from bench.serve.app import create_app
    from bench.serve.worker import EngineThread

    if warning := source.max_tiles_warning():
        status(warning)
    stop = interrupt.requested
    serving, _Server = False, _server_class(stop)
    try:
        # Ctrl-C or SIGTERM before uvicorn takes the signals over (or after it gives them back):
        # exit 0 at once, as when serving (a SIGTERM in between would otherwise kill the process);
        # recorded, not raised from the handler (bench.run.interrupt), and seen by the waits
        with interrupt.signals_interrupt(raise_now=False):
            engine, variant, name, engine_thread = _load_and_warm_up(cfg, source, serve, EngineThread(stop))
            app = create_app(engine, name, cfg.max_new_tokens, serve["max_batch"], serve["batch_window_ms"] / 1e3,
                             cfg.num_frames, serve["max_tokens_limit"], serve["max_request_mb"],
                             serve["image_cache_mb"], engine_thread, served_identity(cfg, source))
            host.before_warmup()  # the loaded heap frozen out of the collector's walks (bench.serve.worker)
            if stop.is_set():
                raise KeyboardInterrupt
            status(f"serving {name} ({variant}, {engine.name} engine) on {base_url(serve['host'], serve['port'])} "
                   f"({http_stack()})")
            serving = True
            _Server(uvicorn.Config(app, host=serve["host"], port=serve["port"], log_level="warning")).run(
                sockets=[sock])
    except KeyboardInterrupt:
        status("server stopped" if serving else "stopped before serving")
        _exit_now(0)
    status("server stopped")
    return 0


def _load_and_warm_up(cfg, source, serve: dict, engine_thread):
    """(engine, variant name, served model name, its EngineThread): the engine loaded and, with
    --prewarm, warmed up on `engine_thread`, which will serve it (bench.serve.worker). The engine
    thread is a daemon: a Ctrl-C here ends the process without waiting for the load to finish."""
    from bench.log import status
    from bench.serve.loading import check_loaded_default_request, load_engine

    status(f"loading {source.name} ({cfg.variant_specs[0]})")
    engine, variant, model = engine_thread.call(load_engine, cfg, source)
    engine_thread.call(check_loaded_default_request, engine, cfg, source, serve["max_batch"])
    if serve["prewarm"]:
        from bench.models.visual import load_image
        from bench.serve.loading import warm_up

        status(f"warming up: every batch size up to {serve['max_batch']}, {cfg.max_new_tokens} tokens each")
        engine_thread.call(warm_up, engine, load_image(cfg.image_path), serve["max_batch"], cfg.max_new_tokens,
                           Path(cfg.image_path).read_bytes())
    return engine, variant, serve["served_model_name"] or model, engine_thread


def _exit_now(code: int) -> None:
    """End the process at once with `code`, skipping the interpreter's shutdown: the engine thread
    may be inside the model's native code (loading, warming up), and finalizing the interpreter
    under it aborts the process (C++ "terminate called without an active exception"). Nothing is
    left to clean up before serving: nothing was written, and the socket closes with the process."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def base_url(host: str, port: int) -> str:
    """The API's base URL clients give for a server on host:port (an IPv6 address in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def listening_socket(host: str, port: int):
    """A socket bound to host:port (uvicorn listens on it), or a usage error saying why not."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: not an address ({e.args[-1]})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def need_serve_extra() -> None:
    """A usage error naming the extra to install when the serving libraries are missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serving needs {', '.join(missing)}: pip install -e '.[serve]'")


def http_stack() -> str:
    """The event loop and HTTP parser uvicorn picks ("auto": uvloop and httptools where installed)."""
    import importlib.util

    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return (f"{'uvloop' if have('uvloop') else 'asyncio'} event loop, "
            f"{'httptools' if have('httptools') else 'h11'} HTTP parser")


def _server_class(stop: threading.Event):
    """`stop`: the flag a stop signal sets (bench.run.interrupt; one that came before the server
    took the signals over stops it before it starts)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending with exit code 0 on SIGINT or SIGTERM once it has shut down
        (uvicorn raises the captured signal again after its shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                if stop.is_set():  # signalled after the load's last check, before the handlers above
                    raise KeyboardInterrupt
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server
