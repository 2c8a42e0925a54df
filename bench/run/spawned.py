"""The entries of the processes a sweep starts: local worker processes and Ray tasks.

Each quiets the model libraries (bench.quiet) before anything imports them. The job therefore
arrives pickled and is unpickled only after: unpickling it imports the variant parts, and with
them torchao and transformers, whose import-time messages would otherwise print once per worker.
"""
from __future__ import annotations

import pickle


def _quiet() -> None:
    """Before bench.run.worker is imported: it imports transformers and huggingface_hub, which read
    their settings (HF_HUB_OFFLINE) at import."""
    from bench.quiet import quiet_libraries

    quiet_libraries()


def process_main(work: bytes, conn) -> None:
    """A local worker process: the job's messages go through `conn` (a pipe's sending end)."""
    try:
        _quiet()
        from bench.run import worker

        worker.measure_job(pickle.loads(work), conn.send)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the sweep reports it, once
        pass
    finally:
        conn.close()


def ray_job(work: bytes):
    """A Ray task: the job measured on the GPU Ray gave it (in a thread), its messages yielded
    as they come."""
    import queue
    import threading

    _quiet()
    import ray

    from bench.run import worker

    job = {**pickle.loads(work), "name": f"ray:{ray.get_runtime_context().get_node_id()[:8]}"}
    messages: queue.Queue = queue.Queue()
    end = object()

    def measure():
        try:
            worker.measure_job(job, messages.put)
        finally:
            messages.put(end)

    threading.Thread(target=measure, daemon=True).start()
    while (message := messages.get()) is not end:
        yield message
