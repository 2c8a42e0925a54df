"""`vlm-bench serve`: an OpenAI-compatible HTTP server (bench.serve) over one model, variant and engine,
chosen with `run`'s flags (e.g. `--preset tiny-vila --variants awq4+prefix --engine static`)."""
from __future__ import annotations

from bench.cli import PROG, describe
from bench.quiet import quiet_libraries
from bench.errors import UsageError

SERVE_FLAGS = ("host", "port", "max_batch", "batch_window_ms", "served_model_name", "max_tokens_limit")


def parser():
    quiet_libraries()
    from bench.run.config import build_parser

    ap = build_parser(prog=f"{PROG} serve", description=describe("serve") + " Model, variant and engine flags "
                      "are `run`'s; --max-new-tokens is a request's default max_tokens.")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="requests run together as one batch at most (default: 1)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0,
                    help="with --max-batch above 1: how long the worker waits for more requests (default: 5.0)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model id clients send and /v1/models lists (default: the preset or checkpoint name)")
    ap.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted (default: 4096)")
    return ap


def main(argv: list[str]) -> int:
    quiet_libraries()
    from bench.run.config import config_class

    ns = vars(parser().parse_args(argv))
    serve = {k: ns.pop(k) for k in SERVE_FLAGS}
    if serve["max_batch"] < 1 or serve["batch_window_ms"] < 0 or serve["max_tokens_limit"] < 1:
        raise UsageError("--max-batch and --max-tokens-limit must be at least 1, --batch-window-ms not negative")
    if not 0 < serve["port"] < 65536:
        raise UsageError(f"--port {serve['port']}: not a TCP port")
    cfg = config_class()(**ns)
    need_serve_extra()

    import uvicorn

    from bench.log import status
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine

    _Server = _server_class()
    engine, variant, model = load_engine(cfg)
    name = serve["served_model_name"] or model
    app = create_app(engine, name, cfg.max_new_tokens, serve["max_batch"], serve["batch_window_ms"] / 1e3,
                     cfg.num_frames, serve["max_tokens_limit"])
    status(f"serving {name} ({variant}, {engine.name} engine) on http://{serve['host']}:{serve['port']}/v1")
    _Server(uvicorn.Config(app, host=serve["host"], port=serve["port"], log_level="warning")).run()
    status("server stopped")
    return 0


def need_serve_extra() -> None:
    """A usage error naming the extra to install when the serving libraries are missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serving needs {', '.join(missing)}: pip install -e '.[serve]'")


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending with exit code 0 on SIGINT or SIGTERM once it has shut down
        (uvicorn raises the captured signal again after its shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server
