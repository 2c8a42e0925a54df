"""A sweep's jobs in worker processes (the local executor) and Ray tasks give the rows the serial
run gives; a worker that dies leaves failed rows for its job, and the sweep ends."""
import csv
import os
import time

import pytest

import variants
from bench.cli import run_main
from bench.errors import UsageError
from bench.run.config import config_from_args
from bench.run.plan import build_plan, largest_first
from variants.base import WeightsPart

RUN = ["--preset", "tiny-vila", "--device", "cpu", "--num-runs", "2", "--min-seconds", "0", "--max-new-tokens", "4",
       "--warmup", "0", "--no-fidelity"]
SAME = ("model", "family", "weights", "variant", "engine", "device", "dtype", "status", "kind", "run_index", "question",
        "cache_state", "cache_hit", "batch_size", "prompt_tokens", "new_tokens", "host", "gpu")


class CrashWeights(WeightsPart):
    """Weights whose loading ends the process at once, as a segfault or the OOM killer would."""
    name = "crash"
    description = "test part: loading ends the process"

    def key(self, options) -> tuple:
        return (self.name,)

    def load(self, source, device, dtype, options):
        os._exit(70)


class HangWeights(WeightsPart):
    """Weights whose loading never ends, as a deadlocked driver call would; it leaves a file
    saying the worker got there."""
    name = "hang"
    description = "test part: loading never returns"

    def __init__(self, marker):
        self.marker = str(marker)

    def key(self, options) -> tuple:
        return (self.name,)

    def load(self, source, device, dtype, options):
        open(self.marker, "w").close()
        time.sleep(3600)


@pytest.fixture
def hang(tmp_path):
    part = variants.register(HangWeights(tmp_path / "loading"))
    yield part
    variants.unregister(part.name)


@pytest.fixture
def crash():
    part = variants.register(CrashWeights())
    yield part
    variants.unregister(part.name)


def rows_of(out):
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert len({r["run_id"] for r in rows}) == 1
    return rows


def identity(rows):
    """The rows less what differs run to run (timings, times, outputs, the process)."""
    return sorted(tuple(r.get(k, "") for k in SAME) for r in rows)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "o"
    assert run_main([*RUN, "--variants", "fp16,prefix", "--output-dir", str(out)]) == 0
    rows = rows_of(out)
    assert {r["worker"] for r in rows} == {"serial"}
    return rows


def test_plan_groups_variants_sharing_weights():
    cfg = config_from_args(["--variants", "fp16,prefix,rtn4,rtn4+prefix,fp16+static"])
    plan = build_plan(cfg)
    assert [job.specs for job in plan] == [("fp16", "prefix"), ("rtn4", "rtn4+prefix"), ("fp16+static",)]
    assert [v for job in plan for v in job.variants] == list(range(5))  # the serial order
    assert [job.index for job in largest_first(plan)] == [0, 1, 2]
    cfg = config_from_args(["--variants", "fp16,rtn4,rtn4+prefix", "--batch-size", "1,2"])
    assert [job.size for job in largest_first(build_plan(cfg))] == [4, 2]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0", "--workers", "2"], "not both"),
    (["--executor", "local"], "needs --gpus"),
    (["--executor", "ray", "--gpus", "0"], "--gpus applies to --executor local"),
    (["--ray-address", "auto"], "--ray-address applies to --executor ray"),
    (["--executor", "slurm"], "unknown --executor"),
    (["--gpus", "a,b"], "--gpus takes comma-separated whole numbers"),
])
def test_executor_flags_are_checked(args, message):
    with pytest.raises(UsageError, match=message):
        config_from_args(args)


def test_gpu_workers_on_the_cpu_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "o"
    assert run_main([*RUN, "--gpus", "0", "--output-dir", str(out)]) == 2
    assert not out.exists() or not any(out.iterdir())


def test_gpu_workers_without_a_gpu_say_none_is_there(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    auto = [a for a in RUN if a not in ("--device", "cpu")]  # --device auto, which finds no GPU
    assert run_main([*auto, "--gpus", "all", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--gpus: no CUDA device is available here" in capsys.readouterr().err


def test_local_workers_give_the_serial_rows_and_a_dead_worker_failed_rows(serial, crash, tmp_path):
    out = tmp_path / "o"
    assert run_main([*RUN, "--variants", "fp16,prefix,crash", "--workers", "2", "--output-dir", str(out)]) == 1
    rows = rows_of(out)
    lost = [r for r in rows if r["variant"] == "crash"]
    assert [r["status"] for r in lost] == ["failed"]  # one per workload point
    assert "worker local:" in lost[0]["error"] and "exited with code 70" in lost[0]["error"]
    measured = [r for r in rows if r["variant"] != "crash"]
    assert identity(measured) == identity(serial)
    assert len({r["worker"] for r in measured}) == 1 and measured[0]["worker"].startswith("local:")
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["variant"] for r in summary} >= {"fp16", "prefix"}


def test_local_workers_more_than_jobs_leave_the_cpu_threads_to_those_that_run(tmp_path, monkeypatch):
    """--workers 8 for one job starts one worker, which gets every CPU thread (not an eighth)."""
    from bench.run import worker

    given, real = [], worker.payload
    monkeypatch.setattr(worker, "payload", lambda *a: given.append(a[3]) or real(*a))
    out = tmp_path / "o"
    assert run_main([*RUN, "--variants", "fp16", "--workers", "8", "--output-dir", str(out)]) == 0
    assert given == [os.cpu_count()] and {r["status"] for r in rows_of(out)} == {"ok"}


def test_summary_keeps_the_variants_order_whatever_order_jobs_finish_in(tmp_path):
    """One worker takes the largest job (fp16 + prefix) first; the summary still lists rtn4 first."""
    out = tmp_path / "o"
    assert run_main([*RUN, "--variants", "rtn4,fp16,prefix", "--int4-cache-dir", "", "--workers", "1",
                     "--output-dir", str(out)]) == 0
    rows = rows_of(out)
    assert list(dict.fromkeys(r["variant"] for r in rows)) == ["fp16", "prefix", "rtn4"]  # as they finished
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert list(dict.fromkeys(r["variant"] for r in summary)) == ["rtn4", "fp16", "prefix"]


def test_ray_tasks_give_the_serial_rows_and_a_dead_task_failed_rows(serial, crash, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    out = tmp_path / "o"
    assert run_main([*RUN, "--variants", "fp16,prefix,crash", "--executor", "ray", "--workers", "2",
                     "--output-dir", str(out)]) == 1
    rows = rows_of(out)
    lost = [r for r in rows if r["variant"] == "crash"]
    assert [r["status"] for r in lost] == ["failed"] and "Ray task failed" in lost[0]["error"]
    measured = [r for r in rows if r["variant"] != "crash"]
    assert identity(measured) == identity(serial)
    assert all(r["worker"].startswith("ray:") for r in measured)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_hung_worker_is_stopped_after_worker_timeout_and_its_job_failed(hang, executor, tmp_path):
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    out = tmp_path / "o"
    t0 = time.monotonic()
    # 8 s: between its "start" and the load a worker sets up the job, seconds on a loaded 2-core machine
    assert run_main([*RUN, "--variants", "hang", "--executor", executor, "--workers", "1", "--worker-timeout", "8",
                     "--output-dir", str(out)]) == 3  # nothing measured
    assert time.monotonic() - t0 < 600  # never the hour the part sleeps
    assert os.path.exists(hang.marker)  # stopped while loading, not while starting
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["failed"]
    assert "sent nothing for 8 s (--worker-timeout) and was stopped" in rows[0]["error"]
