"""The split-KV decode attention kernels (bench.engines.split_kv_attention) in Triton's
interpreter on CPU tensors, against softmax attention in fp32, and compiled for sm_90 without a GPU."""
import subprocess
import sys

import pytest

from bench.engines.split_kv_attention import BLOCK_L, splits_for
from tests.conftest import triton_aot_or_skip

_INTERPRETED = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton.runtime.interpreter as interpreter

_patch = getattr(interpreter, "_patch_lang_tensor", None)  # NumPy 2.4 and Triton 3.6's int(): as in test_int4_kernels

def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

if _patch is not None:
    interpreter._patch_lang_tensor = _patched
import dataclasses
from bench.engines.split_kv_attention import _COUNTS, DEFAULT, Config, attend, reference

torch.manual_seed(0)
worst = 0.0

def check(q, k, v, mask, splits=None, config=DEFAULT):
    global worst
    got = attend(q, k, v, mask, q.shape[-1] ** -0.5, splits, config)
    want = reference(q, k, v, mask, q.shape[-1] ** -0.5)
    assert got.shape == q.shape and got.dtype == q.dtype, (got.shape, got.dtype)
    assert torch.equal(got, attend(q, k, v, mask, q.shape[-1] ** -0.5, splits, config))  # repeats exactly
    # the splits combined by the partial kernel's last program: the same output, bit for bit, and
    # every count set back to zero for the next launch
    other = dataclasses.replace(config, fused_combine=not config.fused_combine)
    assert torch.equal(got, attend(q, k, v, mask, q.shape[-1] ** -0.5, splits, other))
    assert not _COUNTS[q.device][-1].any()
    worst = max(worst, ((got.float() - want.float()).abs().max() / want.float().abs().max()).item())

def buffers(b, kvh, cap, d):  # the engine's buffers: [b, kv heads, max_len, d], attended up to L as a view
    return (torch.randn(b, kvh, cap, d).half(), torch.randn(b, kvh, cap, d).half())

# one row, as many kv heads as query heads; keys not a multiple of the block; causal: -inf past the query
k, v = buffers(1, 4, 256, 16)
q = torch.randn(1, 4, 1, 16).half()
mask = torch.zeros(1, 200).half()
mask[:, 151:] = float("-inf")
check(q, k[:, :, :200], v[:, :, :200], mask)
check(q, k[:, :, :200], v[:, :, :200], None)
# the other launch configurations (lab/gpu_decode_attention.py --configs): products by broadcast
# multiply-and-sum, shorter blocks, more programs
check(q, k[:, :, :200], v[:, :, :200], mask, config=Config(block=32, dot=False))
check(q, k[:, :, :200], v[:, :, :200], mask, config=Config(block=128, programs_per_sm=4, num_warps=8))
check(q, k[:, :, :200], v[:, :, :200], mask, (64, 4), Config(q_with_keys=True, num_stages=2))  # q read per block
# each split's first block read before the (PDL) wait (Config.preload): the same bits as without,
# with one block a split, with more (the loop goes on after the first), with q read per block
plain = attend(q, k[:, :, :200], v[:, :, :200], mask, 0.25, (128, 2))
assert torch.equal(attend(q, k[:, :, :200], v[:, :, :200], mask, 0.25, (128, 2), Config(preload=True)), plain)
check(q, k[:, :, :200], v[:, :, :200], mask, (64, 4), Config(preload=True))
check(q, k[:, :, :200], v[:, :, :200], mask, (128, 2), Config(preload=True, q_with_keys=True, block=32))
# a padded batch: grouped query heads (4 per kv head), each row its own mask with a gap
k, v = buffers(2, 2, 256, 32)
q = torch.randn(2, 8, 1, 32).half()
mask = torch.zeros(2, 1, 1, 130).half()
mask[0, ..., 100:] = float("-inf")
mask[1, ..., 20:60] = float("-inf")
check(q, k[:, :, :130], v[:, :, :130], mask)
# 7 query heads per kv head (Qwen2's grouping); splits that attend to nothing (all -inf) and a
# single split
k, v = buffers(1, 4, 192, 16)
q = torch.randn(1, 28, 1, 16).half()
mask = torch.zeros(1, 192).half()
mask[:, 41:] = float("-inf")
check(q, k, v, mask, (64, 3))
check(q, k, v, mask, (192, 1))
check(q, k, v, mask, None, Config(dot=False))  # 7 heads padded to 8, not 16
# more splits than the combining kernel holds at once (Config.combine_chunk; 16 splits at once by
# default, read in one go), the last ones past the query
k, v = buffers(1, 2, 1024, 16)
q = torch.randn(1, 4, 1, 16).half()
mask = torch.zeros(1, 1000).half()
mask[:, 901:] = float("-inf")
check(q, k[:, :, :1000], v[:, :, :1000], mask, (64, 16))
check(q, k[:, :, :1000], v[:, :, :1000], mask, (64, 16), Config(combine_chunk=4))
check(q, k[:, :, :1000], v[:, :, :1000], mask, (32, 32))
check(q, k[:, :, :1000], v[:, :, :1000], mask, (96, 11), Config(combine_chunk=4))  # a partial last chunk
check(q, k[:, :, :900], v[:, :, :900], mask[:, :900], (53, 17))  # 17 splits: 16, then 1 of a masked chunk
check(q.float(), k[:, :, :300].float(), v[:, :, :300].float(), None)  # fp32: IEEE products
# the query handed over unrotated with its position's cos and sin (Config.rotary): the same bits
# as attending to the query the decoder rotates (bench.engines.decoder._rotate, eager fp16), for
# a projection's view of q (heads strided), per-row and broadcast cos/sin, q before and with the keys
from bench.engines.decoder import _rotate
k, v = buffers(2, 2, 256, 32)
proj = torch.randn(2, 1, 8 * 32).half() * 3
q = proj.view(2, 1, 8, 32).transpose(1, 2)
mask = torch.zeros(2, 1, 1, 200).half()
mask[1, ..., 150:] = float("-inf")
for cos, sin in ((torch.randn(2, 1, 32).half(), torch.randn(2, 1, 32).half()),
                 (torch.rand(1, 1, 32).half(), -torch.rand(1, 1, 32).half())):
    for config in (DEFAULT, Config(q_with_keys=True), Config(dot=False, fused_combine=False)):
        want = attend(_rotate(q, cos, sin), k[:, :, :200], v[:, :, :200], mask, 32 ** -0.5, (64, 4), config)
        got = attend(q, k[:, :, :200], v[:, :, :200], mask, 32 ** -0.5, (64, 4), config, cos, sin)
        assert torch.equal(got, want), (got - want).abs().max()
    # rounded once (the "fused" numerics): q cos + rotate_half(q) sin in fp32
    once = ((q.float() * cos.unsqueeze(1).float() + _rotate(q.float(), torch.zeros_like(cos).float(),
                                                             sin.float()))).half()
    want = attend(once, k[:, :, :200], v[:, :, :200], mask, 32 ** -0.5, (64, 4))
    got = attend(q, k[:, :, :200], v[:, :, :200], mask, 32 ** -0.5, (64, 4), None, cos, sin, eager_rounding=False)
    assert torch.equal(got, want), (got - want).abs().max()
