"""awq4 against fp16 in the reference runs that measured both in one process: decode and prefill
per GPU, model, decode attention, prefill option and workload point (docs/int4.md's generated table).

Only runs holding `fp16` and `awq4` rows of one engine, not from a prefix cache, count, and a
ratio is read as one only where one process wrote both sides (a process's fp16 times vary by
several percent from the next one's on the same GPU): a run finished by `--resume` may hold
fp16 rows of one process and awq4 rows of the next, which the table says ("across processes",
or "processes unknown" where env.json did not record which rows a resumed process wrote) and
does not tick. The prefill option is read from the run's command (`--int4-prefill-copy`,
`--int4-prefill-kernel NAME`, else the default dequantize-ahead).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd

from bench.analysis.reference import REFERENCE_ROOT, process_of, processes, read_manifest, reference_dirs
from bench.errors import UsageError
from bench.measure.results import read_runs
from bench.measure.schema import POINT_DEFAULTS, fill_identity_columns, point_label
from variants import parse_variant

# The targets the table is read against (int4 at the bandwidth limit): decode at least this many
# times fp16's speed at batch 1 and no slower at larger batches; prefill at most this much slower.
DECODE_TARGET_B1, PREFILL_TARGET = 2.9, 1.05


def prefill_option(command: str) -> str:
    """What the awq4 rows of a run prefill with, from its command."""
    argv = shlex.split(command)
    if "--int4-prefill-copy" in argv:
        return "dense copy"
    for i, a in enumerate(argv):
        if a == "--int4-prefill-kernel" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--int4-prefill-kernel="):
            return a.split("=", 1)[1]
    return "dequantize ahead"


def _weights_part(variant: str) -> str | None:
    """The weights part of a variant name (variants.parse_variant's reading); None for a name
    this version's registry does not know."""
    try:
        return parse_variant(variant).weights.name
    except UsageError:
        return None


def _value(v):
    return None if v is None or pd.isna(v) else float(v)


def _measured_rows(run_dir: Path) -> pd.DataFrame | None:
    """runs.csv's whole measured rows, their identity columns filled as summary.csv's are, each
    with its position in the file (`row`: which process wrote it, bench.analysis.reference.processes)."""
    if not (run_dir / "runs.csv").is_file():
        return None
    runs = pd.DataFrame(read_runs(run_dir / "runs.csv"))
    runs["row"] = range(len(runs))
    if "kind" in runs:
        runs = runs[runs["kind"].fillna("measured") == "measured"].copy()
    fill_identity_columns(runs)
    return runs


def _group_rows(runs: pd.DataFrame | None, key: list[str], group: tuple, variants) -> pd.DataFrame | None:
    """The measured rows of `variants` in the summary group `group` (values of `key`)."""
    if runs is None:
        return None
    return runs[runs["variant"].isin(list(variants)) & (runs[key] == pd.Series(group, index=key)).all(axis=1)]


def _decode_attention(mine: pd.DataFrame | None, engine: str) -> str:
    """How the rows' decode steps attended, from their engine_detail: split-kv, matmul or (under
    --attention-kernels auto) SDPA on the graph engine (--decode-attention), transformers' own
    attention on the others; "-" unknown."""
    if mine is None or mine.empty or "engine_detail" not in mine:
        return "-"
    detail = mine["engine_detail"].fillna("").astype(str)
    ways = set(detail.map(lambda d: "split-kv" if "split-kv decode attention" in d else
                          "transformers'" if engine != "graph" else
                          "matmul" if "(deterministic)" in d else "SDPA"))
    return ways.pop() if len(ways) == 1 else "mixed"


def _one_process(mine: pd.DataFrame | None, starts: list[int] | None) -> bool | None:
    """Whether one process wrote the rows `mine` (_group_rows); None: not known (a resume's first
    row not recorded, or no such rows). Rows of a sweep's worker processes (--executor local or
    ray: a job per weights) are never one process's."""
    if starts is None or mine is None or mine.empty:
        return None
    if "worker" in mine and (mine["worker"].fillna("serial") != "serial").any():
        return False
    return len({process_of(starts, int(i)) for i in mine["row"]}) == 1


def comparisons(root: Path = REFERENCE_ROOT) -> pd.DataFrame:
    """One row per (run, model, engine, dtype, invocation, workload point) where the run holds
    fp16 and awq4 rows; `one_process`: whether one process wrote both (None: not known)."""
    rows = []
    for d in reference_dirs(root):
        s = pd.read_csv(d / "summary.csv")
        fill_identity_columns(s)  # as runs.csv's rows are (_measured_rows): groups match them
        if "status" in s:
            s = s[s["status"] == "ok"]
        s = s[s["cache_state"] == "none"]
        quant = s["variant"].map(_weights_part)
        s = s.assign(quant=quant)[quant.isin(["fp16", "awq4"])]
        if set(s["quant"]) != {"fp16", "awq4"}:
            continue
        m = read_manifest(d)
        points = list(POINT_DEFAULTS)
        key = ["model", "engine", "dtype", "run_id", *points]
        starts, runs = processes(d), _measured_rows(d)
        for group, g in s.groupby(key, sort=True, dropna=False):
            med = g.pivot_table(index="metric", columns="quant", values="median", aggfunc="first")
            valid = g.pivot_table(index="metric", columns="quant", values="valid", aggfunc="first")
            if not {"fp16", "awq4"} <= set(med.columns) or "tpot_ms" not in med.index:
                continue

            def pair(metric):
                if metric not in med.index:
                    return None, None, False
                f, a = _value(med.loc[metric, "fp16"]), _value(med.loc[metric, "awq4"])
                ok = metric in valid.index and all(str(valid.loc[metric, w]).lower() == "true" for w in ("fp16", "awq4"))
                return (f, a, ok) if f is not None and a is not None else (None, None, False)

            f_tpot, a_tpot, tpot_ok = pair("tpot_ms")
            if f_tpot is None:
                continue
            f_pre, a_pre, pre_ok = pair("prefill_ms")
            first = g.iloc[0]
            cells = first[points]
            mine = _group_rows(runs, key, group, set(g["variant"]))
            rows.append({"gpu": d.parent.name, "model": str(first["model"]), "run": d.name, "date": m["date"],
                         "commit": m["commit"], "engine": first["engine"],
                         "decode_attention": _decode_attention(mine, str(first["engine"])), "prefill_option": prefill_option(m["command"]),
                         "batch": int(first.get("batch_size", 1) or 1),
                         "point": point_label(cells.to_dict()),
                         "fp16_tpot_ms": f_tpot, "awq4_tpot_ms": a_tpot,
                         "decode_speedup": f_tpot / a_tpot, "tpot_valid": tpot_ok,
                         "fp16_prefill_ms": f_pre, "awq4_prefill_ms": a_pre,
                         "prefill_ratio": None if f_pre is None else a_pre / f_pre, "prefill_valid": pre_ok,
                         "one_process": _one_process(mine, starts)})
    return pd.DataFrame(rows)


def _met(value, ok: bool, one_process: bool | None, target: bool) -> str:
    where = {True: "", False: " (across processes)", None: " (processes unknown)"}[one_process]
    return f"{value:.2f}" + ("" if ok else " (not valid)") + where + (" ✓" if ok and one_process and target else "")


def int4_table(root: Path = REFERENCE_ROOT, link_prefix: str = "../") -> str:
    """The Markdown table: ✓ where a valid ratio meets its target."""
    df = comparisons(root)
    head = ["gpu", "model", "run", "engine", "decode attention", "prefill", "point", "fp16 TPOT ms", "awq4 TPOT ms",
            "decode ×fp16", "fp16 prefill ms", "awq4 prefill ms", "prefill ÷fp16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if df.empty:
        return "\n".join(lines)
    df = df.sort_values(["gpu", "model", "date", "run", "engine", "batch", "point"],
                        ascending=[True, True, False, True, True, True, True])
    for r in df.itertuples():
        rel = (Path(REFERENCE_ROOT) / r.gpu / r.run).as_posix()
        decode_goal = r.decode_speedup >= (DECODE_TARGET_B1 if r.batch == 1 else 1.0)
        one = None if pd.isna(r.one_process) else bool(r.one_process)
        prefill = "-" if pd.isna(r.prefill_ratio) else _met(r.prefill_ratio, r.prefill_valid, one,
                                                             r.prefill_ratio <= PREFILL_TARGET)
        cells = [r.gpu, r.model, f"[{r.run}]({link_prefix}{rel}/) ({r.date}, {r.commit})", r.engine,
                 r.decode_attention, r.prefill_option, r.point, f"{r.fp16_tpot_ms:.3f}", f"{r.awq4_tpot_ms:.3f}",
                 _met(r.decode_speedup, r.tpot_valid, one, decode_goal),
                 "-" if pd.isna(r.fp16_prefill_ms) else f"{r.fp16_prefill_ms:.2f}",
                 "-" if pd.isna(r.awq4_prefill_ms) else f"{r.awq4_prefill_ms:.2f}", prefill]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
