"""What every subcommand does before it works: quiet the libraries' logging."""
from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    # torchao reports optional CUDA extensions it cannot load on CPU builds, and torch warns
    # about torchao's enum registrations: neither concerns the int4 kernels used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