# the step's new key and value written by the kernel (Config.write_kv): the same buffers and the same
# output, bit for bit, as writing them first (the key rotated as the decoder rotates it) and attending
# after; a column in the first split, in a later one (grouped heads, a batch, per-row cos/sin), past
# the attended columns (written there, not attended) and past the buffers (written nowhere)
def written(b, kvh, heads, col, n, splits, rope, config=DEFAULT, causal=False):
    k, v = buffers(b, kvh, 256, 32)
    proj = torch.randn(b, 1, (heads + 2 * kvh) * 32).half() * 3
    q, kn, vn = proj.split([heads * 32, kvh * 32, kvh * 32], -1)
    q, kn, vn = (t.view(b, 1, -1, 32).transpose(1, 2) for t in (q, kn, vn))  # the step's views
    mask = torch.zeros(b, 1, 1, n).half()
    mask[..., min(col, n - 1) + 1:] = float("-inf")
    pos = torch.tensor([col])
    want_k, want_v = k.clone(), v.clone()
    if col < 256:
        want_k[:, :, col:col + 1] = _rotate(kn, *rope) if rope else kn
        want_v[:, :, col:col + 1] = vn
    qr = _rotate(q, *rope) if rope else q
    want = attend(qr, want_k[:, :, :n], want_v[:, :, :n], mask, 32 ** -0.5, splits, config)
    got = attend(q, k[:, :, :n], v[:, :, :n], None if causal else mask, 32 ** -0.5, splits, config, *rope,
                 new=(kn, vn, pos, 256), causal=causal)
    assert torch.equal(k, want_k) and torch.equal(v, want_v), (b, col, n)
    assert torch.equal(got, want), (b, col, n, (got - want).abs().max())

rope1 = (torch.randn(1, 1, 32).half(), torch.randn(1, 1, 32).half())
for rope in ((), rope1):
    written(1, 2, 2, 5, 100, (64, 2), rope)
    written(1, 2, 2, 70, 100, (64, 2), rope, Config(fused_combine=False))
    written(2, 2, 8, 130, 200, (64, 4), (torch.randn(2, 1, 32).half(), torch.randn(2, 1, 32).half()) if rope else ())
    written(1, 2, 2, 150, 100, (64, 2), rope)  # past the attended columns
    written(1, 2, 2, 300, 100, (64, 2), rope)  # past the buffers
    # the first block read before the write (Config.preload), the written column read again: in the
    # first block of a split, in a later block of one, past the attended columns
    for col in (5, 70, 100, 150):
        written(1, 2, 2, col, 100 + 28 * (col == 100), (128, 1) if col == 70 else (64, 2), rope, Config(preload=True))
    written(2, 2, 8, 131, 200, (64, 4), (), Config(preload=True, block=32))
    # the new column's index read before the wait (Config.pos_early): the same buffers and bits
    written(1, 2, 2, 70, 100, (64, 2), rope, Config(pos_early=True))
    written(1, 2, 2, 300, 100, (64, 2), rope, Config(pos_early=True, preload=True))
    # the causal mask made by the kernel from the new column (`causal`, Config.causal_mask): the
    # same bits as handing it over; in a later split, with the first block read early, past the keys
    written(1, 2, 2, 70, 100, (64, 2), rope, causal=True)
    written(2, 2, 8, 131, 200, (64, 4), (), Config(preload=True, block=32), causal=True)
    written(1, 2, 2, 150, 100, (64, 2), rope, Config(pos_early=True), causal=True)
    written(1, 2, 2, 300, 100, (64, 2), rope, causal=True)  # past the buffers
print(worst)
"""


_STEP = _INTERPRETED.split("from bench.engines.split_kv_attention import")[0] + r"""
import sys
from pathlib import Path
from bench.engines.decoder import fast_decoder
from bench.models.loader import load_checkpoint
import bench.engines.split_kv_attention as sk  # registers the op

calls = []
_attend = sk.attend
sk.attend = lambda *a, **k: calls.append(a[0].shape[0] * (-1 if k.get("cos") is not None else 1)) or _attend(*a, **k)

