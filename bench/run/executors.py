"""Executors of a sweep plan beyond the serial one: local worker processes (one per GPU, or N on
the CPU) and Ray tasks (a whole GPU each). Jobs go out largest first; the finished rows come
back to this process, which alone writes runs.csv (Benchmark.record). A worker that dies, or
sends nothing for --worker-timeout seconds (a hang: it is stopped), turns the work its job had
left into failed rows saying so; the other jobs still run."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import time
from multiprocessing.connection import wait

from tqdm import tqdm

from bench.errors import UsageError
from bench.log import status
from bench.run import spawned, worker
from bench.run.plan import Job, largest_first

POLL_S = 5.0  # how often a wait for messages also looks at the workers' liveness
STARTUP_S = 300.0  # a local worker's start (process, imports) may take this long even with a shorter --worker-timeout


class Progress:
    """The whole sweep's progress (measurement groups: variants x points) and each job's state."""

    def __init__(self, bench, jobs: list[Job]):
        self.bench = bench
        self.bar = tqdm(total=sum(j.size for j in jobs), desc="sweep", unit="group", disable=None)
        self.finished: dict[int, set[str]] = {j.index: set() for j in jobs}
        self.done: set[int] = set()
        self.timeout_s = bench.cfg.worker_timeout
        self.heard: dict[int, float] = {}  # job -> when its worker last sent something (monotonic s)
        self.begun: set[int] = set()  # jobs whose worker has said it started them

    @property
    def poll_s(self) -> float:
        """How long a wait for messages lasts before liveness and silence are looked at again."""
        return min(POLL_S, max(self.timeout_s / 4, 0.25)) if self.timeout_s else POLL_S

    def started(self, job: Job) -> None:
        """A local worker process was started for the job."""
        self.heard[job.index] = time.monotonic()

    def stalled(self, job: Job) -> bool:
        """Whether the job's worker has sent nothing for --worker-timeout seconds since its last
        message. Before its first ("start", once the worker has imported what it needs) a local
        worker gets at least STARTUP_S; a Ray task's silence counts only from its first message
        (until then the cluster may not have run it)."""
        heard = self.heard.get(job.index)
        if not self.timeout_s or heard is None:
            return False
        limit = self.timeout_s if job.index in self.begun else max(self.timeout_s, STARTUP_S)
        return time.monotonic() - heard > limit

    def stall_reason(self, worker_name: str) -> str:
        return (f"worker {worker_name} sent nothing for {self.timeout_s:g} s (--worker-timeout) and was stopped "
                "before the job finished")

    def handle(self, job: Job, message, placement: dict) -> None:
        self.heard[job.index] = time.monotonic()
        kind, value = message
        if kind == "start":
            self.begun.add(job.index)
            return
        if kind == "row":
            self.bench.record(value)
        elif kind == "variant":
            self.finished[job.index].add(value)
            self.bar.update(job.points)
        elif kind == "done":
            self.bench.preprocess_facts.update(value)
            self.done.add(job.index)
        elif kind == "usage":
            raise UsageError(value)
        elif kind == "error":
            self.lost(job, value, placement)

    def lost(self, job: Job, reason: str, placement: dict) -> None:
        """The job's unfinished work as failed rows."""
        if job.index in self.done:
            return
        left = [s for s in job.specs if s not in self.finished[job.index]]
        self.bench.lost_job_rows(job, self.finished[job.index], reason, {**self.bench.placement, **placement})
        self.finished[job.index].update(left)
        self.bar.update(len(left) * job.points)
        self.done.add(job.index)

    def close(self) -> None:
        self.bar.close()


def run(bench, jobs: list[Job]) -> None:
    if bench.cfg.executor == "ray":
        run_ray(bench, jobs)
    else:
        run_local(bench, jobs)


# ---------------------------------------------------------------------------------------------
def local_slots(cfg, device) -> list[str | None]:
    """One entry per worker: the GPU it sees (CUDA_VISIBLE_DEVICES), or None on the CPU."""
    if cfg.workers:
        if device.type != "cpu":  # workers sharing one GPU would time each other
            raise UsageError("--workers runs CPU worker processes: give --device cpu, or --gpus for a worker per GPU")
        return [None] * cfg.workers
    if device.type != "cuda":
        if cfg.device == "auto":  # auto found no GPU
            raise UsageError("--gpus: no CUDA device is available here; use --workers N with --device cpu")
        raise UsageError("--gpus runs a worker per GPU: give --device cuda (or auto), or --workers N for CPU workers")
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--gpus: no CUDA device is available here; use --workers N with --device cpu")
    count = torch.cuda.device_count()
    if cfg.gpus == "all":
        return [str(i) for i in range(count)]
    from bench.run.workload import int_list

    gpus = int_list(cfg.gpus, "--gpus", 0)
    missing = [g for g in gpus if g >= count]
    if missing:
        raise UsageError(f"--gpus {cfg.gpus}: this machine has {count} CUDA device(s) (0..{count - 1})")
    return [str(g) for g in gpus]


