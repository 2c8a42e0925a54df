#!/usr/bin/env bash
# Fresh machine -> working environment in ./.venv.
# CPU-only machines get the CPU build torch==2.13.0+cpu from PyTorch's CPU index (PyPI's Linux
# torch wheels pull GBs of CUDA packages); machines with an NVIDIA driver keep the CUDA torch they
# have, or get one.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        # Reuse the system's CUDA torch when it has one.
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        python -m pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install -q -e ".[quant,dev,ray]"
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import triton" >/dev/null 2>&1; then
    # CPU-only: the tests run our Triton int4 kernel in Triton's interpreter (the version the GPU
    # reference machine has; CUDA builds of torch bring their own Triton, left as it is)
    python -m pip install -q "triton==3.6.0"
fi
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
echo "ready (nothing to activate): .venv/bin/python vila_prefix_benchmark.py runs the benchmark, .venv/bin/python -m pytest -n 2 the tests"
