"""Where an int4 decode step's time goes, from a reference run with measured kernels: per batch
size, fp16's and the int4 variant's TPOT (medians from summary.csv), the time the chosen W4A16
kernels take per step (the kernel table's microseconds at that many rows, one call per weight
shape per decoder layer, summed over the layers) and what the rest of the step takes (lm_head,
attention, norms, the step's other kernels), with the bandwidth at which the chosen kernels read
the int4 weights (int4_gb_per_s).
With --gb-s B it also gives the least time the int4 weights take read once at B GB/s ("int4 at
B ms", the same bytes int4_gb_per_s counts) and the TPOT that would give if the rest of the step
stayed as measured ("tpot at B ms"), and its speed-up over fp16: what kernels at that bandwidth
would reach without also shortening the rest.
Usage: python lab/int4_decode_budget.py RESULTS_DIR [PRESET] [--gb-s B]
(RESULTS_DIR holds summary.csv, runs.csv and int4_kernels_*.csv, e.g.
results/reference/h100/llava-1.5-7b-int4-graph-batch, as lab/gpu_int4_reference.sh writes them:
a run of fp16 and awq4 or rtn4 with --int4-kernels measured, then `python -m bench int4-kernels
CACHE/kernels.json --out RESULTS_DIR/int4_kernels_PRESET.csv`; PRESET defaults to the runs' model)"""
import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from bench.quant.w4a16.choice import int4_gb_per_s
from bench.quiet import quiet_libraries
from bench.run.limits import model_dims


