"""The one thread that runs the engine (engines are not thread-safe) and the FIFO queue in front of it.

The engine is loaded, warmed up and served on that same thread (EngineThread): on the CPU, a
model that had run on the main thread (warm-up, AWQ calibration) ran twice as slowly when served
from another thread (each thread that enters OpenMP parallel code gets its own team of workers,
two teams contending for the cores; tiny-llava's vision and prefill 1.1 -> 2.5 ms on 2 cores),
and on CUDA it keeps the thread that captured the graphs and made the cuBLAS handles the one
that replays and calls them.

Jobs run in arrival order. With --max-batch N the worker, after taking a job, waits up to the
batching window for more and runs up to N consecutive jobs with the same max_tokens as one batch
(the engines' run_batch). Tokens reach each job as the engine produces them (the engines' per-token
hook). A job whose client went away is dropped before it runs; a batch whose jobs have all gone
away stops at its next token, so a disconnected client frees its slot.

Garbage collection follows the measured runs' discipline (bench.run.host): the server freezes the
loaded heap before it serves (as vLLM does after loading), the collector is off while a batch runs
and what is due is collected after it (bench.run.host.collect_due), so a collection's pause never
lands inside a request's TTFT or between its tokens.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Callable

from bench.measure.metrics import PHASES
from bench.run import host
from bench.serve.metrics import ServerMetrics
from bench.serve.protocol import ChatRequest


WAKE_S = 0.1  # how often a caller waiting on the engine thread wakes to run signal handlers


class EngineThread:
    """One daemon thread running the calls given to it, in order (the engine's whole life: load,
    warm up, serve). Hand-written rather than a one-worker ThreadPoolExecutor, whose thread is
    joined at exit: a Ctrl-C while a model loads would wait for the load to finish."""

    def __init__(self, stop: threading.Event | None = None):
        """`stop`: set (by a signal handler: bench.run.interrupt) to end a wait in call() with
        KeyboardInterrupt."""
        self.stop = stop or threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def call(self, fn, *args):
        """fn(*args) on the engine thread; its result, or its exception raised here; or
        KeyboardInterrupt once `stop` is set. The caller wakes every WAKE_S while it waits: a
        Ctrl-C or SIGTERM the kernel delivered to another thread (the engine's, a math library's)
        interrupts no wait but the one it lands in, and Python runs the handler only when the main
        thread next executes, which an untimed wait would put off until the call returned (a
        model's whole load)."""
        future = self.submit(fn, *args)
        while not wait([future], timeout=WAKE_S).done:
            if self.stop.is_set():
                raise KeyboardInterrupt
        return future.result()


class _Abandoned(Exception):
    """Every job of the running batch was cancelled."""


@dataclass(eq=False)
class Job:
    request: ChatRequest
    # Run on the server's event loop (the worker posts it there): ("accepted", None) when its batch
    # starts, ("token", int) per generated token, then ("done", dict) or ("error", str); or
    # ("invalid", str) alone for a request the model cannot take (too long), ("error", str) alone for one
    # whose prompt could not be made.
    put: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    prepared: object = None  # the prompt as the engine tokenizes it (Worker._fits makes it; the engine reuses it)
    queued: float = 0.0  # time.perf_counter() when submitted
    taken: float = 0.0  # time.perf_counter() when its batch closed (the batching window over) or it was dropped
    first_token_at: float = 0.0  # time.perf_counter() when the engine thread had its first token
    tokenize_ms: float = 0.0  # making `prepared` (an in-process run counts it in its preprocess phase)


def _put_accepted(batch: list) -> None:
    """On the event loop: each job of a batch about to run told so (one post for them all)."""
    for job in batch:
        job.put("accepted", None)


def _put_tokens(live: list) -> None:
    """On the event loop: each (job, token) of a decode step handed over (one post for them all)."""
    for job, token in live:
        job.put("token", token)


class Worker:
    def __init__(self, engine, metrics: ServerMetrics, max_batch: int = 1, window_s: float = 0.005,
                 max_positions: int | None = None, thread: EngineThread | None = None):
        """`thread`: the one the engine was loaded on (a new one when None)."""
        self.engine, self.metrics = engine, metrics
        self.max_positions = max_positions  # the model's; a longer request is refused ("invalid")
        self.max_batch, self.window_s = max_batch, window_s
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None  # taken from the queue, not batchable with the batch before it
        self._thread = thread
        self._serving: Future | None = None
        self.post: Callable | None = None  # runs a call on the server's event loop (start's `post`)
        self.stateful = getattr(engine.policy, "stateful", False)

    def start(self, post: Callable) -> None:
        """Serve from now on; `post(fn, *args)` runs fn on the server's event loop (its
        call_soon_threadsafe): each job's events, and each decode step's tokens for a whole batch
        in one call (one wake-up of the loop per step, not one per request)."""
        self.post = post
        self._thread = self._thread or EngineThread()
        self._serving = self._thread.submit(self._loop)

    def stop(self, timeout: float = 30.0) -> None:
        self.jobs.put(None)
        if self._serving is not None:
            try:
                self._serving.result(timeout)
            except TimeoutError:  # a batch still running: the process may end under it
                pass

    def submit(self, job: Job) -> None:
        job.queued = time.perf_counter()
        self.jobs.put(job)
        self.metrics.queue_depth.inc()

    def _taken(self, job: Job) -> None:
        """The job's wait is over: its batch starts (or it is dropped). A job held back for the
        next batch is still waiting (for the batch before it), in queue_ms and the queue's depth."""
        job.taken = time.perf_counter()
        self.metrics.queue_depth.dec()
        self.metrics.queue_time.observe(job.taken - job.queued)

    def _next_batch(self) -> list[Job] | None:
        """The next batch (None: stop). Cancelled jobs are dropped here."""
        while True:
            first, self._held = self._held or self.jobs.get(), None
            if first is None:
                return None
            if not first.cancelled.is_set():
                break
            self._taken(first)
            self.metrics.requests.labels("cancelled").inc()
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self.jobs.put(None)
                break
            if job.cancelled.is_set():
                self._taken(job)
                self.metrics.requests.labels("cancelled").inc()
                continue
            if job.request.max_tokens != first.request.max_tokens:
                self._held = job  # runs next, still in arrival order
                break
            batch.append(job)
        for job in batch:  # the batch is closed: its jobs' wait ends, the batching window's part too
            self._taken(job)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if self._fits(job)]
            if batch:
                self.post(_put_accepted, batch)
                with host.one_request():  # the collector off while the batch runs, as in measured runs
                    self._run(batch)

    def _fits(self, job: Job) -> bool:
        """Whether the job's prompt (tokenized as the engine will) and max_tokens fit the model's
        positions; one that does not gets ("invalid", why), one whose tokenizing fails otherwise
        ("error", why). On this thread: the tokenizer is the engine's."""
        from bench.errors import UsageError
        from bench.models.base import QuestionError
        from bench.models.visual import as_visual

        r = job.request
        visual = as_visual(r.visual)
        group = self.engine.adapter.visual_group
        if len(visual) % group:  # said in a client's terms (the adapter's refusal names run's flags)
            return self._refuse(job, f"this model merges the visual tokens of every {group} images or frames: "
                                     f"send a multiple of {group} image_url parts (or a video) per request, not "
                                     f"{len(visual)}")
        try:
            start = time.perf_counter()
            job.prepared = self.engine.adapter.prepare_text(r.question, visual)
            job.tokenize_ms = (time.perf_counter() - start) * 1e3
            prompt = job.prepared.prompt_tokens
        except (UsageError, QuestionError) as e:  # the family cannot show this visual input (e.g. a frame count)
            return self._refuse(job, str(e))  # or the question holds the model's image placeholder
        except Exception as e:  # noqa: BLE001 - the request fails (a 500), the server keeps serving
            self._fail([job], e)
            return False
        if self.max_positions is None or prompt + r.max_tokens <= self.max_positions:
            return True
        return self._refuse(job, f"the request needs {prompt + r.max_tokens:,} positions ({prompt:,} prompt tokens "
                                 f"+ {r.max_tokens:,} max_tokens) but the model has {self.max_positions:,}")

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        """Each of `jobs` failed with ("error", why), counted."""
        for job in jobs:
            self.post(job.put, "error", f"{e.__class__.__name__}: {e}")
        self.metrics.requests.labels("error").inc(len(jobs))

    def _refuse(self, job: Job, reason: str) -> bool:
        """The job refused with ("invalid", reason); False. (Counted where its 400 is answered, with
        every other refusal: the app's ApiError handler.)"""
        self.post(job.put, "invalid", reason)
        return False

    def _run(self, batch: list[Job]) -> None:
        engine = self.engine

        def hook(tokens: list[int]) -> None:
            if all(job.cancelled.is_set() for job in batch):
                raise _Abandoned
            if not batch[0].first_token_at:  # the batch's first step
                now = time.perf_counter()
                for job in batch:
                    job.first_token_at = now
            self.post(_put_tokens, [(job, token) for job, token in zip(batch, tokens) if not job.cancelled.is_set()])

        engine.token_hook = hook
        try:
            result = engine.run_batch([(j.request.visual, j.request.question) for j in batch],
                                      batch[0].request.max_tokens, [j.prepared for j in batch])
        except _Abandoned:
            self.metrics.requests.labels("cancelled").inc(len(batch))
            return
        except Exception as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            self._fail(batch, e)
            return
        finally:
            engine.token_hook = None
        new_tokens = batch[0].request.max_tokens
        # the engine's phases (the batch's, as in-process batch rows report them)
        phases = {f"{name}_ms": result.phases_ms.get(name, 0.0) for name in PHASES}  # 0 for one not run
        # the batch's prompts were tokenized before it ran (_fits); in-process runs count that in preprocess
        phases["preprocess_ms"] += sum(job.tokenize_ms for job in batch)
        # counted before any client hears of the end, so /metrics read after a response has it;
        # a job whose client left while the rest of its batch ran on is cancelled, not ok, and its
        # tokens are not among the completed requests' (its prefix lookup was made all the same)
        m, done = self.metrics, [job for job in batch if not job.cancelled.is_set()]
        m.requests.labels("ok").inc(len(done))
        if len(done) < len(batch):
            m.requests.labels("cancelled").inc(len(batch) - len(done))
        # each request's own prompt (the batch's result has the longest, which its rows are padded to)
        m.prompt_tokens.inc(sum(job.prepared.prompt_tokens for job in done))
        m.generated_tokens.inc(new_tokens * len(done))
        if self.stateful:
            (m.prefix_hits if result.cache_hit else m.prefix_misses).inc(len(batch))
        for job in batch:
            usage = {"prompt_tokens": job.prepared.prompt_tokens, "completion_tokens": new_tokens,
                     "total_tokens": job.prepared.prompt_tokens + new_tokens}
            timings = {"queue_ms": (job.taken - job.queued) * 1e3, **phases, "cache_hit": result.cache_hit}
            # a hit restores every request's own prefix (the result's count is its first request's)
            cached = job.prepared.prefix_tokens if result.cached_tokens else 0
            self.post(job.put, "done", {"usage": usage, "cached_tokens": cached,
                                        "cache_hit": result.cache_hit, "timings": timings})
