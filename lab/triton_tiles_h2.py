"""Can a one-row W4A16 GEMV on the int4 layer's own packed weight (tinygemm's tile layout, as
bench.quant.triton_w4a16 reads it) issue half the instructions per weight of triton-tiles, by
dequantizing and multiplying two weights per instruction (f16x2) instead of one in fp32?

triton-tiles at one row issues about 6 instructions per weight in its K loop at its best
configuration (lab/triton_tiles_aot.py), 245 registers; at 2.5-2.8 TB/s of int4 weights an H100
issues at most about 6 (132 SMs x 128 thread-instructions a cycle), an H200 about 4: the kernel is
bound by issue, and measured at 1.6-1.8x the read ceiling (lab/gpu_read_ceiling.py). Here each
int32 word (8 nibbles: columns c, c + 1 of four column pairs) becomes four f16x2 weights and four
f16x2 multiply-adds with x's column pairs leave two fp16 partial sums of four products each, added
into fp32: about 21 instructions per 8 weights, written as inline PTX (Triton has no f16x2 type;
bench.quant.triton_f16x2 says how; the H100 CSVs of results/lab/h100 were measured with its
earlier dequantization, 23 instructions per 8 weights).
Two ways of laying out a program's words are compared: `h2` (rows first: a thread loads four
consecutive words of a row at once) and `h2-rows-last` (rows last: a thread's elements are rows of
one word position, sharing x's loads), both the benchmark's `triton-f16x2` kernel
(bench.quant.triton_f16x2, its ROWS_FIRST), over many more configurations than its tuning
keeps. Results on an H100: results/lab/h100/triton_tiles_h2_*.csv.

    python lab/triton_tiles_h2.py aot                 # no GPU: registers and SASS per weight per config
    python lab/triton_tiles_h2.py aot --product-configs  # the same for triton-f16x2's own candidates, every K loop
    python lab/triton_tiles_h2.py interpret           # no GPU: the index math in Triton's interpreter
    python lab/triton_tiles_h2.py gpu --out h2.csv    # correctness at every shape, then times against
                                                      # triton-tiles and the read ceiling
    python lab/triton_tiles_h2.py gpu --product-configs --presets llava-1.5-7b --out stages.csv
        # the same for triton-f16x2's own candidates with each K loop (KS, XW)

The interpreter cannot run PTX: `interpret` runs the same kernel with the f16x2 block replaced by
the same arithmetic in Triton operations (fp32), so it checks the layout and index math, not the
PTX; `gpu` checks the PTX against dequantize + matmul.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if len(sys.argv) > 1 and sys.argv[1] == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quant.int4 import TINYGEMM_MID  # noqa: E402
from bench.quant import triton_f16x2  # noqa: E402
from bench.quant.triton_f16x2 import _f16x2_kernel, loop_name  # noqa: E402


# bench.quant.triton_f16x2's kernel in its two layouts (its ROWS_FIRST)
WAYS = {"h2": True, "h2-rows-last": False}


def h2_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, n: int, group_size: int,
          config: dict, emulate: bool = False, way: str = "h2") -> torch.Tensor:
    """x [1, K] float16 times the packed weight [N, K]^T -> [1, N] float16 (group_size >= 128)."""
    assert x.shape[0] == 1 and x.dtype == torch.float16 and group_size >= 128
    k = x.shape[1]
    y = triton_f16x2._launch(x.contiguous().view(torch.int32), packed, scale_and_zero.view(torch.int32), n, k,
                             group_size, {**config, "ROWS_FIRST": WAYS[way]},
                             {"PDL": False, "PREFETCH": 0, "PRELOAD": False}, emulate)
    return y.view(1, n)


def pack_published(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15) -> tinygemm's CUDA words, every 8 x 128 tile 128 int32 words with its
    nibbles where bench.quant.int4.tinygemm_tile_source puts them (as the tests pack them)."""
    from bench.quant.int4 import tinygemm_tile_source

    n, k = q.shape
    tiles = q.view(n // 8, 8, k // 128, 128).permute(0, 2, 1, 3).reshape(n // 8, k // 128, 1024)
    nib = tiles[..., tinygemm_tile_source().to(q.device)].long().view(n // 8, k // 128, 128, 8)
    return (nib << (4 * torch.arange(8, device=q.device))).sum(-1).to(torch.int32).contiguous()


def weights(n: int, k: int, g: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, scale_and_zero [K / G, N, 2] fp16, the dense fp32 weight they stand for)."""
    from bench.quant.int4 import quantize_int4

    t = quantize_int4(torch.randn(n, k, device=device) * 0.05, g)
    zero_f = (TINYGEMM_MID - t.zero.float()) * t.scale
    sz = torch.stack((t.scale, zero_f), -1).transpose(0, 1).contiguous().half()
    dense = (t.q.float() - TINYGEMM_MID) * sz[..., 0].T.float().repeat_interleave(g, 1) \
        + sz[..., 1].T.float().repeat_interleave(g, 1)
    return pack_published(t.q), sz, dense


CONFIGS = [{"TN": tn, "BKT": bkt, "SPLIT_K": sk, "num_warps": w, "num_stages": 3}
           for tn, bkt, sk, w in itertools.product((1, 2, 4), (2, 4, 8), (1, 2, 4), (4, 8))
           if tn * bkt <= 16]


def aot(args) -> int:
    from bench.quant import triton_aot

    why = triton_aot.unavailable(90)
    if why:
        print(why, file=sys.stderr)
        return 2
    n, k, g = 4096, 4096, 128
    for way, cfg in candidates(args):
        if cfg["SPLIT_K"] > 2:
            continue  # the K loop is the same kernel; one split shown
        c = dict(cfg)
        launch = {"num_warps": c.pop("num_warps"), "num_stages": c.pop("num_stages")}
        x = torch.empty(k // 2, dtype=torch.int32, device="meta")
        packed = torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, device="meta")
        sz = torch.empty(k // g, n, 1, dtype=torch.int32, device="meta")
        y = torch.empty(n, dtype=torch.float16, device="meta")
        scratch = (torch.empty(c["SPLIT_K"] * n, device="meta"),
                   torch.empty(n // 8, dtype=torch.int32, device="meta")) if c["SPLIT_K"] > 1 else (None, None)
        try:
            got = triton_aot.compile_call(_f16x2_kernel, (x, packed, sz, y, *scratch, n, k),
                                          {"G": g, "EMULATE": False, "ROWS_FIRST": WAYS[way], **c, **launch})
        except Exception as e:  # noqa: BLE001 - each configuration's compile error is a line of the table
            print(way, cfg, "error:", str(e).splitlines()[0][:200])
            continue
        loop = triton_aot.loop_instructions(got.cubin)
        per_thread = c["TN"] * 8 * c["BKT"] * 128 // (launch["num_warps"] * 32)
        common = " ".join(f"{o}:{m}" for o, m in loop.most_common(7))
        print(f"{way} TN={c['TN']} BKT={c['BKT']} SPLIT_K={c['SPLIT_K']} loop={loop_name(c)} "
              f"warps={launch['num_warps']}: regs {got.registers} spills {got.spill_bytes} loop {sum(loop.values())} "
              f"per weight {sum(loop.values()) / per_thread:.2f} ({common})")
    return 0


def interpret(args) -> int:
    import triton.runtime.interpreter as interpreter

    # The interpreter holds scalars in one-element arrays that range() cannot take as bounds (as
    # tests/test_int4_kernels.py patches it): read the element instead
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is not None:
        def patched(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched
    torch.manual_seed(0)
    worst = 0.0
    for n, k, g in ((48, 384, 128), (64, 512, 256), (40, 256, 128)):
        packed, sz, dense = weights(n, k, g, "cpu")
        x = torch.randn(1, k).half()
        want = x.float() @ dense.T
        for cfg in ({"TN": 1, "BKT": 2, "SPLIT_K": 1}, {"TN": 2, "BKT": 1, "SPLIT_K": 2},
                    {"TN": 4, "BKT": 4, "SPLIT_K": 1}, {"TN": 1, "BKT": 1, "SPLIT_K": 3}):
            for way in WAYS:
                y = h2_mm(x, packed, sz, n, g, cfg, emulate=True, way=way)
                err = ((y.float() - want).abs().max() / want.abs().max()).item()
                worst = max(worst, err)
                print(way, n, k, g, cfg, f"max rel err {err:.2e}")
    print(f"worst {worst:.2e}")
    return 0 if worst < 1e-3 else 1


def candidates(args) -> list[tuple[str, dict]]:
    """(way, configuration) to time: the grid CONFIGS in both ways, or (--product-configs) the
    tuning's own candidates of bench.quant.triton_f16x2 without split, with every K loop it has
    (KS and XW), whatever its K_LOOPS keeps."""
    if not args.product_configs:
        return list(itertools.product(WAYS, CONFIGS))
    from bench.quant import triton_f16x2

    out = []
    for c in triton_f16x2._configs(split=False):
        cfg = triton_f16x2.launch_config(c)
        out.append(("h2" if cfg.pop("ROWS_FIRST") else "h2-rows-last", cfg))
    return out


def gpu(args) -> int:
    from gpu_int4_candidates import shapes_of
    from gpu_read_ceiling import calls_for

    from bench.measure.results import CsvWriter
    from bench.measure.timing import call_us, copies_past_l2
    from bench.quant import triton_w4a16
    from bench.quant.w4a16 import choice

    dev = torch.device("cuda")
    writer = CsvWriter(Path(args.out), ["preset", "shape", "out_features", "in_features", "kernel", "config", "us",
                                        "int4_gb_per_s", "max_rel_err"])
    torch.manual_seed(0)
    bad = 0
    for preset in args.presets:
        for shape, (n, k) in shapes_of(preset).items():
            packed, sz, dense = weights(n, k, args.group_size, dev)
            x = torch.randn(1, k, device=dev).half()
            loud = x.clone()  # activations with outliers, as down_proj's inputs have: the fp16 partial sums
            loud[0, torch.randperm(k, device=dev)[:8]] = 2000.0
            wants = [(x, x.float() @ dense.T), (loud, loud.float() @ dense.T)]
            count = copies_past_l2(dev, packed.numel() * 4)
            layers = [(packed.clone(), sz.clone()) for _ in range(count)]
            row = {"preset": preset, "shape": shape, "out_features": n, "in_features": k}

            def timed(name, cfg, fn):
                nonlocal bad
                err = max(((fn(a, *layers[0]).float() - want).abs().max() / want.abs().max()).item()
                          for a, want in wants)
                turn = itertools.cycle(layers)
                us = call_us(lambda: fn(x, *next(turn)), dev, calls=calls_for(count))
                writer.write({**row, "kernel": name, "config": cfg, "us": round(us, 3),
                              "int4_gb_per_s": round(choice.int4_gb_per_s(n, k, args.group_size, us), 1),
                              "max_rel_err": f"{err:.2e}"})
                bad += err > 1e-2
                return us, err

            base = min(timed(f"triton-tiles{'-splitk' if split else ''} (autotuned)", "",
                             lambda a, p, s, split=split: triton_w4a16.tiles_mm(a, p, s, n, args.group_size, split))[0]
                       for split in (False, True))
            best, by_loop = None, {}
            for way, cfg in candidates(args):
                try:
                    us, err = timed(way, " ".join(f"{a}={b}" for a, b in cfg.items()),
                                    lambda a, p, s, c=cfg, w=way: h2_mm(a, p, s, n, args.group_size, c, way=w))
                except Exception as e:  # noqa: BLE001 - a configuration that fails is a line, the rest go on
                    print(preset, shape, cfg, "failed:", str(e).splitlines()[0][:200], flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, f"{way} {cfg}", err)
                loop = loop_name(cfg)
                by_loop[loop] = min(by_loop.get(loop, us), us)
            if best is None:
                print(f"{preset} {shape} {n}x{k}: triton-tiles {base:.2f} us; every h2 configuration failed", flush=True)
                bad += 1
            else:
                print(f"{preset} {shape} {n}x{k}: triton-tiles (faster of its two) {base:.2f} us; h2 best "
                      f"{best[0]:.2f} us ({base / best[0]:.2f}x, err {best[2]:.1e}) {best[1]}; best by K loop: "
                      + ", ".join(f"{loop}: {us:.2f} us" for loop, us in sorted(by_loop.items())), flush=True)
            layers = None  # freed before the next shape
            torch.cuda.empty_cache()
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("aot")
    a.add_argument("--product-configs", action="store_true",
                   help="compile triton-f16x2's own tuning candidates with each K loop instead of the grid")
    sub.add_parser("interpret")
    g = sub.add_parser("gpu")
    g.add_argument("--out", required=True)
    g.add_argument("--presets", nargs="+", default=["llava-1.5-7b", "vila1.5-3b"])
    g.add_argument("--group-size", type=int, default=128)
    g.add_argument("--product-configs", action="store_true",
                   help="time triton-f16x2's own tuning candidates with each K loop instead of the grid")
    args = ap.parse_args()
    return {"aot": aot, "interpret": interpret, "gpu": gpu}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
