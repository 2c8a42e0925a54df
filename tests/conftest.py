import functools
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.quiet import quiet_libraries  # noqa: E402

quiet_libraries()
# Two threads, shared among pytest-xdist's workers (`-n 2` gives each one): more threads than cores
# only makes every worker wait.
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

DEMO = ROOT / "bench" / "assets" / "demo.png"


@functools.lru_cache(maxsize=None)
def triton_aot_or_skip(capability: int = 90):
    """bench.quant.triton_aot, or the calling test skipped where Triton, or its ptxas for
    `capability`, is missing."""
    pytest.importorskip("triton")
    from bench.quant import triton_aot

    if why := triton_aot.unavailable(capability):
        pytest.skip(why)
    return triton_aot


def f16x2_meta_args(n: int, k: int, g: int, shares: int) -> tuple:
    """bench.quant.triton_f16x2._f16x2_kernel's positional arguments for an N x K weight in groups
    of g, on the meta device (what triton_aot.compile_call specializes on), with split K's scratch
    where shares > 1."""
    meta = dict(device="meta")
    scratch = ((torch.empty(shares * n, **meta), torch.empty(n // 8, dtype=torch.int32, **meta)) if shares > 1
               else (None, None))
    return (torch.empty(k // 2, dtype=torch.int32, **meta), torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32,
                                                                         **meta),
            torch.empty(k // g, n, 1, dtype=torch.int32, **meta), torch.empty(n, dtype=torch.float16, **meta),
            *scratch, n, k)


def cpu_inductor_rounds_as_eager(dtype: torch.dtype, numerics: str, silu: bool = True) -> bool:
    """Whether this torch's CPU inductor rounds the rotary embedding and (`silu`) SiLU in `dtype`
    as eager does under `numerics` (torch 2.11: bf16 and fp16 by an ulp off; 2.13: the same bits).
    Where it does not, a compiled part cannot equal eager bit for bit on the CPU, whatever our code does."""
    from bench.engines.decoder import _rotate, inductor_options

    def parts(x, cos, sin, up):
        g = x.to(torch.float32)
        return _rotate(x, cos, sin), *(((g / (1 + torch.exp(-g))).to(x.dtype) * up,) if silu else ())

    gen = torch.Generator().manual_seed(0)
    x, up = (torch.randn(1, 4, 7, 64, generator=gen).to(dtype) for _ in range(2))
    cos, sin = (torch.randn(1, 7, 64, generator=gen).to(dtype) for _ in range(2))
    try:
        got = torch.compile(parts, options=inductor_options(numerics))(x, cos, sin, up)
    finally:
        torch._dynamo.reset()
    return all(torch.equal(a, b) for a, b in zip(got, parts(x, cos, sin, up)))


def interrupt():
    """What Ctrl-C does to the code running: raise KeyboardInterrupt."""
    raise KeyboardInterrupt


def on_run_batch_call(monkeypatch, at: dict) -> tuple[dict, object]:
    """Patch HFEngine.run_batch (every engine's batch entry) so that before its n-th call, counted
    from 1, `at[n]()` runs (it may raise, e.g. `interrupt`); returns (the call counter {"n": calls
    so far}, which a test may reset; the unpatched run_batch, to set back)."""
    from bench.engines.hf import HFEngine

    real, calls = HFEngine.run_batch, {"n": 0}

    def counted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] in at:
            at[calls["n"]]()
        return real(self, *a, **k)

    monkeypatch.setattr(HFEngine, "run_batch", counted)
    return calls, real


@pytest.fixture(autouse=True)
def _no_earlier_kernel_measurements(monkeypatch):
    """Each test starts with none of the int4 kernel measurements a process keeps (a run reuses
    what it measured for any candidate set: another test's would stand in for this one's), and
    with no file marked unsaved or warned about."""
    from bench.quant.w4a16 import measurements

    monkeypatch.setattr(measurements, "_KEPT", {})
    monkeypatch.setattr(measurements, "_NOT_SAVED", set())
    monkeypatch.setattr(measurements, "_BAD_WARNED", set())


@pytest.fixture(scope="session")
def frames(tmp_path_factory):
    """A folder of 12 small video frames (frame_000.png ...), for --frames-dir."""
    from PIL import Image

    d = tmp_path_factory.mktemp("frames")
    for i in range(12):
        Image.new("RGB", (64, 48), (20 * i, 90, 200 - 10 * i)).save(d / f"frame_{i:03d}.png")
    return d


@pytest.fixture(scope="session")
def demo_image():
    from PIL import Image

    return Image.open(DEMO).convert("RGB")


def _write(preset: str, tmp_path_factory) -> Path:
    from bench.models.loader import build_preset, save_checkpoint

    out = tmp_path_factory.mktemp(preset) / preset
    adapter = build_preset(preset, None, torch.device("cpu"), torch.float32, seed=0)
    save_checkpoint(adapter, out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return _write("tiny-llava", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_vila_dir(tmp_path_factory):
    return _write("tiny-vila", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory):
    return _write("tiny-internvl", tmp_path_factory)


@pytest.fixture(scope="session")
def checkpoint_dirs(tiny_llava_dir, tiny_vila_dir, tiny_internvl_dir):
    return {"llava": tiny_llava_dir, "vila": tiny_vila_dir, "internvl": tiny_internvl_dir}


def assert_answers_as_built(preset: str, ckpt: Path, visual, question: str):
    """The checkpoint make-checkpoint wrote from `preset` gives the in-memory model's vision
    features and prompt logits for `visual` + `question`; returns (loaded adapter, logits)."""
    from bench.models.loader import build_preset, load_checkpoint

    cpu = torch.device("cpu")
    built = build_preset(preset, None, cpu, torch.float32)
    loaded = load_checkpoint(ckpt, None, cpu, torch.float32)
    with torch.no_grad():
        outs = []
        for a in (built, loaded):
            prepared = a.prepare(visual, question)
            embeds = a.encode_image(a.pixels_to_device(prepared))
            outs.append((embeds, a.model(inputs_embeds=a.prompt_embeds(prepared, embeds)).logits))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    return loaded, outs[1][1]

