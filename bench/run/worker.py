"""One job of a sweep in a worker process: what the parent sends (a payload) and what the
worker sends back (messages). The parent alone writes the results directory.

Messages, in order: ("start", worker name) as the job begins, ("row", row) for every finished
row, ("variant", name) as each variant's rows are all out, then ("done", preprocess facts by
variant); or ("usage", message) for an error the user can act on, or ("error", reason) when the
job could not start."""
from __future__ import annotations

from dataclasses import fields

import variants
from bench.errors import UsageError
from bench.run import host
from bench.run.config import config_class
from bench.run.plan import Job

# The sweep's own settings: a worker runs its job serially, on the device it is given.
WORKER_SETTINGS = {"executor": "serial", "gpus": None, "workers": 0, "ray_address": None}


def payload(bench, job: Job, name: str, cpu_threads: int = 0) -> dict:
    """What a worker needs to measure `job` as the parent's run would: the settings, the run's
    identity, its --resume rows of the job's variants, and the variant parts registered outside
    the package (a spawned process has only the package's own)."""
    cfg = bench.cfg
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    config.update(WORKER_SETTINGS)
    if bench.device.type == "cuda":
        config["device"] = "cuda:0"  # the one GPU the worker sees
    if cpu_threads and not cfg.cpu_threads:
        config["cpu_threads"] = cpu_threads
    return {"config": config, "command": bench.command, "job": job, "name": name, "run_id": bench.run_id,
            "mode": bench.mode, "prior": {k: v for k, v in bench.prior.items() if k[0] in job.specs},
            "parts": variants.registered()}


def measure_job(work: dict, send) -> None:
    """Measure the payload's job, every message through send(message)."""
    from bench.run.runner import Benchmark, _reason

    send(("start", work["name"]))
    try:
        for part in work["parts"]:
            if part.name not in variants.registry():
                variants.register(part)
        cfg = config_class()(**work["config"])
        bench = Benchmark(cfg, work["command"], worker=work)
        bench.sink = lambda row: send(("row", row))
        host.set_cpu_threads(bench.cpu_threads)
    except UsageError as e:
        send(("usage", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - the job's rows say why
        send(("error", f"the worker could not start the job: {_reason(e)}"))
        return
    try:
        bench.run_job(work["job"], finished=lambda name: send(("variant", name)))
    except UsageError as e:
        send(("usage", str(e)))
        return
    send(("done", bench.preprocess_facts))
