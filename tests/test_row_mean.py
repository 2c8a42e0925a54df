"""bench.engines.row_mean: ATen's reduction order for a row mean, reproduced by a Triton kernel.

On the CPU: which lane count ATen's CUDA kernel uses per shape, and the Triton kernel (in
Triton's interpreter, where Triton is installed) against a plain-torch statement of that order.
On CUDA: the kernel against ATen's own mean, bit for bit, and the fallback rules."""
import os

import pytest
import torch

from bench.engines import row_mean
from bench.engines.row_mean import LANE_ORDERS, aten_lanes


@pytest.mark.parametrize("rows,cols,lanes", [
    (19, 4096, 32), (16, 4096, 32), (628, 4096, 32), (1, 4096, 512), (3, 4096, 256), (8, 4096, 64),
    (15, 4096, 64), (1, 2560, 512), (19, 2560, 32), (1, 256, 64),
    (1, 8192, None),  # 16 values per lane: ATen splits the row across warps
    (16, 8192, None), (4, 100, None), (2, 130, None),  # too short / not in 4-float vectors
])
def test_aten_lanes(rows, cols, lanes):
    assert aten_lanes(rows, cols) == lanes


def emulate(x: torch.Tensor, order: str) -> torch.Tensor:
    """The documented order in plain float32 torch ops (each elementwise op rounds once, as on the GPU)."""
    rows, cols = x.shape
    lanes = aten_lanes(rows, cols)
    vecs = x.view(rows, cols // 4, 4)
    out = torch.empty(rows, 1)
    factor = torch.tensor(rows, dtype=torch.float32) / torch.tensor(rows * cols, dtype=torch.float32)
    for r in range(rows):
        sums = torch.zeros(lanes, 4)
        for start in range(0, cols // 4, lanes):
            idx = torch.arange(start, min(start + lanes, cols // 4))
            sums[: len(idx)] = sums[: len(idx)] + vecs[r, idx]
        s = ((sums[:, 0] + sums[:, 1]) + sums[:, 2]) + sums[:, 3]
        while s.numel() > 1:
            half = s.numel() // 2
            s = s[0::2] + s[1::2] if order == LANE_ORDERS[1] and half < 32 else s[:half] + s[half:]
        out[r] = s * factor
    return out


def test_the_order_is_not_a_plain_sum():
    """The emulation's orders differ from each other and from a sequential sum somewhere, so the
    comparisons below can fail."""
    torch.manual_seed(0)
    x = torch.randn(8, 4096) ** 2 * torch.logspace(-3, 3, 8)[:, None]
    halving, adjacent = emulate(x, LANE_ORDERS[0]), emulate(x, LANE_ORDERS[1])
    sequential = torch.zeros(8)
    for r in range(8):
        for v in x[r]:
            sequential[r] = sequential[r] + v
    sequential = sequential * (1 / 4096)
    assert not torch.equal(halving, adjacent)
    assert not torch.equal(halving[:, 0], sequential)


def test_cpu_falls_back_to_aten():
    x = torch.randn(19, 4096) ** 2
    assert torch.equal(row_mean.ordered_row_mean(x), x.mean(-1, keepdim=True))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter (TRITON_INTERPRET=1) not on")
@pytest.mark.parametrize("rows,cols", [(19, 4096), (1, 2560), (5, 1536), (17, 384)])
@pytest.mark.parametrize("order", LANE_ORDERS)
def test_kernel_follows_the_order_in_the_interpreter(rows, cols, order):
    if row_mean.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(rows + cols)
    x = torch.randn(rows, cols) ** 2 * torch.logspace(-3, 3, rows)[:, None]
    got = row_mean.ordered_mean(x, order)
    assert torch.equal(got, emulate(x, order))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("cols", [1536, 2560, 3584, 4096])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 12, 16, 17, 19, 32, 64, 628])
def test_kernel_equals_aten_on_cuda(rows, cols):
    if aten_lanes(rows, cols) is None:
        pytest.skip("ATen splits this row across warps; the module keeps ATen's kernel")
    torch.manual_seed(rows * cols)
    x = (torch.randn(1, rows, cols, device="cuda") ** 2) * torch.logspace(-3, 3, rows, device="cuda")[None, :, None]
    assert row_mean.matches_aten(rows, cols, x.device) == LANE_ORDERS[0]  # torch's CUDA build: decreasing offsets
    got = row_mean.ordered_row_mean(x)
    assert got.shape == (1, rows, 1)
    assert torch.equal(got, x.mean(-1, keepdim=True))


@cuda
def test_unaligned_or_strided_input_runs_aten():
    x = torch.randn(19, 4097, device="cuda") ** 2
    view = x[:, 1:]  # not contiguous rows, not 16-byte aligned
    assert torch.equal(row_mean.ordered_row_mean(view), view.mean(-1, keepdim=True))
    with pytest.raises(ValueError):
        row_mean.ordered_mean(view)
