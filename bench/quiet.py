"""What every command that loads models does first: no hub access, and the libraries' known noise
filtered where it is logged (each filter names the library version it was written against)."""
from __future__ import annotations

import logging
import os


class _Drop(logging.Filter):
    """Drops a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# (logger, message prefix): each is logged from inside a library, not by us.
FILTERS = [
    # bitsandbytes 0.50.2 (autograd/_functions.py, MatMul8bitLt.forward): logged on every forward of
    # every 8-bit layer whose input is not float16 (bnb8 on a CPU in float32), in the middle of the
    # measured requests; the bnb8 variant says it once as it loads (variants/bnb.py).
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
    # bitsandbytes 0.50.2 (backends/cpu/ops.py, at import on CPUs with AVX512-BF16): tries to fetch a
    # 4-bit GEMM kernel from the Hugging Face hub (`kernels-community`) and logs the failure; the
    # run is offline (HF_HUB_OFFLINE below) and bitsandbytes falls back to its own kernel.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # kernels 0.19.1 (_internals/hf_hub.py), on that fetch in offline mode: says it skips the
    # publisher check (the kernel is not in the local cache, so none is loaded).
    ("kernels._internals.hf_hub", "Skipping publisher trust check for"),
]


def quiet_libraries() -> None:
    """Call before the model libraries are imported (the hub settings are read at import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Models, tokenizers and kernels come from local files only: no hub access at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, prefix in FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
    # torchao 0.18 reports optional CUDA extensions it cannot load on CPU builds, and torch 2.13 warns
    # about torchao's enum registrations: neither concerns the int4 kernels used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