def off(got, want):  # the largest difference relative to the largest value
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

adapter = load_checkpoint(Path(sys.argv[1]), None, torch.device("cpu"), torch.float16)
torch.set_grad_enabled(False)
dec = fast_decoder(adapter)
compiled = torch.compile(dec.layer_at, dynamic=False)  # as the graph engine compiles its step layer
worst = 0.0
rows = {}
for batch in (1, 2):
    kv = dec.new_buffers(256, batch)
    torch.manual_seed(batch)
    embeds = torch.randn(batch, 70, dec.embed.weight.shape[1]).half() * 0.5
    dec.prefill(embeds, kv, 0)
    token = torch.randn(batch, 1, embeds.shape[-1]).half() * 0.5
    saved = kv.positions()
    rows[batch] = (kv, saved, token)
    out = {}
    for split in (False, True):  # eager SDPA, then the compiled layer with the op in its graph
        dec.split_kv = split
        kv.set_positions(saved)
        out[split] = torch.stack([dec.step(token, torch.tensor(1), kv, compiled if split else None, key_len=128)
                                  [:, -1].float() for _ in range(3)])
    worst = max(worst, off(out[True], out[False]))
print(len(dec.layers), sum(abs(c) == 1 for c in calls), sum(abs(c) == 2 for c in calls))
print(worst)
calls.clear()
# the query handed to the op unrotated (Config.rotary): under eager numerics the same logits, bit
# for bit; under "fused" (rounded once, as inductor may round otherwise) within fp16 rounding
import dataclasses
from bench.engines.decoder import inductor_options
dec.split_kv = True
differ = []
for numerics in ("eager-casts", "fused"):
    dec.numerics = numerics
    out = {}
    for rotary in (False, True):
        torch._dynamo.reset()
        sk.DEFAULT = dataclasses.replace(sk.DEFAULT, rotary=rotary)
        layer = torch.compile(dec.layer_at, dynamic=False, options=inductor_options(numerics))
        kv.set_positions(saved)
        out[rotary] = torch.stack([dec.step(token, torch.tensor(1), kv, layer, key_len=128)[:, -1].float()
                                   for _ in range(3)])
    differ.append(off(out[True], out[False]))
print(calls.count(-2), *differ)
# the new key and value written by the attention kernel (Config.write_kv) in the graph engine's own
# step layer (layer_at_deferred: the layer's buffers as one `pair`): the same logits and the same
# buffers, bit for bit, under eager numerics, with the key rotated by the kernel and by inductor
from bench.engines.decoder import deferring
writes = []
_writing = sk.attend
sk.attend = lambda *a, **k: writes.append(k.get("new") is not None) or _writing(*a, **k)
dec.numerics = "eager-casts"
for rotary in (True, False):
    out, data = {}, {}
    for write_kv in (False, True):
        torch._dynamo.reset()
        sk.DEFAULT = dataclasses.replace(sk.DEFAULT, rotary=rotary, write_kv=write_kv)
        layer = deferring(torch.compile(dec.layer_at_deferred, dynamic=False, options=inductor_options("eager-casts")))
        kv.set_positions(saved)
        kv.data[..., embeds.shape[1]:, :] = 0  # (nothing the run before wrote: each run writes its own)
        out[write_kv] = torch.stack([dec.step(token, torch.tensor(1), kv, layer, key_len=128)[:, -1].float()
                                     for _ in range(3)])
        data[write_kv] = kv.data.clone()
    print(int(torch.equal(out[True], out[False]) and torch.equal(data[True], data[False])),
          max(off(out[True], out[False]), off(data[True], data[False])))
print(sum(writes))
# one row's causal mask made by the kernel from the new column (Config.causal_mask): no mask handed
# over, the same logits and buffers bit for bit
made = []
_causal = sk.attend
sk.attend = lambda *a, **k: made.append(k.get("causal", False)) or _causal(*a, **k)
same = 1
for batch in (1, 2):  # two rows (a mask per row): read as before
    kv, saved, token = rows[batch]
    out, data = {}, {}
    for causal_mask in (False, True):
        torch._dynamo.reset()
        sk.DEFAULT = dataclasses.replace(sk.DEFAULT, rotary=True, write_kv=True, causal_mask=causal_mask)
        layer = deferring(torch.compile(dec.layer_at_deferred, dynamic=False, options=inductor_options("eager-casts")))
        kv.set_positions(saved)
        kv.data[..., embeds.shape[1]:, :] = 0
        out[causal_mask] = torch.stack([dec.step(token, torch.tensor(1), kv, layer, key_len=128)[:, -1].float()
                                        for _ in range(3)])
        data[causal_mask] = kv.data.clone()
    same *= int(torch.equal(out[True], out[False]) and torch.equal(data[True], data[False]))