def _fail(message: str) -> None:
    """One line on stderr, exit 2: a directory this cannot read."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(directory: str, preset: str | None = None, gb_s: float | None = None) -> None:
    quiet_libraries()
    d = Path(directory)
    missing = [f for f in ("runs.csv", "summary.csv") if not (d / f).is_file()]
    if missing:
        _fail(f"{d}: no {' or '.join(missing)} (a results directory of a run with --int4-kernels measured)")
    runs = pd.read_csv(d / "runs.csv", usecols=["model", "variant"])
    preset = preset or runs["model"].iloc[0]
    layers = model_dims(None, preset).layers
    tables = sorted(d.glob("int4_kernels_*.csv"))
    if not tables:
        _fail(f"{d}: no int4_kernels_*.csv (write one with: python -m bench int4-kernels "
                 f"INT4_CACHE_DIR/kernels.json --out {d}/int4_kernels_{preset}.csv)")
    table = _most_points(_run_candidates(d, pd.concat([pd.read_csv(f) for f in tables])))
    chosen = table[table["chosen"].astype(bool) & table["us"].notna()].copy()
    chosen["gb_s"] = [int4_gb_per_s(n, k, g, us) for n, k, g, us in
                      zip(chosen["out_features"], chosen["in_features"], chosen["group_size"], chosen["us"])]
    summary = pd.read_csv(d / "summary.csv")
    tpot = summary[summary["metric"] == "tpot_ms"].pivot_table(index="batch_size", columns="variant", values="median")
    int4 = next((v for v in tpot.columns if v.startswith(("awq4", "rtn4")) and "prefix" not in v), None)
    fp16 = next((v for v in tpot.columns if v.startswith("fp16")), None)
    if int4 is None or fp16 is None:
        _fail(f"{d}: needs an fp16 variant and an awq4 or rtn4 one (without prefix) measured side by side")
    out = []
    for batch in tpot.index:
        rows = chosen[chosen["rows"] == batch]
        if rows.empty:  # a batch size the table has no row count for
            continue
        kernels_ms = rows["us"].sum() * layers / 1e3
        out.append({"batch": int(batch), f"tpot {fp16} ms": tpot.at[batch, fp16], f"tpot {int4} ms": tpot.at[batch, int4],
                    "speed-up": tpot.at[batch, fp16] / tpot.at[batch, int4], "int4 kernels ms": kernels_ms,
                    "rest ms": tpot.at[batch, int4] - kernels_ms,
                    **(_at_bandwidth(rows, layers, tpot.at[batch, int4] - kernels_ms, tpot.at[batch, fp16], gb_s)
                       if gb_s else {}),
                    "kernels": ", ".join(f"{n}x{k} {name} {us:.1f}us {gb:.0f}GB/s" for n, k, name, us, gb in
                                         zip(rows["out_features"], rows["in_features"], rows["kernel"], rows["us"],
                                             rows["gb_s"]))})
    print(f"{preset}: {layers} decoder layers, one call per weight shape per layer per step")
    print(pd.DataFrame(out).round(3).to_string(index=False))


def _run_candidates(d: Path, table: pd.DataFrame) -> pd.DataFrame:
    """The table's measurements the run chose from, where kernels.json kept several entries for a
    shape (one per candidate set): per shape, the largest set within the run's
    --int4-kernel-candidates (env.json; any, where the run named none). Candidate sets differ by
    shape (a kernel that cannot take a shape is none of its candidates), so each shape picks its own."""
    if "candidates" not in table.columns:
        return table
    shape = ["out_features", "in_features", "group_size"]
    if (table.groupby(shape)["candidates"].nunique() < 2).all():
        return table
    import json

    try:
        config = json.loads((d / "env.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        config = None
    if not isinstance(config, dict):
        _fail(f"{d}: its kernel table holds several candidate sets for a shape and no env.json says which "
              "the run chose from")
    named = {n for n in str(config.get("int4_kernel_candidates") or "").split(",") if n}
    keep = []
    for key, rows in table.groupby(shape):
        sets = {c: set(str(c).split()) for c in rows["candidates"].unique()}
        within = [c for c, kernels in sets.items() if not named or kernels <= named]
        if not within:
            _fail(f"{d}: no candidate set of its kernel table for {key[0]}x{key[1]} is within the run's "
                  "--int4-kernel-candidates")
        keep.append(rows[rows["candidates"] == max(within, key=lambda c: len(sets[c]))])
    return pd.concat(keep)


def _most_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per shape and candidate set, the entry measured at the most row counts (kernels.json keeps
    one per row-count set: an earlier one seeded from a reference next to the run's own, which
    took its times; counting both would count each kernel twice)."""
    if "points" not in table.columns:
        return table
    table = table.assign(points=table["points"].fillna("").astype(str))  # a table written before the column
    key = [c for c in ("device", "dtype", "versions", "graph", "dense_copy", "candidates", "out_features",
                       "in_features", "group_size") if c in table.columns]
    keep = []
    for _, rows in table.groupby(key, dropna=False):
        most = max(rows["points"].unique(), key=lambda p: len(p.split()))
        keep.append(rows[rows["points"] == most])
    return pd.concat(keep)


def _at_bandwidth(rows, layers: int, rest_ms: float, fp16_ms: float, gb_s: float) -> dict:
    """The chosen shapes' int4 weights read once at gb_s GB/s per step, and the TPOT with the rest as measured."""
    ms = sum(int4_gb_per_s(n, k, g, 1.0) * 1e-6 / gb_s for n, k, g in
             zip(rows["out_features"], rows["in_features"], rows["group_size"])) * layers * 1e3
    return {f"int4 at {gb_s:g} ms": ms, f"tpot at {gb_s:g} ms": ms + rest_ms,
            f"speed-up at {gb_s:g}": fp16_ms / (ms + rest_ms)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory")
    ap.add_argument("preset", nargs="?")
    ap.add_argument("--gb-s", type=float, default=None, help="a memory bandwidth, GB/s")
    a = ap.parse_args()
    if a.gb_s is not None and not (math.isfinite(a.gb_s) and a.gb_s > 0):
        ap.error("--gb-s must be a bandwidth above 0 GB/s")
    main(a.directory, a.preset, a.gb_s)
