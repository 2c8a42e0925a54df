"""The graph engine's one-query decode attention, matmul against split-KV, per batch size and
attended length, in one process (the `--decode-attention` choice, measured without a model).

For a preset's attention geometry (query and kv heads, head size) each point holds the preset's
layer count of KV buffers [batch, kv heads, max_len, head], as the engine's static cache does
(so the L2 cache never holds the keys a call reads), and times one call per layer, cycled, by
bench.measure.timing.call_us (CUDA graphs of 32 calls): `matmul` is FastDecoder._matmul_attention
compiled as the graph engine compiles its step (two batched GEMMs around a softmax), `split-kv`
is bench.engines.split_kv_attention's kernels as the op launches them (given the query unrotated,
with its cos and sin, where Config.rotary says so, and writing the step's new key and value where
Config.write_kv says so, and at batch 1 making the causal mask from its column where
Config.causal_mask says so too, as the engine gives them; the matmul rows write nothing, where the step
writes by a kernel of its own, so `vs_matmul` leaves that kernel out). Each point also
checks split-kv against fp32 softmax attention. `kv_gb_per_s`: the bytes of keys and values a
call must read over its time.
`--configs` also times split-kv under other launch configurations (split_kv_attention.Config:
keys per block, programs per SM, tensor cores or not, warps), each checked likewise, as
`split-kv[<config>]` rows: what would make the engine's default faster.

    python3 lab/gpu_decode_attention.py --preset llava-1.5-7b --out decode_attention.csv
    python3 lab/gpu_decode_attention.py --preset llava-1.5-7b --batch-sizes 1 --keys 640 \
        --configs grid --out decode_attention_configs.csv
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engines import split_kv_attention as sk  # noqa: E402
from bench.engines.decoder import FastDecoder, _rotate, inductor_options  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402
from bench.measure.timing import call_us  # noqa: E402
from bench.models.presets import get_preset  # noqa: E402

COLUMNS = ["preset", "batch", "keys", "max_len", "kind", "us_per_layer", "us_per_step", "kv_gb_per_s",
           "vs_matmul", "max_rel_err"]


def matmul_attention(q, k, v, mask, scale):
    """The graph engine's own FastDecoder._matmul_attention (it reads only the decoder's scaling)."""
    return FastDecoder._matmul_attention(SimpleNamespace(scaling=scale), q, k, v, mask)


def split_kv(config, raw, q, cos, sin, new, one_row: bool):
    """(keys, values, mask, scale) -> split-kv attention under `config` as the engine calls it: the
    query unrotated with cos and sin where Config.rotary says so (rounded as the eager numerics
    round), else rotated before; the step's new key and value `new` (key, value, column) written
    by the kernel where Config.write_kv says so (the key rotated with the query); and, for one row
    (`one_row`) where Config.causal_mask says so too, no mask: the kernel attends to the columns up
    to the new one (the mask given must attend to the same ones)."""
    written = {"new": new} if config.write_kv else {}
    made = {"causal": True} if config.write_kv and config.causal_mask and one_row else {}

    def attend(k, v, mask, scale):
        mask = None if made else mask
        if config.rotary:
            return sk.attend(raw, k, v, mask, scale, config=config, cos=cos, sin=sin, **written, **made)
        return sk.attend(q, k, v, mask, scale, config=config, **written, **made)
    return attend


def configs(spec: str) -> list:
    """--configs: '' (none), 'grid' (blocks 32/64/128 x programs per SM 1/2/4 x dot or not x 4 or 8
    warps), or ';'-separated 'block=32,programs_per_sm=4,dot=0,num_warps=4' settings."""
    if not spec:
        return []
    if spec == "grid":
        return [sk.Config(block, per_sm, dot, warps) for block in (32, 64, 128) for per_sm in (1, 2, 4)
                for dot in (True, False) for warps in (4, 8)]
    return [sk.Config.parse(one) for one in spec.split(";")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--keys", default="640,768,1024", help="attended lengths (the engine's KEY_ROUND multiples)")
    ap.add_argument("--max-len", type=int, default=1024, help="the buffers' length")
    ap.add_argument("--configs", default="", help="split-kv launch configurations to time too ('grid' or "
                    "'block=32,programs_per_sm=4,dot=0,num_warps=4;...')")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    others = configs(args.configs)
    dev = torch.device("cuda")
    dims = get_preset(args.preset).llm
    head = dims.hidden // dims.heads
    scale = head ** -0.5
    # one specialization per (batch, keys) point, as the engine's per attended length: past dynamo's
    # default of 8 a point would run uncompiled (the engine raises it likewise)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    compiled = torch.compile(matmul_attention, dynamic=False, options=inductor_options("eager-casts"))
    out = CsvWriter(Path(args.out), COLUMNS)
    for b, n in itertools.product(map(int, args.batch_sizes.split(",")), map(int, args.keys.split(","))):
        torch.manual_seed(0)
        bufs = [(torch.randn(b, dims.kv_heads, args.max_len, head, device=dev, dtype=torch.float16),
                 torch.randn(b, dims.kv_heads, args.max_len, head, device=dev, dtype=torch.float16))
                for _ in range(dims.layers)]
        raw = torch.randn(b, dims.heads, 1, head, device=dev, dtype=torch.float16)  # before its rotation
        angle = torch.rand(b, 1, head // 2, device=dev) * 6.28
        cos, sin = (f(torch.cat((angle, angle), -1)).half() for f in (torch.cos, torch.sin))
        q = _rotate(raw, cos, sin)  # as the matmul path and split-kv without Config.rotary get it
        mask = torch.zeros(b, 1, 1, n, device=dev, dtype=torch.float16)
        mask[..., n - 40:] = float("-inf")  # the bucket's columns past the query
        # a new key and value, written (Config.write_kv) at the last column attended, which every
        # buffer already holds: the key zeros (the same bits rotated or not), so each call writes
        # what is there, and the causal mask made from that column (Config.causal_mask) attends to
        # the columns the mask does
        new = (torch.zeros(b, dims.kv_heads, 1, head, device=dev, dtype=torch.float16),
               torch.randn(b, dims.kv_heads, 1, head, device=dev, dtype=torch.float16),
               torch.tensor([n - 41], device=dev))
        for k, v in bufs:
            k[:, :, n - 41], v[:, :, n - 41] = new[0][:, :, 0], new[1][:, :, 0]
        k0, v0 = bufs[0][0][:, :, :n], bufs[0][1][:, :, :n]
        want = sk.reference(q, k0, v0, mask, scale).float()
        errs = {}
        kinds = [("split-kv", sk.DEFAULT), *((f"split-kv[{c.label()}]", c) for c in others)]
        for name, config in kinds:
            got = split_kv(config, raw, q, cos, sin, new, b == 1)(k0, v0, mask, scale).float()
            errs[name] = ((got - want).abs().max() / want.abs().max()).item()
        kv_bytes = 2 * b * dims.kv_heads * n * head * 2
        times = {}
        for kind, fn in (("matmul", lambda *a: compiled(q, *a)), *((name, split_kv(c, raw, q, cos, sin, new, b == 1))
                                                                  for name, c in kinds)):
            turn = itertools.cycle(bufs)

            def call(fn=fn, turn=turn):
                k, v = next(turn)
                return fn(k[:, :, :n], v[:, :, :n], mask, scale)

            times[kind] = call_us(call, dev, calls=dims.layers)
        for kind, us in times.items():
            row = {"preset": args.preset, "batch": b, "keys": n, "max_len": args.max_len, "kind": kind,
                   "us_per_layer": round(us, 2), "us_per_step": round(us * dims.layers, 1),
                   "kv_gb_per_s": round(kv_bytes / us / 1e3, 1), "vs_matmul": round(times["matmul"] / us, 3),
                   "max_rel_err": f"{errs[kind]:.2e}" if kind in errs else ""}
            out.write(row)
            print(row, flush=True)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
