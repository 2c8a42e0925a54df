"""Facts about the machine and software, written to env.json with every run."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git(args: list[str], where: Path | None = None) -> str | None:
    """git's output for `args` in the checkout holding `where` (default: this code's); None when
    git fails or is missing (not a checkout, e.g. a copied tree)."""
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=where or Path(__file__).resolve().parent)
    except Exception:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_sha() -> str | None:
    sha = _git(["rev-parse", "HEAD"])
    return sha if sha is not None and len(sha) == 40 else None


def _git_dirty(where: Path | None = None) -> bool | None:
    """Whether tracked files of the checkout holding `where` (default: this code's) differ from
    the commit git_sha names (the code that ran is not that commit's); None outside a checkout."""
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return None if status is None else bool(status)


def collect(command: str, gpu_facts: dict, extra: dict) -> dict:
    import os

    import torch

    return {
        "command": command,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "accelerate": _version("accelerate"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_sha": _git_sha(),
        "git_dirty": _git_dirty(),
        **gpu_facts,
        **extra,
    }
