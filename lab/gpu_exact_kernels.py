"""Can the exact engine (graph-exact) run cheaper kernels and still get transformers' bits?

1. `row mean`: bench.engines.row_mean's Triton kernel (ATen's summation order) against ATen's
   x.mean(-1, keepdim=True) for float32 rows of the hidden sizes of our presets: bit-equal (per
   lane order), and both kernels' time inside a CUDA graph.
2. `attention`: transformers' sdpa attention call of a suffix after a cached prefix (t queries
   over prefix + t keys, the boolean mask transformers builds). transformers hands it keys and
   values its DynamicCache concatenated (contiguous); the exact engine's buffers give views with
   another head stride. Rows: the call on views, with the additive mask SDPA would make of the
   boolean one, and both, and both with the mask's rows padded to 16 bytes (same values, another
   row stride), each against the contiguous + boolean call: bit-equal or not, the
   kernels that ran, and the time inside a CUDA graph (the contiguous call including its two
   copies, as the engine pays them).

    python lab/gpu_exact_kernels.py --out exact_kernels_h200.csv
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import graphed_us, kernel_times, profile_parser  # noqa: E402

from bench.engines import row_mean  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402

COLUMNS = ["probe", "shape", "variant", "bit_equal", "us_per_call_graph", "kernels", "error"]


def probe_row_mean(writer: CsvWriter, cols_list: list[int], rows_list: list[int]) -> None:
    for cols in cols_list:
        for rows in rows_list:
            lanes = row_mean.aten_lanes(rows, cols)
            shape = f"{rows}x{cols} (lanes {lanes})"
            torch.manual_seed(rows + cols)
            x = (torch.randn(1, rows, cols, device="cuda") ** 2) * torch.logspace(-3, 3, rows, device="cuda")[None, :, None]
            want = x.mean(-1, keepdim=True)
            writer.write({"probe": "row mean", "shape": shape, "variant": "aten", "bit_equal": True,
                          "us_per_call_graph": graphed_us(lambda: x.mean(-1, keepdim=True))})
            if lanes is None:
                continue
            for order in row_mean.LANE_ORDERS:
                row = {"probe": "row mean", "shape": shape, "variant": f"triton, {order}"}
                try:
                    row["bit_equal"] = torch.equal(row_mean.ordered_mean(x, order), want)
                    row["us_per_call_graph"] = graphed_us(lambda o=order: row_mean.ordered_mean(x, o))
                except Exception as e:  # noqa: BLE001 - recorded
                    row["error"] = f"{e.__class__.__name__}: {str(e)[:160]}"
                writer.write(row)
                print(row, flush=True)


def probe_attention(writer: CsvWriter, heads: int, head_dim: int, prefixes: list[int], queries: list[int],
                    buffer: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    scale = head_dim ** -0.5
    keys = torch.randn(1, heads, buffer, head_dim, device="cuda", dtype=torch.float16)
    values = torch.randn(1, heads, buffer, head_dim, device="cuda", dtype=torch.float16)

    def call(q, k, v, mask):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scale)[0]

    for prefix in prefixes:
        for t in queries:
            end = prefix + t
            q = torch.randn(1, t, heads, head_dim, device="cuda", dtype=torch.float16).transpose(1, 2)
            cols = prefix + torch.arange(t, device="cuda")
            boolean = (torch.arange(end, device="cuda")[None, :] <= cols[:, None])[None, None]
            additive = torch.zeros(boolean.shape, dtype=torch.float16, device="cuda").masked_fill_(~boolean, float("-inf"))
            padded = -(-end // 8) * 8  # rows of the mask 16-byte aligned: the same values, another row stride
            aligned = torch.zeros(1, 1, t, padded, dtype=torch.float16, device="cuda")[..., :end]
            aligned.masked_fill_(~boolean, float("-inf"))
            kv, vv = keys[:, :, :end], values[:, :, :end]
            ways = {"contiguous, boolean mask (transformers)": lambda: call(q, kv.contiguous(), vv.contiguous(), boolean),
                    "views, boolean mask": lambda: call(q, kv, vv, boolean),
                    "contiguous, additive mask": lambda: call(q, kv.contiguous(), vv.contiguous(), additive),
                    "views, additive mask": lambda: call(q, kv, vv, additive),
                    "views, additive mask with aligned rows": lambda: call(q, kv, vv, aligned)}
            want = ways["contiguous, boolean mask (transformers)"]().clone()
            for name, fn in ways.items():
                row = {"probe": "attention", "shape": f"{heads}x{head_dim}, {t} queries, {end} keys", "variant": name}
                try:
                    outs = [fn().clone() for _ in range(3)]
                    row["bit_equal"] = all(torch.equal(o, want) for o in outs)
                    row["us_per_call_graph"] = graphed_us(fn)
                    row["kernels"] = "; ".join(f"{n[:60]} x{c}" for n, (_, c) in kernel_times(fn, 1).items())
                except Exception as e:  # noqa: BLE001 - recorded
                    row["error"] = f"{e.__class__.__name__}: {str(e)[:160]}"
                writer.write(row)
                print(row, flush=True)


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--cols", default="1536,2560,3584,4096", help="row mean widths ('' skips the row mean)")
    ap.add_argument("--rows", default="1,2,3,5,8,12,16,17,19,32,64,628")
    ap.add_argument("--prefixes", default="609,628")
    ap.add_argument("--queries", default="16,17,19,24,32,48,64")
    ap.add_argument("--attention", default="32x128,32x80", help="HEADSxHEAD_DIM (llava-1.5-7b, vila1.5-3b)")
    args = ap.parse_args()
    writer = CsvWriter(Path(args.out), COLUMNS)
    if args.cols:
        probe_row_mean(writer, [int(c) for c in args.cols.split(",")], [int(r) for r in args.rows.split(",")])
    for spec in args.attention.split(","):
        heads, head_dim = (int(v) for v in spec.split("x"))
        probe_attention(writer, heads, head_dim, [int(p) for p in args.prefixes.split(",")],
                        [int(t) for t in args.queries.split(",")], 1024)
    writer.close()


if __name__ == "__main__":
    main()