def run_local(bench, jobs: list[Job]) -> None:
    """Each job in a fresh spawned process (a dead one takes only its job with it), at most one
    per slot at a time; messages come through a pipe per process, read as they arrive."""
    slots = local_slots(bench.cfg, bench.device)[:max(1, len(jobs))]  # a worker more than jobs would idle
    cpu_threads = max(1, (os.cpu_count() or 1) // len(slots)) if slots[0] is None else 0
    ctx = multiprocessing.get_context("spawn")
    queue = largest_first(jobs)
    free = list(range(len(slots)))
    running: dict = {}  # receiving end -> (process, job, slot)
    progress = Progress(bench, jobs)
    status(f"sweep: {len(jobs)} job(s) on {len(slots)} local worker(s)")
    bench.say_started()
    try:
        while queue or running:
            while queue and free:
                slot, job = free.pop(0), queue.pop(0)
                name = f"local:{slot}"
                recv, send = ctx.Pipe(duplex=False)
                work = pickle.dumps(worker.payload(bench, job, name, cpu_threads))
                proc = ctx.Process(target=spawned.process_main, name=f"vlm-bench {name}", args=(work, send),
                                   daemon=True)
                _start_with_gpu(proc, slots[slot])
                send.close()  # the child holds the only sending end: EOF when it exits
                running[recv] = (proc, job, slot)
                progress.started(job)
            wait([*running, *(p.sentinel for p, _, _ in running.values())], timeout=progress.poll_s)
            for recv in list(running):
                proc, job, slot = running[recv]
                where = {"worker": f"local:{slot}", **({"gpu": slots[slot]} if slots[slot] is not None else {})}
                alive = _drain(recv, job, progress, where) and proc.is_alive()
                if alive and not progress.stalled(job):
                    continue
                if alive:  # a hang: the process lives but its job makes no progress
                    proc.kill()
                    reason = progress.stall_reason(f"local:{slot}")
                else:
                    proc.join(timeout=POLL_S)
                    if proc.is_alive():  # its pipe closed, yet the process lingers
                        proc.kill()
                    reason = f"worker local:{slot} exited with code {proc.exitcode} before the job finished"
                proc.join()
                _drain(recv, job, progress, where)
                recv.close()
                del running[recv]
                free.append(slot)
                progress.lost(job, reason, where)
    finally:
        for recv, (proc, _, _) in running.items():
            proc.kill()
            proc.join()
            recv.close()
        progress.close()


def _start_with_gpu(proc, gpu: str | None) -> None:
    """Start a process that sees only `gpu` (the environment a spawned process starts with)."""
    if gpu is None:
        proc.start()
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        proc.start()
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _drain(recv, job: Job, progress: Progress, placement: dict) -> bool:
    """Handle every message waiting on `recv`; False once its sender has closed it."""
    try:
        while recv.poll():
            progress.handle(job, recv.recv(), placement)
    except (EOFError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
def run_ray(bench, jobs: list[Job]) -> None:
    """Each job a Ray task holding one whole GPU (never a fraction: a shared GPU skews timings).
    A task is a streaming generator: its rows reach this process as they are made, so a task
    that dies loses only the work it had not finished."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    cfg = bench.cfg
    started = not ray.is_initialized()
    if started:
        options = {"address": cfg.ray_address, "include_dashboard": False, "logging_level": "warning"}
        if not cfg.ray_address:  # a local instance: this process's import path for its workers
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            if cfg.workers:
                options["num_gpus"] = cfg.workers  # logical GPUs (a CPU run's tasks still ask for one each)
        _init_ray(ray, options)
    task = ray.remote(num_gpus=1, max_retries=0, num_returns="streaming")(spawned.ray_job)
    progress = Progress(bench, jobs)
    pending = {}
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < 1:
            raise UsageError("--executor ray: the Ray cluster offers no GPU (each job takes a whole one); "
                             "on a CPU machine give --workers N for N logical GPUs")
        logical = "logical " if bench.device.type != "cuda" else ""  # --workers N on a CPU: N slots named GPU
        status(f"sweep: {len(jobs)} job(s) as Ray tasks on {int(gpus)} {logical}GPU(s)")
        bench.say_started()
        # cloudpickle, as Ray pickles: a part registered from a script (__main__) travels by value
        pending = {task.remote(ray.cloudpickle.dumps(worker.payload(bench, job, "ray"))): job
                   for job in largest_first(jobs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress.poll_s)
            for gen, job in list(pending.items()):
                if gen in ready or not progress.stalled(job) or ray.wait([gen], timeout=0)[0]:
                    continue  # (the last: a message waits, not yet read)
                del pending[gen]
                _cancel(ray, gen)
                progress.lost(job, progress.stall_reason("ray"), {"worker": "ray"})
            for gen in ready:
                job = pending[gen]
                try:
                    message = ray.get(next(gen))
                except StopIteration:
                    del pending[gen]
                    progress.lost(job, "the Ray task ended before the job finished", {"worker": "ray"})
                    continue
                except ray.exceptions.RayError as e:
                    del pending[gen]
                    reason = " ".join(f"Ray task failed: {e.__class__.__name__}: {e}".split())
                    progress.lost(job, reason, {"worker": "ray"})
                    continue
                progress.handle(job, message, {"worker": "ray"})
    finally:
        for gen in pending:  # an interrupted or refused sweep: its tasks stop
            _cancel(ray, gen)
        progress.close()
        if started:
            ray.shutdown()


RAY_CONNECT_S = 5.0  # how long the cluster's address may take to accept a connection


def _init_ray(ray, options: dict) -> None:
    """ray.init, with a cluster that cannot be reached (Ray would retry for minutes) or refuses
    the connection as a usage error."""
    from bench.run.config import ray_endpoint

    address = options["address"]
    where = ray_endpoint(address) if address else None
    if where is not None:
        try:
            socket.create_connection(where, timeout=RAY_CONNECT_S).close()
        except OSError as e:
            raise UsageError(f"--ray-address {address}: cannot reach the Ray cluster ({e.strerror or e}); give a "
                             "running cluster's address, or leave --ray-address out to start Ray here") from None
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        what = f"--ray-address {address}" if address else "--executor ray"
        raise UsageError(f"{what}: Ray did not start or connect ({e.__class__.__name__}: {' '.join(str(e).split())})") from None


def _cancel(ray, gen) -> None:
    try:
        ray.cancel(gen, force=True)
    except (TypeError, ValueError, ray.exceptions.RayError):
        pass