print(same, sum(made))
"""


def test_a_compiled_decode_step_attends_by_the_split_kv_op(tiny_llava_dir):
    """The decoder's step layer compiled by torch.compile (inductor on the CPU) with `split_kv`
    on calls the op from its graph (run in Triton's interpreter) at every layer of every step,
    and gives the logits of the eager step attending by SDPA within fp16 rounding, for one row
    and for a batch (its additive mask per row), three steps each; with the query handed over
    unrotated and rotated by the kernel (Config.rotary) the same logits bit for bit under eager
    numerics, within fp16 rounding under "fused"; with the new key and value written by the kernel
    (Config.write_kv, in the graph engine's own step layer) the same logits and buffers bit for bit
    (with the key rotated there: where this torch's CPU inductor rotates as eager does, else within
    fp16 rounding), and so with one row's causal mask made by the kernel (Config.causal_mask)."""
    pytest.importorskip("triton")
    import torch

    from tests.conftest import ROOT, cpu_inductor_rounds_as_eager

    done = subprocess.run([sys.executable, "-c", _STEP, str(tiny_llava_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    layers, one_row, two_rows = map(int, done.stdout.split()[-14:-11])
    assert one_row == two_rows == 3 * layers > 0  # every layer of every split-kv step, and only those
    assert float(done.stdout.split()[-11]) < 1e-2
    rotated, eager, fused = done.stdout.split()[-10:-7]
    # the query rotated in the kernel: the same bits under eager numerics (where this torch's CPU
    # inductor rotates as eager does: the other side's rotation is its own), within rounding under fused
    assert int(rotated) == 2 * 3 * layers and float(fused) < 1e-2
    as_eager = cpu_inductor_rounds_as_eager(torch.float16, "eager-casts", silu=False)
    assert float(eager) == 0.0 if as_eager else float(eager) < 1e-2
    # the new key and value written by the kernel: the same logits and buffers, with and without rotary
    # (the key rotated by the kernel against inductor's rotation: the same bits where this torch's CPU
    # inductor rotates as eager does, else within fp16 rounding)
    same_rotated, rotated_off, same_plain, _, writes = done.stdout.split()[-7:-2]
    assert int(same_plain) == 1 and int(writes) == 2 * 3 * layers
    assert int(same_rotated) == 1 if as_eager else float(rotated_off) < 1e-2
    # one row's causal mask made by the kernel: the same logits and buffers, at every layer of every step
    # (and only there: two rows read their masks)
    same_causal, causal_calls = map(int, done.stdout.split()[-2:])
    assert same_causal == 1 and causal_calls == 3 * layers


def test_split_kv_attention_equals_softmax_attention_in_tritons_interpreter():
    """Every case the decode step meets: one row and a padded batch, equal and grouped query
    heads (1, 4 and 7 per kv head), keys not a multiple of the block, strided views of longer
    buffers, additive masks with -inf past the query and in gaps, splits that attend to nothing;
    fp16 outputs within their rounding of fp32 attention, and bit-identical when repeated."""
    pytest.importorskip("triton")
    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 2e-3


def test_split_kv_attention_refuses_a_cos_and_sin_it_cannot_rotate_by():
    """cos and sin are one position's per row ([1 or b, 1, d] or [1 or b, d]), both or neither, in
    q's dtype and on its device: anything else is a one-line ValueError, not a wrong rotation."""
    pytest.importorskip("triton")
    import torch

    from bench.engines import split_kv_attention as sk

    meta = torch.device("meta")
    buf = torch.empty(2, 4, 256, 64, dtype=torch.float16, device=meta)
    q = torch.empty(2, 8, 1, 64, dtype=torch.float16, device=meta)
    good = torch.empty(2, 1, 64, dtype=torch.float16, device=meta)
    assert sk.launches(q, buf, buf, None, 0.125, None, None, good, good)[0][0][3]["ROTARY"]
    assert sk.launches(q, buf, buf, None, 0.125, None, None, good[:1, 0], good[:1, 0])[0][0][3]["ROTARY"]
    for cos, sin in ((good, None), (torch.empty(1, 2, 64, dtype=torch.float16, device=meta), good),
                     (torch.empty(2, 1, 32, dtype=torch.float16, device=meta), good),
                     (torch.empty(3, 1, 64, dtype=torch.float16, device=meta), good),
                     (torch.empty(2, 8, 1, 64, dtype=torch.float16, device=meta), good),
                     (good.float(), good), (torch.empty((), dtype=torch.float16, device=meta), good),
                     (torch.empty(2, 1, 64, dtype=torch.float16), good)):
        with pytest.raises(ValueError, match="split-kv attention"):
            sk.launches(q, buf, buf, None, 0.125, None, None, cos, sin)


def test_split_kv_attention_refuses_a_new_key_or_value_it_cannot_write():
    """The step's new key and value (Config.write_kv) are one position's [b, kv heads, 1, d] in q's
    dtype and device, contiguous in d, and their column one integer on q's device: anything else is
    a one-line ValueError before any launch, not a write elsewhere in the buffers."""
    pytest.importorskip("triton")
    import torch

    from bench.engines import split_kv_attention as sk

    meta = torch.device("meta")
    buf = torch.empty(2, 4, 256, 64, dtype=torch.float16, device=meta)
    q = torch.empty(2, 8, 1, 64, dtype=torch.float16, device=meta)
    kv = torch.empty(2, 4, 1, 64, dtype=torch.float16, device=meta)
    col = torch.zeros(1, dtype=torch.long, device=meta)
    assert sk.launches(q, buf, buf, None, 0.125, new=(kv, kv, col))[0][0][3]["WRITE"]
    for new in ((torch.empty(2, 4, 2, 64, dtype=torch.float16, device=meta), kv, col), (kv, kv.float(), col),
                (kv, torch.empty(1, 4, 1, 64, dtype=torch.float16, device=meta), col),
                (torch.empty(2, 4, 1, 128, dtype=torch.float16, device=meta)[..., ::2], kv, col),
                (kv, kv, torch.zeros(2, dtype=torch.long, device=meta)), (kv, kv, col.float()),
                (kv, kv, torch.zeros(1, dtype=torch.long))):
        with pytest.raises(ValueError, match="split-kv attention: the new"):
            sk.launches(q, buf, buf, None, 0.125, new=new)
    # a causal mask made from the new column: with the new key and value, and no mask of the caller's
    assert sk.launches(q, buf, buf, None, 0.125, new=(kv, kv, col), causal=True)[0][0][3]["CAUSAL"]
    for args in ({"mask": torch.empty(2, 256, dtype=torch.float16, device=meta), "new": (kv, kv, col)}, {"mask": None}):
        with pytest.raises(ValueError, match="causal mask from the new column"):
            sk.launches(q, buf, buf, args["mask"], 0.125, new=args.get("new"), causal=True)


def test_the_graph_engine_refuses_decode_steps_past_its_buffers():
    """Steps that would write past the KV buffers' last column are refused on the host before any
    replay (split-KV attention writing the new key and value drops a column past the buffers)."""
    import torch

    from bench.engines.graph import GraphEngine
    from bench.engines.kv_buffers import KVBuffers

    cache = KVBuffers(2, 2, 16, 64, torch.device("cpu"), torch.float16)
    cache.length.fill_(60)
    engine = GraphEngine.__new__(GraphEngine)  # (_decode_lengths reads only key_len)
    engine.key_len = lambda end, t: end + t
    assert GraphEngine._decode_lengths(engine, cache, 4) == [61, 62, 63, 64]
    with pytest.raises(ValueError, match="5 decode steps from column 60 do not fit the 64-column KV buffers"):
        GraphEngine._decode_lengths(engine, cache, 5)


def test_splits_cover_the_keys_and_fill_the_gpu():
    """Splits are whole blocks, cover every key exactly once, and number enough for
    batch x kv heads x splits programs to reach the target where the keys allow."""
    for block in (BLOCK_L, 32, 128):
        for batch, kvh, keys, programs in ((1, 32, 640, 264), (16, 32, 768, 264), (1, 4, 100, 264), (1, 8, 64, 8)):
            per, count = splits_for(batch, kvh, keys, programs, block)
            assert per % block == 0 and per * (count - 1) < keys <= per * count
            assert batch * kvh * count >= programs or per == block or count == 1
    assert splits_for(1, 32, 640, 264) == (64, 10)
    assert splits_for(16, 32, 768, 264) == (768, 1)  # 512 programs already
    assert splits_for(1, 32, 640, 528, 32) == (32, 20)


def test_a_launch_configuration_is_checked_when_made():
    from bench.engines.split_kv_attention import DEFAULT, Config

    assert DEFAULT == Config(BLOCK_L, 2, True, 4, True, 16, False, False, 2, True, True, False, False, True)
    assert DEFAULT.label() == ("block=64,programs_per_sm=2,dot=1,num_warps=4,fused_combine=1,combine_chunk=16,"
                               "prefetch=0,q_with_keys=0,num_stages=2,rotary=1,write_kv=1,preload=0,pos_early=0,"
                               "causal_mask=1")
    other = Config(32, 4, False, 8, True, 4, True, True, 3, False, False, True, True, False)
    assert Config.parse(other.label()) == other and Config.parse("dot=0") == Config(dot=False)
    assert Config.parse("fused_combine=0") == Config(fused_combine=False) != DEFAULT
    # a label written before the combine's chunk and the prefetch were fields: theirs are the defaults
    assert Config.parse("block=64,programs_per_sm=2,dot=1,num_warps=4,fused_combine=1") == DEFAULT
    for bad in ("blocks=32", "block=-1", "dot=yes", "block=48", "combine_chunk=12"):
        with pytest.raises(ValueError, match="split-kv"):
            Config.parse(bad)
    for bad in ({"block": 48}, {"block": 8}, {"programs_per_sm": 0}, {"num_warps": 3}, {"combine_chunk": 1},
                {"num_stages": 0}):
        with pytest.raises(ValueError, match="split-kv"):
            Config(**bad)


@pytest.mark.parametrize("heads,kv_heads,batch,keys,dtype", [
    (32, 32, 1, 640, "float16"), (32, 32, 16, 640, "float16"), (28, 4, 1, 640, "bfloat16"),
    (28, 4, 1, 20800, "float16"), (12, 2, 1, 16832, "float16"), (32, 32, 1, 640, "float32")])
def test_split_kv_attention_compiles_for_sm90_without_a_gpu(heads, kv_heads, batch, keys, dtype):
    """Both kernels as a decode step launches them for llava-1.5-7b (32 heads of 128, batch 1
    and 16, fp16 and fp32), a Qwen2-7B-style grouping (28 query heads on 4 kv heads, bf16; and
    fp16 over a 20k-token video prompt) and InternVL3-2B's (12 on 2, 263 splits to combine),
    over strided buffer views, compiled for an H100 / H200 (sm_90) by Triton and ptxas: the
    scores and values products run on tensor cores (fp32 in fp32, not TF32), nothing spills."""
    import torch

    triton_aot = triton_aot_or_skip()
    from bench.engines import split_kv_attention as sk

    meta = torch.device("meta")
    dt = getattr(torch, dtype)
    buf = torch.empty(batch, kv_heads, keys + 256, 128, dtype=dt, device=meta)
    q = torch.empty(batch, heads, 1, 128, dtype=dt, device=meta)
    mask = torch.empty(batch, 1, 1, keys, dtype=dt, device=meta)
    splits = sk.splits_for(batch, kv_heads, keys, 264)
    calls, _ = sk.launches(q, buf[:, :, :keys], buf[:, :, :keys], mask, 128 ** -0.5, splits,
                           sk.Config(fused_combine=False))
    partial, combine = (triton_aot.compile_call(kernel, args, kwargs) for kernel, _, args, kwargs in calls)
    for c in (partial, combine):
        assert c.spill_bytes == 0 and c.registers <= 255, (c.registers, c.spill_bytes)
    if dt == torch.float32:
        assert "tf32" not in partial.ptx  # fp32 products, as the matmul path's
    else:
        assert triton_aot.loop_instructions(partial.cubin)["HMMA"] > 0  # tensor cores in the keys loop
    # the splits combined by the partial kernel's last program: one launch, nothing spills, the
    # count an acquire-release atomic at GPU scope after a barrier
    calls, _ = sk.launches(q, buf[:, :, :keys], buf[:, :, :keys], mask, 128 ** -0.5, splits,
                           sk.Config(fused_combine=True))
    assert len(calls) == 1
    fused = triton_aot.compile_call(*(calls[0][i] for i in (0, 2, 3)))
    assert fused.spill_bytes == 0 and fused.registers <= 255, (fused.registers, fused.spill_bytes)
    # the query rotated in the kernel (Config.rotary): its cos and sin read, nothing spills; rounded
    # as eager does, its products and sum in PTX with explicit rounding, none contracted into an FMA
    # (Triton's own `*` then `+` became fma.rn.f16 on sm_90: the product never rounded alone)
    import re

    rope = torch.empty(batch, 1, 128, dtype=dt, device=meta)
    calls, _ = sk.launches(q, buf[:, :, :keys], buf[:, :, :keys], mask, 128 ** -0.5, splits, sk.Config(), rope, rope)
    rotated = triton_aot.compile_call(*(calls[0][i] for i in (0, 2, 3)))
    assert rotated.spill_bytes == 0 and rotated.registers <= 255, (rotated.registers, rotated.spill_bytes)
    assert rotated.ptx.count("ld.global") > fused.ptx.count("ld.global")
    assert "mul.rn.f32" in rotated.ptx and "add.rn.f32" in rotated.ptx
    assert not re.search(r"fma\.rn\.b?f16", rotated.ptx)
    # the new key (rotated) and value written by the kernel (Config.write_kv): nothing spills, the
    # same shared memory, the new key's rotation as eager rounds it too
    new = (torch.empty(batch, kv_heads, 1, 128, dtype=dt, device=meta),) * 2 + (
        torch.empty(1, dtype=torch.long, device=meta), keys + 256)
    calls, _ = sk.launches(q, buf[:, :, :keys], buf[:, :, :keys], mask, 128 ** -0.5, splits, sk.Config(), rope, rope,
                           new=new)
    writing = triton_aot.compile_call(*(calls[0][i] for i in (0, 2, 3)))
    assert writing.spill_bytes == 0 and writing.registers <= 255, (writing.registers, writing.spill_bytes)
    assert writing.shared_bytes == rotated.shared_bytes and writing.ptx.count("st.global") > rotated.ptx.count(
        "st.global")
    # a barrier between the new key's and value's stores and the keys' loads (the first asynchronous
    # copy), which the pipeliner has not hoisted above it
    assert "st.global" not in rotated.ptx[:rotated.ptx.index("cp.async")]
    first_copy = writing.ptx.index("cp.async")
    assert "bar.sync" in writing.ptx[writing.ptx.rindex("st.global", 0, first_copy):first_copy]
    assert not re.search(r"fma\.rn\.b?f16", writing.ptx)
    if dt != torch.float32:  # two pipeline stages (Config.num_stages): four programs fit an SM's 228 KB
        assert fused.shared_bytes <= 228 * 1024 // 4 - 1024, fused.shared_bytes
    assert "atom.global.gpu.acq_rel.add" in fused.ptx and "bar.sync" in fused.ptx


def test_the_graph_engine_refuses_split_kv_where_it_cannot_run(checkpoint_dirs, monkeypatch):
    """--decode-attention split-kv on a device the kernels do not run on is the variant's skip
    reason (VariantUnsupported), not a failure inside a capture; auto (the default) attends by
    matmul there; graph-exact keeps transformers' attention whatever it says."""
    import dataclasses

    import torch

    from bench.engines.cache_policy import CachePolicy
    from bench.engines.graph import GraphEngine
    from bench.engines.graph_exact import GraphExactEngine
    from bench.errors import VariantUnsupported
    from bench.models.loader import load_checkpoint

    monkeypatch.setattr(GraphEngine, "requires_cuda", False)  # the engine's own checks on the CPU
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cpu"), torch.float32)
    spec = dataclasses.replace(GraphEngine.default_spec, decode_attention="split-kv")
    with pytest.raises(VariantUnsupported, match="split-kv decode attention runs on CUDA only"):
        GraphEngine(adapter, CachePolicy(), spec)
    assert GraphEngine.default_spec.decode_attention == "auto"  # split-kv where it runs: matmul here
    auto = GraphEngine(adapter, CachePolicy())
    assert not auto.decoder.split_kv and "split-kv" not in auto.describe()
    from bench.engines import split_kv_attention

    if split_kv_attention.triton is not None:  # the model checks, as on a CUDA device
        cuda = torch.device("cuda")
        assert "power-of-two head size" in split_kv_attention.unavailable(cuda, 32, 32, 80)
        assert "multiple of kv heads" in split_kv_attention.unavailable(cuda, 12, 8, 64)
        assert split_kv_attention.unavailable(cuda, 32, 8, 128) is None
    # where the kernels run, auto takes them under deterministic attention kernels only
    monkeypatch.setattr(split_kv_attention, "unavailable", lambda *a: None)
    assert GraphEngine(adapter, CachePolicy()).decoder.split_kv
    sdpa = dataclasses.replace(GraphEngine.default_spec, attention="auto")
    assert not GraphEngine(adapter, CachePolicy(), sdpa).decoder.split_kv
    exact = GraphExactEngine(adapter, CachePolicy(), dataclasses.replace(GraphExactEngine.default_spec,
                                                                          decode_attention="split-kv"))
    assert not exact.decoder.split_kv and "split-kv" not in exact.describe()
    with pytest.raises(ValueError, match="unknown decode attention 'flash'"):
        dataclasses.replace(GraphEngine.default_spec, decode_attention="flash")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_cuda_graph_engine_decodes_with_split_kv_attention(checkpoint_dirs):
    """On CUDA the graph engine's captured decode steps with split-kv attention (compiled, the op
    inside the graph) give the matmul path's logits within fp16 rounding, over attended lengths
    of two KEY_ROUND buckets, and say so in engine_detail; auto (the default) runs split-kv here."""
    import dataclasses

    import torch

    from bench.engines.cache_policy import CachePolicy
    from bench.engines.graph import GraphEngine
    from bench.models.loader import load_checkpoint

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cuda"), torch.float16)
    logits = {}
    for choice in ("matmul", "split-kv", "auto"):
        spec = dataclasses.replace(GraphEngine.default_spec, decode_attention=choice)
        engine = GraphEngine(adapter, CachePolicy(), spec)
        torch.manual_seed(0)
        embeds = torch.randn(1, 120, engine.decoder.embed.weight.shape[1], device="cuda", dtype=torch.float16)
        assert ("split-kv decode attention" in engine.describe()) == (choice != "matmul")  # auto: split-kv here
        with torch.inference_mode():
            cache = engine.new_cache(embeds.shape[1], 16)
            engine.prefill(embeds * 0.5, cache, 0)
            token, got = torch.tensor([5], device="cuda"), []
            for _ in range(12):  # 121..132 keys: the 128 and 256 buckets
                got.append(engine.decode_step(token, cache)[:, -1].float().clone())
                token = (token * 7 + 3) % 50
        logits[choice] = torch.stack(got)
    torch.testing.assert_close(logits["split-kv"], logits["matmul"], rtol=2e-2, atol=2e-2)
    assert torch.equal(logits["auto"], logits["split-kv"])  # deterministic: the same kernels, the same logits


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_cuda_the_query_rotated_in_the_kernel_is_eagers_bit_for_bit():
    """On a GPU (where Triton may contract a product and a sum into one FMA): the query handed
    over unrotated and rotated by the kernel, rounded as eager rounds (Config.rotary), gives the
    output of attending to the query the decoder rotates (bench.engines.decoder._rotate) bit for
    bit, in fp16 and bf16, for llava-1.5-7b's heads and a Qwen2-style grouping, one row and four."""
    import torch

    from bench.engines import split_kv_attention as sk
    from bench.engines.decoder import _rotate

    dev = torch.device("cuda")
    torch.manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        for b, heads, kvh in ((1, 32, 32), (4, 28, 4)):
            keys, values = (torch.randn(b, kvh, 704, 128, device=dev, dtype=dt) for _ in range(2))
            proj = torch.randn(b, 1, heads * 128, device=dev, dtype=dt) * 4
            q = proj.view(b, 1, heads, 128).transpose(1, 2)  # a view of the projection, as the step hands it
            pos = torch.arange(b, device=dev)[:, None].float() * 97 + 600
            freq = pos[..., None] / 10000 ** (torch.arange(0, 128, 2, device=dev) / 128)
            cos, sin = (f(torch.cat((freq, freq), -1)).to(dt) for f in (torch.cos, torch.sin))  # [b, 1, 128]
            args = (keys[:, :, :640], values[:, :, :640], None, 128 ** -0.5)
            want = sk.attend(_rotate(q, cos, sin), *args)
            assert torch.equal(sk.attend(q, *args, cos=cos, sin=sin), want), (dt, b, heads)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
@pytest.mark.parametrize("setting", ["", "causal_mask=0", "preload=1", "preload=1,causal_mask=0", "pos_early=1"])
def test_cuda_the_new_key_and_value_written_by_the_kernel_are_the_steps_bit_for_bit(setting, monkeypatch):
    """On a GPU (where the program holding the new column reads back what its threads just wrote,
    its keys copied asynchronously): the step's new key and value written by the partial kernel
    (Config.write_kv), the key rotated there as eager rounds, leave the buffers and give the output
    of writing them first (the key rotated by the decoder's _rotate) and attending after, bit for
    bit, in fp16 and bf16, one row and four grouped, call after call and replayed in a CUDA graph;
    also launched under PDL with each program's first keys read before its wait and the write
    (Config.preload), the written column in the first block of its split or in the second, its
    own write read again, with the column's index read before the wait (Config.pos_early), and with
    the causal mask made by the kernel from the column (`causal`, Config.causal_mask)."""
    import torch

    from bench.engines import split_kv_attention as sk
    from bench.engines.decoder import _rotate

    config = sk.Config.parse(setting)
    if setting:  # as the graph engine launches it (the kernel before here wrote none of the keys, nor pos)
        monkeypatch.setattr(sk, "pdl_enabled", lambda device: sk.pdl_settings.unavailable(device) is None)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cases = ((1, 32, 32, 600, None), (4, 28, 4, 131, None), (1, 32, 32, 530, (128, 5)), (1, 32, 32, 600, (128, 5)))
    for dt in (torch.float16, torch.bfloat16):
        for b, heads, kvh, col, splits in cases:
            keys, values = (torch.randn(b, kvh, 704, 128, device=dev, dtype=dt) for _ in range(2))
            proj = torch.randn(b, 1, (heads + 2 * kvh) * 128, device=dev, dtype=dt) * 4
            q, kn, vn = (t.view(b, 1, -1, 128).transpose(1, 2) for t in proj.split([heads * 128, kvh * 128,
                                                                                  kvh * 128], -1))
            freq = torch.full((b, 1, 64), float(col), device=dev) / 10000 ** (torch.arange(0, 128, 2, device=dev) / 128)
            cos, sin = (f(torch.cat((freq, freq), -1)).to(dt) for f in (torch.cos, torch.sin))
            mask = torch.zeros(b, 1, 1, 640, device=dev, dtype=dt)
            mask[..., col + 1:] = float("-inf")
            want_k, want_v = keys.clone(), values.clone()
            want_k[:, :, col:col + 1], want_v[:, :, col:col + 1] = _rotate(kn, cos, sin), vn
            want = sk.attend(_rotate(q, cos, sin), want_k[:, :, :640], want_v[:, :, :640], mask, 128 ** -0.5, splits)
            pos = torch.tensor([col], device=dev)

            def call():
                return sk.attend(q, keys[:, :, :640], values[:, :, :640], None if config.causal_mask else mask,
                                 128 ** -0.5, splits, config, cos=cos, sin=sin, new=(kn, vn, pos, 704),
                                 causal=config.causal_mask)

            for _ in range(3):
                assert torch.equal(call(), want) and torch.equal(keys, want_k) and torch.equal(values, want_v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = call()
            for _ in range(5):
                for buf, want_buf in ((keys, want_k), (values, want_v)):  # stale contents at the new column
                    buf.copy_(torch.randn_like(buf))
                    want_buf[:, :, :col], want_buf[:, :, col + 1:] = buf[:, :, :col], buf[:, :, col + 1:]
                want = sk.attend(_rotate(q, cos, sin), want_k[:, :, :640], want_v[:, :, :640], mask, 128 ** -0.5,
                                 splits)
                graph.replay()
                assert torch.equal(out, want) and torch.equal(keys, want_k) and torch.equal(values, want_v), (dt, b)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_cuda_fused_combine_gives_the_second_kernels_output_bit_for_bit():
    """On a GPU, where the programs of a row and kv head finish in any order and at once: the
    splits combined by the last of them give the two-kernel output exactly, call after call and
    replayed in a CUDA graph, for llava-1.5-7b's heads (batch 1 and 16) and a Qwen2-style
    grouping, and every count is back at zero after each call."""
    import dataclasses

    import torch

    from bench.engines import split_kv_attention as sk

    dev = torch.device("cuda")
    torch.manual_seed(0)
    for b, heads, kvh, n in ((1, 32, 32, 640), (16, 32, 32, 200), (1, 28, 4, 1000)):
        keys, values = (torch.randn(b, kvh, n + 64, 128, device=dev, dtype=torch.float16) for _ in range(2))
        q = torch.randn(b, heads, 1, 128, device=dev, dtype=torch.float16)
        mask = torch.zeros(b, 1, 1, n, device=dev, dtype=torch.float16)
        mask[..., n - 30:] = float("-inf")
        args = (q, keys[:, :, :n], values[:, :, :n], mask, 128 ** -0.5)
        for config in (sk.DEFAULT, sk.Config(block=32, programs_per_sm=4)):
            want = sk.attend(*args, config=dataclasses.replace(config, fused_combine=False))
            fused = dataclasses.replace(config, fused_combine=True)
            for _ in range(50):
                assert torch.equal(sk.attend(*args, config=fused), want)
            assert not sk._COUNTS[q.device][-1].any()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = sk.attend(*args, config=fused)
            for _ in range(20):
                graph.replay()
                assert torch.equal(out, want)
            assert not sk._COUNTS[q.device][-1].any()


@pytest.mark.parametrize("heads,kv_heads,config", [
    (32, 32, {"dot": False}), (32, 32, {"dot": False, "block": 32, "num_warps": 2}),
    (32, 32, {"block": 128, "num_warps": 8}), (28, 4, {"dot": False, "block": 32})])
def test_the_other_launch_configurations_compile_for_sm90_without_spilling(heads, kv_heads, config):
    """What lab/gpu_decode_attention.py --configs times, for llava-1.5-7b (one query head per kv
    head) and a Qwen2-7B-style grouping, fp16 at batch 1: compiled for sm_90, nothing spills; by
    broadcast multiply-and-sum no tensor-core instruction is left in the keys loop, except where
    the products would not fit a thread's registers (7 heads padded to 8 x 32 keys x 128 spilled:
    tl.dot is kept there)."""
    import torch

    pytest.importorskip("triton")
    from bench.engines import split_kv_attention as sk
    from bench.quant import triton_aot

    why = triton_aot.unavailable()
    if why:
        pytest.skip(why)
    meta, config = torch.device("meta"), sk.Config(**config)
    buf = torch.empty(1, kv_heads, 896, 128, dtype=torch.float16, device=meta)
    q = torch.empty(1, heads, 1, 128, dtype=torch.float16, device=meta)
    mask = torch.empty(1, 1, 1, 640, dtype=torch.float16, device=meta)
    splits = sk.splits_for(1, kv_heads, 640, 132 * config.programs_per_sm, config.block)
    calls, _ = sk.launches(q, buf[:, :, :640], buf[:, :, :640], mask, 128 ** -0.5, splits, config)
    partial = triton_aot.compile_call(*(calls[0][i] for i in (0, 2, 3)))
    assert partial.spill_bytes == 0 and partial.registers <= 255, (partial.registers, partial.spill_bytes)
    assert (triton_aot.loop_instructions(partial.cubin).get("HMMA", 0) > 0) == (config.dot or heads > kv_heads)
