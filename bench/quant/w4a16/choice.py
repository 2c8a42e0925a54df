"""Which W4A16 kernel each Int4Linear runs per row count (`--int4-kernels`).

- `tinygemm` (default): PyTorch's tinygemm up to --int4-dense-rows;
- a kernel's name (bench.quant.w4a16.registry): that kernel up to --int4-dense-rows;
- `measured`: per weight shape (out, in, group) and activation dtype, every kernel that runs on
  the device (of those --int4-kernel-candidates names, if it does) is called at each row count of
  ROW_POINTS on one of the layers' own weights, checked against the dequantized weight times x in
  fp32 (max |error| / max |reference| at most TOLERANCE), and timed as the layer's forward runs it,
  casts included (bench.measure.timing.call_us: on CUDA inside a CUDA graph where the engine
  replays its steps so, else launched eagerly, host overhead included). Timed calls cycle over
  enough layers of the shape that their weights exceed twice the GPU's L2 cache, so each call
  reads its weight from memory as a decode step does, not from L2. The fastest correct kernel at
  a point serves the row counts from the point below it up to it. A kernel that fails, is wrong,
  or cannot be captured is left out with the reason; a kernel with a row limit (W4A16Kernel.max_rows:
  gemlite's GEMVs) is measured up to it only. A chosen kernel that tunes itself per row
  count (gemlite's) is called once at every row count it serves, so its tuning is done before
  any warm-up, capture or measured run.

Above those rows every call runs the layer's prefill kernel (`set_prefill_kernel`,
--int4-prefill-kernel; by default dequantize + GEMM).

Measured plans are kept once per device and shape (bench.quant.w4a16.measurements: in this
process and in the int4 cache directory's `kernels.json`). `python -m bench int4-kernels`
prints or writes the measured table.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.errors import VariantUnsupported
from bench.pdl import enabled as pdl_enabled
from bench.log import status
from bench.measure.timing import call_us, copies_past_l2
from bench.quant.w4a16.measurements import PlanCache, ShapePlan, cache_key
from bench.quant.w4a16.registry import DEFAULT_KERNEL, KERNELS

# Decode steps of batches up to 64 rows; 128 to 512: a warm batch's suffixes entered together
# (batch x bucket rows: 4 to 16 rows of a 32-token bucket), which without a point there ran the
# dense path, dequantizing every weight in line (not a layer ahead, as a full prefill does).
ROW_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOLERANCE = 2e-2  # max |y - reference| / max |reference|; fp16 int4 kernels sit near 1e-3
DEFAULT = DEFAULT_KERNEL
MEASURED = "measured"


def modes() -> list[str]:
    """What --int4-kernels takes."""
    return [DEFAULT, MEASURED, *(n for n in KERNELS if n != DEFAULT)]


def plan_text(plan: tuple[tuple[int, str], ...] | None, dense_rows: int, kernel: str = DEFAULT,
              prefill: str = "dense") -> str:
    """'1-4 gemlite-gemv-revsplitk, 5-16 tinygemm, >16 dense' (no plan: `kernel` up to dense_rows;
    `prefill`: what runs above it)."""
    plan = [(top, name) for top, name in (plan if plan is not None else ((dense_rows, kernel),)) if top >= 1]
    while plan and plan[-1][1] == prefill:  # what runs above the plan anyway
        plan.pop()
    if not plan:
        return prefill
    parts, low = [], 1
    for top, name in plan:
        parts.append(f"{low}-{top} {name}" if top > low else f"{top} {name}")
        low = top + 1
    return ", ".join(parts + [f">{plan[-1][0]} {prefill}"])


def plans_column(layers, prefill: str | None = None) -> str | None:
    """The int4_kernels column: each weight shape's kernel per row count, as the layers hold it;
    `prefill`: what the calls above the plans run (default: each layer's prefill_kernel)."""
    seen: dict[tuple, str] = {}
    for m in layers:
        seen.setdefault((m.out_features, m.in_features),
                        plan_text(m.row_plan, m.dense_rows, m.kernel, prefill or m.prefill_kernel))
    if not seen:
        return None
    if len(set(seen.values())) == 1:
        return next(iter(seen.values()))
    return "; ".join(f"{n}x{k}: {text}" for (n, k), text in seen.items())


def _why_not(name: str, layer, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why kernel `name` cannot run `layer` on `device` with `dtype` activations; None if it can."""
    kernel = KERNELS[name]
    return kernel.unavailable(device, dtype) or kernel.shape_unsupported(layer)


def _require(name: str, layers: list, dtype: torch.dtype, flag: str, choices) -> None:
    """ValueError for a name not in `choices`; VariantUnsupported (naming `flag`) when kernel
    `name` cannot run one of `layers` here."""
    if name not in KERNELS:
        raise ValueError(f"unknown int4 kernel {name!r}; choose from {', '.join(choices)}")
    device = layers[0].packed.device
    for m in layers:
        reason = _why_not(name, m, device, dtype)
        if reason:
            raise VariantUnsupported(f"{flag} {name}: {reason}")


def candidates(layer, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """(kernels that may run this layer here, {kernel: why not} for the others)."""
    ok, why = [], {}
    for name in KERNELS:
        reason = _why_not(name, layer, device, dtype)
        if reason:
            why[name] = reason
        else:
            ok.append(name)
    return ok, why


def _distinct(layers) -> list:
    """`layers` in order, each once (a fused projection can be reached along several paths)."""
    return list({id(m): m for m in layers}.values())


def _short(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"


def rotation(layers, device: torch.device) -> list:
    """The layers (of one shape) timed calls cycle over: on CUDA as many as hold timing.L2_MULTIPLE times
    the GPU's L2 cache in int4 weights (all of them when they hold less), else the first."""
    layers = list(layers)
    if device.type != "cuda":
        return layers[:1]
    return layers[:copies_past_l2(device, layers[0].weight_bytes())]


def _served(name: str, points) -> tuple[int, ...]:
    """The row counts of `points` kernel `name` is measured at (those up to its row limit)."""
    limit = KERNELS[name].max_rows
    return tuple(rows for rows in points if limit is None or rows <= limit)


def _with_rows(points):
    """name -> the name, with the row counts it is measured at where its row limit leaves out some
    of `points` ("triton-f16x2 (1 row)")."""
    def named(name: str) -> str:
        served = _served(name, points)
        if not served or len(served) == len(points):  # (none: left out, with the reason)
            return name
        return f"{name} ({','.join(map(str, served))} row{'s' * (served != (1,))})"
    return named


def _takeable(earlier: dict | None, names, points) -> dict:
    """Of `earlier` (kernel -> [(times, errors)], PlanCache.earlier), for each kernel of `names`
    the measurement at the most row counts among those that timed it only at row counts it would
    be timed at now (one timed past its row limit of now was another version of it): the row
    counts it lacks are timed, the others taken."""
    out = {}
    for n in names:
        fits = [m for m in (earlier or {}).get(n, ()) if m[0] and set(m[0]) <= set(_served(n, points))]
        if fits:
            out[n] = max(fits, key=lambda m: len(m[0]))
    return out


def measure(layer, dtype: torch.dtype, points=ROW_POINTS, names: list[str] | None = None, graph: bool = True,
            cycle: list | None = None, earlier: dict | None = None) -> ShapePlan:
    """Time and check every candidate kernel on `layer` at each row count of `points`; `graph`:
    time it captured in a CUDA graph (else launched eagerly); `cycle`: layers of the same shape
    timed calls go through in turn (default: `layer` alone; each is given the candidates' weight
    formats, which a row plan set afterwards drops where it does not use them); `earlier`: kernel ->
    [(times, errors)] measured before on this kind of device and shape (PlanCache.earlier): a kernel
    timed there only at row counts it would be timed at now keeps those times; the row counts it
    was not timed at are timed (and it is checked on `layer` at each row count). One that needs
    no timing is checked on `layer` (its weight format made, its error taken) only where it would
    be chosen, fastest by its kept times, and keeps its earlier errors elsewhere (`unchecked`):
    checking every kernel at every row count compiles and runs each one's code for each (gemlite's
    per row-count configurations, Triton autotuning), for kernels most of which serve nothing."""
    device = layer.packed.device
    cycle = cycle or [layer]
    ok, left_out = candidates(layer, device, dtype)
    names = ok if names is None else [n for n in names if n in ok]
    left_out.update({n: "not a candidate (--int4-kernel-candidates)" for n in ok if n not in names})
    earlier = _takeable(earlier, names, points)
    plan = ShapePlan((layer.out_features, layer.in_features, layer.group_size), (), left_out=left_out)
    gen = torch.Generator(device=device).manual_seed(0)
    w = layer.to_int4().dequantize(torch.float32).to(device)  # its own tensor: freed below
    inputs = {}
    for rows in points:
        x = torch.randn(rows, layer.in_features, generator=gen, device=device, dtype=torch.float32).to(dtype)
        inputs[rows] = (x, x.float() @ w.T)
    del w

    def error(name: str, rows: int) -> float:
        x, ref = inputs[rows]
        y = layer.run_kernel(name, x).float()
        return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    reused, unchecked = {}, {}
    for name in names:
        served = _served(name, points)
        if not served:
            limit = KERNELS[name].max_rows
            left_out[name] = f"serves at most {limit} row{'s' * (limit != 1)}; the fewest measured is {min(inputs)}"
            continue
        taken, taken_err = earlier.get(name, ({}, {}))  # its times at these rows from an earlier measurement
        to_time = [rows for rows in served if rows not in taken]
        if taken:
            reused[name] = tuple(sorted(taken))
        if not to_time:  # checked below, where it would be chosen
            plan.us[name], plan.err[name] = {r: taken[r] for r in served}, {r: taken_err[r] for r in served}
            unchecked[name] = set(served)
            continue
        try:
            for m in cycle:
                m.attach_kernel_state(name, dtype)
            us = {rows: taken[rows] for rows in served if rows in taken}
            err = {}
            for rows in served:
                err[rows] = error(name, rows)
                if rows in to_time:
                    x = inputs[rows][0]
                    turn = itertools.cycle(cycle)
                    us[rows] = call_us(lambda x=x: next(turn).run_kernel(name, x), device,
                                       calls=max(32, len(cycle)) if device.type == "cuda" else None, graph=graph)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run (or be captured) here is left out
            left_out[name] = _short(e)
            reused.pop(name, None)
            continue
        plan.us[name], plan.err[name] = dict(sorted(us.items())), err
    best = []
    for rows in points:
        while True:
            timed = [(plan.us[n][rows], n) for n in plan.us if rows in plan.us[n] and plan.err[n][rows] <= TOLERANCE]
            if not timed:
                raise VariantUnsupported(f"no int4 kernel gives correct results for {plan.shape[0]}x{plan.shape[1]} "
                                         f"at {rows} rows here ({'; '.join(f'{k}: {v}' for k, v in left_out.items())})")
            name = min(timed)[1]
            if rows not in unchecked.get(name, ()):
                break
            try:  # the fastest by its kept times: checked on this layer before it is chosen
                layer.attach_kernel_state(name, dtype)
                plan.err[name][rows] = error(name, rows)
                unchecked[name].discard(rows)
            except Exception as e:  # noqa: BLE001 - as above: left out with the reason
                left_out[name] = _short(e)
                for table in (plan.us, plan.err, reused, unchecked):
                    table.pop(name, None)
        best.append((rows, name))
    plan.reused = reused
    plan.unchecked = {n: tuple(sorted(rows)) for n, rows in unchecked.items() if rows}
    merged: list[tuple[int, str]] = []
    for rows, name in best:  # consecutive points with one winner are one range
        if merged and merged[-1][1] == name:
            merged[-1] = (rows, name)
        else:
            merged.append((rows, name))
    plan.plan = tuple(merged)
    return plan


@dataclass
class KernelChoice:
    """What --int4-kernels decided for an engine's int4 layers (`layers`: those it chose for);
    `prefill`: what the engine's calls above their plans run (--int4-prefill-kernel)."""

    mode: str
    layers: list
    plans: dict[tuple, ShapePlan] = field(default_factory=dict)
    prefill: str = "dense"

    def column(self) -> str | None:
        return plans_column(self.layers, self.prefill)


def int4_gb_per_s(out_features: int, in_features: int, group_size: int, us: float) -> float:
    """The bandwidth a call of `us` microseconds would take to read the layer's int4 weights once,
    GB/s: 4-bit weights plus an fp16 scale and zero per group of `group_size` inputs per output,
    the least a W4A16 kernel reads (activations and outputs are small at few rows). Against the
    GPU's memory bandwidth it says how far a kernel is from the limit of reading its weights."""
    nbytes = out_features * in_features // 2 + out_features * (in_features // group_size) * 2 * 2
    return nbytes / (us * 1e-6) / 1e9


def table_rows(plans) -> list[dict]:
    """One row per (shape, kernel, row count) measured, and one per kernel left out; `reused`: the
    time was measured for another candidate set, other row counts, or dense copy or not, on this
    kind of device (ShapePlan.reused); `error_reused`: so was the error (the kernel was not chosen
    there, so not checked again: ShapePlan.unchecked)."""
    rows = []
    for p in plans:
        for name in sorted(set(p.us) | set(p.left_out)):
            if name not in p.us:
                rows.append({"out_features": p.shape[0], "in_features": p.shape[1], "group_size": p.shape[2],
                             "kernel": name, "rows": None, "us": None, "int4_gb_per_s": None, "max_rel_err": None,
                             "chosen": False, "left_out": p.left_out[name], "reused": False, "error_reused": False})
                continue
            for r, us in sorted(p.us[name].items()):
                serving = next((n for top, n in p.plan if r <= top), "dense")
                rows.append({"out_features": p.shape[0], "in_features": p.shape[1], "group_size": p.shape[2],
                             "kernel": name, "rows": r, "us": round(us, 3),
                             "int4_gb_per_s": float(f"{int4_gb_per_s(*p.shape, us):.4g}"), "max_rel_err": p.err[name][r],
                             "chosen": serving == name, "left_out": "", "reused": r in p.reused.get(name, ()),
                             "error_reused": r in p.unchecked.get(name, ())})
    return rows


def choose_kernels(layers, mode: str, dtype: torch.dtype, cache_file: Path | None = None,
                   points=ROW_POINTS, allowed: tuple[str, ...] = (), graph: bool = True) -> KernelChoice:
    """Give every layer of `layers` (Int4Linear) its kernel per row count under `mode`;
    `allowed`: the kernels `measured` may choose from (empty: every one that runs here);
    `graph`: the engine replays its calls in CUDA graphs (measured so; else launched eagerly)."""
    layers = _distinct(layers)
    choice = KernelChoice(mode, layers)
    if not layers:
        return choice
    if mode == DEFAULT:
        for m in layers:
            m.set_row_plan(None, dtype)
        return choice
    device = layers[0].packed.device
    if mode != MEASURED:
        _require(mode, layers, dtype, "--int4-kernels", modes())
        for m in layers:
            m.set_row_plan(None, dtype, kernel=mode)  # up to dense_rows, as it is when a call comes
        tune_per_rows(layers, dtype)
        return choice
    cache = PlanCache(cache_file)
    groups: dict[tuple, list] = {}  # (shape, dense copy): what `dense` reads differs
    for m in layers:
        groups.setdefault(((m.out_features, m.in_features, m.group_size), m.dense_copy is not None), []).append(m)
    for (shape, copy), group in groups.items():
        names, why = candidates(group[0], device, dtype)
        if allowed:
            names = [n for n in names if n in allowed]
            if not names:
                raise VariantUnsupported(f"--int4-kernel-candidates {','.join(allowed)}: none of them runs here "
                                         f"on {shape[0]}x{shape[1]} (group {shape[2]}): "
                                         + "; ".join(dict.fromkeys(why.get(n, f"{n}: unknown") for n in allowed)))
        pdl = pdl_enabled(device) and any(KERNELS[n].launches_pdl for n in names)
        key = cache_key(device, dtype, shape, points, names, copy, graph, pdl)
        plan = cache.get(key, shape)
        if plan is None:
            kept = cache.earlier(key)
            earlier = _takeable(kept, names, points)
            timed = [n for n in names if n not in earlier]
            partly = {n: [r for r in _served(n, points) if r not in earlier[n][0]] for n in earlier}
            partly = {n: rows for n, rows in partly.items() if rows}
            status(f"int4 kernels: {'measuring ' + ', '.join(map(_with_rows(points), timed)) if timed else 'checking'} "
                   f"for {shape[0]}x{shape[1]} "
                   f"(group {shape[2]}) at {len(points)} row counts"
                   + (f"; {', '.join(n for n in earlier if n not in partly)} checked only where one would be chosen, "
                      "their times taken from an earlier measurement on this kind of GPU"
                      if len(partly) < len(earlier) else "")
                   + "".join(f"; {n} timed at {','.join(map(str, rows))} rows only (the others' times taken)"
                             for n, rows in partly.items()))
            plan = measure(group[0], dtype, points, names, graph, rotation(group, device), kept)
            if not any(KERNELS[n].unavailable(device, dtype) for n in names):
                cache.put(key, plan)  # kept unless a candidate turned unavailable while measured (a failed build)
        choice.plans[shape] = plan
        for m in group:
            m.set_row_plan(plan.plan, dtype)
    tune_per_rows(layers, dtype)
    return choice


def tune_per_rows(layers, dtype: torch.dtype) -> None:
    """Call each weight shape's kernels that tune per row count (W4A16Kernel.tunes_per_rows) once
    at every row count they serve, so their tuning is done now (it compiles and synchronizes,
    which no measured run or CUDA graph capture may contain)."""
    seen = set()
    for m in layers:
        shape = (m.out_features, m.in_features, m.group_size, m.row_plan, m.kernel, m.dense_rows)
        if shape in seen:
            continue
        seen.add(shape)
        for rows in range(1, m.decode_rows() + 1):
            name = m.kernel_at(rows)
            if name != "dense" and KERNELS[name].tunes_per_rows:
                m.run_kernel(name, torch.zeros(rows, m.in_features, dtype=dtype, device=m.packed.device))


def set_prefill_kernel(layers, name: str, dtype: torch.dtype) -> None:
    """Give `layers` (the int4 linears a prefill runs) kernel `name` above their plans
    (--int4-prefill-kernel; "dense": the dequantizing prefill path). VariantUnsupported when the
    kernel cannot run here or take a layer's weight."""
    layers = _distinct(layers)
    if not layers:
        return
    if name != "dense":
        _require(name, layers, dtype, "--int4-prefill-kernel", KERNELS)
    for m in layers:
        m.set_prefill_kernel(name, dtype)


def reset_kernels(layers, dtype: torch.dtype) -> None:
    """`layers` run the default kernels from now on (tinygemm up to dense_rows, the dense path
    above), the weight formats of any others dropped."""
    set_prefill_kernel(layers, "dense", dtype)
    choose_kernels(layers, DEFAULT, dtype)


@contextmanager
def default_kernels(layers):
    """Within: `layers` (Int4Linear) run the default kernels (tinygemm up to dense_rows, the dense
    path above), whatever an engine chose for them, and run it again after; the kernels' own
    weight formats stay held."""
    layers = _distinct(layers)
    saved = [(m.kernel, m.row_plan, m.prefill_kernel) for m in layers]
    for m in layers:
        m.kernel, m.row_plan, m.prefill_kernel = DEFAULT, None, "dense"
    try:
        yield
    finally:
        for m, (kernel, plan, prefill) in zip(layers, saved):
            m.kernel, m.row_plan, m.prefill_kernel = kernel, plan, prefill
