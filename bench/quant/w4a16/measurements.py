"""The measured kernel choices' file (the int4 cache directory's `kernels.json`): one entry per
device, library versions, dtype, weight shape, row counts, candidates, dense copy or not, PDL
or not and the candidates' own timing settings, holding the plan chosen and what was measured
to choose it.

A kernel's times are measured once per device and shape: a plan for another candidate set or
other row counts takes the times of kernels measured for an earlier one (the same key but its
candidates and row counts, and but dense copy or not for kernels other than `dense`, the one that
reads the copy, but PDL or not for kernels that do not launch with it, and with each kernel's own
timing settings the same, W4A16Kernel.timing_settings), times only the
kernels none has timed and the row counts none has timed them at (choice.measure makes and checks
a kernel whose times it took on the layer where it would be chosen), and names the kernels and
row counts whose times it took (`reused`) and those whose errors it took too (`unchecked`).

Entries are kept in this process too, so every engine of a run reuses a plan measured once,
kept file or not. Writers merge their entries into the file under a lock (filelock), so runs
on several GPUs at once keep each other's; an unreadable file is replaced, with a warning, and a
malformed entry (parse_entries) is left out and dropped at the next save, with one.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import pdl as pdl_settings
from bench.errors import path_problem
from bench.log import status
from bench.measure.results import write_json
from bench.quant.w4a16.registry import KERNELS

CACHE_VERSION = 1
LOCK_SECONDS = 60  # a writer waits this long for another's lock, then keeps its plan unsaved
# the distributions whose versions key a measurement besides torch's: the kernels' libraries
# (FBGEMM's gen_ai kernels ship in either of its two)
KERNEL_LIBRARIES = ("triton", "gemlite", "fbgemm-gpu-genai", "fbgemm-gpu")
KEY_FIELDS = {"device": str, "versions": dict, "dtype": str, "shape": list, "points": list, "candidates": list}
# booleans, absent in older files (pdl: where on; pdl_preload, pdl_late: where on, under pdl)
OPTIONAL_KEY_FIELDS = ("dense_copy", "graph", "pdl", "pdl_preload", "pdl_late")
_KEPT: dict[str, dict] = {}  # key -> entry: what this process measured or read
_BAD_WARNED: set[Path] = set()  # files whose malformed entries a warning named already
# files not saved to again: one whose lock a save waited LOCK_SECONDS for (not waited on again), or a
# newer version's (NewerFile)
_NOT_SAVED: set[Path] = set()


@dataclass
class ShapePlan:
    """The kernel per row count for one weight shape, and what was measured to choose it."""

    shape: tuple[int, int, int]  # out_features, in_features, group size
    plan: tuple[tuple[int, str], ...]
    us: dict[str, dict[int, float]] = field(default_factory=dict)  # kernel -> rows -> microseconds
    err: dict[str, dict[int, float]] = field(default_factory=dict)  # kernel -> rows -> max relative error
    left_out: dict[str, str] = field(default_factory=dict)  # kernel -> why it was not a candidate
    cached: bool = False  # measured before (this process or the file), not now
    # kernel -> the row counts whose times were taken from a plan for other candidates, row counts
    # (or copy): measured before on this kind of device, not now
    reused: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # kernel -> the row counts (of its reused ones) whose error was taken too, not checked on this
    # shape's layer now: where it was not chosen (choice.measure checks a kernel where it is)
    unchecked: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"plan": [list(p) for p in self.plan], "us": self.us, "err": self.err, "left_out": self.left_out,
                "reused": {name: list(rows) for name, rows in self.reused.items()},
                "unchecked": {name: list(rows) for name, rows in self.unchecked.items()}}

    @classmethod
    def from_json(cls, shape, d) -> "ShapePlan":
        """The plan an entry holds; ValueError saying what is wrong with it. Kernel names are
        not checked here: a file may name the kernels of another version of the harness."""
        d = _object(d, "an entry")
        plan = tuple((_count(p[0]), _text(p[1])) if isinstance(p, list) and len(p) == 2 else _bad("plan", p)
                     for p in _list(d.get("plan"), "'plan'"))
        tops = [top for top, _ in plan]
        if not plan or tops != sorted(set(tops)):
            raise ValueError(f"plan {plan}: empty, or row bounds not ascending")

        def table(name: str) -> dict[str, dict[int, float]]:
            return {_text(k): {_count(r): _number(v, time=name == "us")
                               for r, v in _object(by, f"{name!r} of {k}").items()}
                    for k, by in _object(d.get(name), repr(name)).items()}

        us, err = table("us"), table("err")
        if {k: set(v) for k, v in us.items()} != {k: set(v) for k, v in err.items()}:
            raise ValueError("'us' and 'err' name other kernels or row counts")
        left_out = {_text(k): _text(v) for k, v in _object(d.get("left_out"), "'left_out'").items()}
        reused = d.get("reused", {})  # absent in older files; a list of kernels (every row count) in some
        if isinstance(reused, list):
            reused = {_text(k): sorted(us.get(k, {})) for k in reused}
        reused = {_text(k): tuple(_count(r) for r in _list(rows, f"'reused' of {k}"))
                  for k, rows in _object(reused, "'reused'").items()}
        if any(k not in us or set(rows) - set(us[k]) for k, rows in reused.items()):
            raise ValueError(f"'reused' names kernels or row counts with no times: {sorted(reused)}")
        unchecked = {_text(k): tuple(_count(r) for r in _list(rows, f"'unchecked' of {k}"))
                     for k, rows in _object(d.get("unchecked", {}), "'unchecked'").items()}  # absent in older files
        if any(set(rows) - set(reused.get(k, ())) for k, rows in unchecked.items()):
            raise ValueError(f"'unchecked' names kernels or row counts whose times were not reused: {sorted(unchecked)}")
        return cls(_shape(shape), plan, us, err, left_out, cached=True, reused=reused, unchecked=unchecked)


def _bad(what: str, value):
    raise ValueError(f"{what}: {value!r} is not a (row count, kernel) pair")


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not an object")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list")
    return value


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


MAX_COUNT = 2**31 - 1  # no row count or weight dimension reaches it


def _count(value) -> int:
    """A positive row count or size, as an int or the string of one (JSON object keys)."""
    if (isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit()
            or not 1 <= int(value) <= MAX_COUNT):
        raise ValueError(f"{str(value)[:40]!r} is not a whole number from 1 to {MAX_COUNT}")
    return int(value)


MIN_US = 1e-3  # a kernel time in a file below a nanosecond is no measurement (CUDA events resolve 0.5 us)


def _number(value, time: bool = False) -> float:
    """A number; a `time` (microseconds) finite and at least MIN_US. (An error may be NaN or
    infinite: what a kernel that returned NaN or inf measured, never chosen; the file holds it
    as null, JSON having no such numbers, and it is read back as NaN.)"""
    if value is None and not time:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            time and not (math.isfinite(value) and value >= MIN_US)):
        raise ValueError(f"{value!r} is not a {f'time of at least {MIN_US} us' if time else 'number'}")
    return float(value)


def _shape(value) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"shape {value!r} is not [out_features, in_features, group_size]")
    return tuple(_count(v) for v in value)


def parse_entry(key: str, entry) -> tuple[dict, ShapePlan]:
    """(the key's fields, the plan) of one entry of the file; ValueError saying what is wrong."""
    try:
        fields = json.loads(key)
    except ValueError:
        raise ValueError(f"a key is not JSON: {key[:120]!r}") from None
    fields = _object(fields, "a key")
    for name, kind in KEY_FIELDS.items():
        if not isinstance(fields.get(name), kind):
            raise ValueError(f"key field {name!r} missing or not a {kind.__name__}: {key[:120]}")
    for name in OPTIONAL_KEY_FIELDS:
        if name in fields and not isinstance(fields[name], bool):
            raise ValueError(f"key field {name!r} is not true or false: {key[:120]}")
    if "pdl_prefetch" in fields and (type(fields["pdl_prefetch"]) is not int or not 0 <= fields["pdl_prefetch"] <= 4):
        raise ValueError(f"key field 'pdl_prefetch' is not 0 to 4 quarters: {key[:120]}")
    if "kernel_settings" in fields and not (isinstance(fields["kernel_settings"], dict) and all(
            isinstance(v, dict) for v in fields["kernel_settings"].values())):
        raise ValueError(f"key field 'kernel_settings' is not an object of objects: {key[:120]}")
    for name, version in fields["versions"].items():
        if not isinstance(version, str):
            raise ValueError(f"key field 'versions': {name!r} is not a version string: {key[:120]}")
    for name, check in (("points", _count), ("candidates", _text)):
        for v in fields[name]:
            check(v)
    plan = ShapePlan.from_json(fields["shape"], entry)
    if not {top for top, _ in plan.plan} <= set(fields["points"]):  # a plan's bounds are row counts it timed
        raise ValueError(f"plan {plan.plan} bounds rows outside its measured row counts {fields['points']}")
    return fields, plan


class NewerFile(ValueError):
    """A measurements file of a later version than CACHE_VERSION: a newer harness's, never replaced."""


def parse_entries(entries: dict) -> tuple[list[tuple[str, dict, ShapePlan]], dict[str, str]]:
    """([(key, its fields, the plan)] of the entries parse_entry reads, {key: why not} of the
    others): one malformed entry (a hand edit, another program's) spoils no other."""
    good, bad = [], {}
    for key, entry in entries.items():
        try:
            good.append((key, *parse_entry(key, entry)))
        except ValueError as e:
            bad[key] = " ".join(str(e).split())[:200]
    return good, bad


def read_entries(path: Path) -> dict:
    """The entries of a measurements file, not yet checked one by one; ValueError (OSError
    where it cannot be read) saying why it is not one."""
    problem = path_problem(path)  # a FIFO would block the read for ever
    if problem:
        raise ValueError(problem)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)  # JSONDecodeError is a ValueError
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if not isinstance(data, dict) or type(data.get("version")) is not int or data.get("version") != CACHE_VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        newer = type(found) is int and found > CACHE_VERSION
        why = f"not a version {CACHE_VERSION} measurements object (found {found!r})"
        raise NewerFile(why) if newer else ValueError(why)
    return _object(data.get("entries"), "'entries'")


@functools.cache  # asked once per process, not once per layer shape
def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            return str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library or no driver to ask: the key goes without it
        return None


def _versions(device: torch.device) -> dict:
    """torch's, the kernel libraries', and on CUDA the runtime's and the driver's (a driver update
    can change the kernels' speed, so a plan measured under another is measured again)."""
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        driver = _driver_version()
        if driver is not None:
            out["driver"] = driver
    for pkg in KERNEL_LIBRARIES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu {platform.machine()} {platform.processor() or ''}".strip()


def cache_key(device: torch.device, dtype: torch.dtype, shape, points, candidates, dense_copy: bool = False,
              graph: bool = True, pdl: bool = False) -> str:
    """`dense_copy`: the layers keep a dense copy (--int4-prefill-copy), which the `dense` kernel
    reads instead of dequantizing: another measurement. `graph`: timed inside CUDA graphs (the
    graph engines) or launched eagerly (the others): on CUDA another measurement too. `pdl`: the
    kernels that take programmatic dependent launch launch with it (bench.pdl): for them another
    measurement (a key without it: launched without), and another again for each share of their
    weights asked of L2 before the wait (`pdl_prefetch`, bench.pdl.PREFETCH; a key with `pdl` and
    without it was measured when all of them were, 4) and with their first block preloaded
    (`pdl_preload`, bench.pdl.PRELOAD), and with the next kernel let start after their main loop
    (`pdl_late`, bench.pdl.LATE; a key without it: right after their wait). A candidate's timing
    settings (W4A16Kernel.timing_settings: the configurations its autotuner chooses from, say) are
    kept under `kernel_settings`: another measurement for each."""
    fields = {"device": _device_name(device), "versions": _versions(device), "dtype": str(dtype),
              "shape": list(shape), "points": list(points), "candidates": sorted(candidates),
              "dense_copy": bool(dense_copy), "graph": bool(graph) and device.type == "cuda"}
    if pdl:
        fields["pdl"] = True
        fields["pdl_prefetch"] = pdl_settings.PREFETCH
        if pdl_settings.PRELOAD:
            fields["pdl_preload"] = True
        if pdl_settings.LATE:
            fields["pdl_late"] = True
    settings = {name: got for name in sorted(candidates)
                if name in KERNELS and (got := KERNELS[name].timing_settings()) is not None}
    if settings:
        fields["kernel_settings"] = settings
    return json.dumps(fields, sort_keys=True)


def kernel_settings(fields: dict, name: str) -> dict | None:
    """The timing settings kernel `name` was measured with under a key of these fields: the key's,
    or for a key without them what the kernel had before it had any (settings_before)."""
    kept = fields.get("kernel_settings")
    if isinstance(kept, dict) and name in kept:
        return kept[name]
    return KERNELS[name].settings_before if name in KERNELS else None


def pdl_launch(fields: dict):
    """How a key's kernels that take PDL were launched: None (without), else the quarters of their
    weights asked of L2 first, whether their first block was preloaded and whether they let the
    next kernel start after their main loop."""
    return (fields.get("pdl_prefetch", 4), bool(fields.get("pdl_preload")), bool(fields.get("pdl_late"))) \
        if fields.get("pdl") else None


class PlanCache:
    """Measured plans: this process's, then the file's (none kept there when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = self._read("measuring again") if path is not None else {}

    def _read(self, then: str) -> dict:
        """The file's well-formed entries (parse_entries): those it cannot read are left out, so a
        save writes the file without them (once a process, a warning says how many)."""
        if not self.path.exists() and not self.path.is_symlink():
            return {}
        try:
            entries = read_entries(self.path)
        except NewerFile as e:
            if self.path not in _NOT_SAVED:  # (no save tries it again, nor says so again)
                _NOT_SAVED.add(self.path)
                status(f"warning: int4 kernel measurements {self.path} were written by a newer version of the "
                       f"harness ({' '.join(str(e).split())[:80]}); measuring without them, saving nothing there")
            return {}
        except (ValueError, OSError) as e:
            status(f"warning: int4 kernel measurements {self.path} unreadable ({' '.join(str(e).split())[:160]}); "
                   f"{then}")
            return {}
        good, bad = parse_entries(entries)
        if bad and self.path not in _BAD_WARNED:
            _BAD_WARNED.add(self.path)
            status(f"warning: int4 kernel measurements {self.path}: {len(bad)} of {len(entries)} entries malformed "
                   f"({next(iter(bad.values()))[:120]}), left out and dropped from the file at its next save")
        return {key: entries[key] for key, _, _ in good}

    def get(self, key: str, shape) -> ShapePlan | None:
        """The plan kept under `key`, if it names only kernels this harness has, among the key's
        candidates (a plan naming others, from a file edited by hand, is measured again)."""
        try:
            allowed = set(json.loads(key).get("candidates", ()))
        except (ValueError, AttributeError, TypeError):
            return None
        for d in (_KEPT.get(key), self.entries.get(key)):
            try:
                plan = ShapePlan.from_json(shape, d)
            except ValueError:
                continue
            names = {name for _, name in plan.plan}
            if not names <= allowed:
                status(f"warning: int4 kernel measurements for {shape[0]}x{shape[1]} in {self.path} name kernels "
                       f"outside their own candidates ({', '.join(sorted(names - allowed))}); measuring again")
                continue
            if all(name in KERNELS for name in names):
                if self.path is not None and key not in self.entries:
                    self._save(key, d)  # measured earlier in this process: into this file too
                _KEPT[key] = d
                return plan
        return None

    def earlier(self, key: str) -> dict[str, list[tuple[dict[int, float], dict[int, float]]]]:
        """Kernel -> [(times, errors by row count)], one per plan kept under a key that differs
        from `key` in its candidates, row counts, dense copy or not, PDL (and its prefetch, preload
        or late start) or kernel settings, alone (this process's first, then the file's): what was
        measured on this device, versions, dtype, shape and timing for another candidate set or
        other row counts. A kernel that reads the dense copy (`dense`) is taken only from a plan
        with the same copy or not: with a copy it reads a dense weight instead of dequantizing; one
        that launches with PDL (`launches_pdl`) only from a plan whose PDL launch is the same
        (pdl_launch); any only from a plan with its own timing settings the same (kernel_settings)."""
        def rest(k: str):
            try:
                fields = json.loads(k)
            except ValueError:
                return None
            if not isinstance(fields, dict):
                return None
            return ({n: v for n, v in fields.items()
                     if n not in ("candidates", "points", "dense_copy", "pdl", "pdl_prefetch", "pdl_preload",
                                  "pdl_late", "kernel_settings")},
                    fields.get("dense_copy"), pdl_launch(fields), fields)

        (want, copy, pdl, mine), found = rest(key), {}
        for kept in (_KEPT, self.entries):
            for k, d in kept.items():
                other = rest(k)
                if k == key or other is None or other[0] != want:
                    continue
                try:
                    plan = ShapePlan.from_json(want.get("shape"), d)
                except ValueError:
                    continue
                for name in plan.us:
                    if name in KERNELS and (other[1] == copy or not KERNELS[name].reads_dense_copy) and (
                            other[2] == pdl or not KERNELS[name].launches_pdl) and (
                            kernel_settings(other[3], name) == kernel_settings(mine, name)):
                        found.setdefault(name, []).append((plan.us[name], plan.err[name]))
        return found

    def put(self, key: str, plan: ShapePlan) -> None:
        _KEPT[key] = plan.to_json()
        if self.path is not None:
            self._save(key, _KEPT[key])

    def _save(self, key: str, entry: dict) -> None:
        """Merge the entry into the file as it is now (another process may have added some)."""
        from filelock import FileLock, Timeout

        if self.path in _NOT_SAVED:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{self.path}.lock", timeout=LOCK_SECONDS):
                kept = self._read("replacing it")
                if self.path in _NOT_SAVED:  # a newer version's since it was first read
                    return
                self.entries = {**kept, key: entry}
                write_json(self.path, {"version": CACHE_VERSION, "entries": self.entries})
        except Timeout:
            _NOT_SAVED.add(self.path)
            status(f"warning: int4 kernel measurements not saved to {self.path} (its lock was held for "
                   f"{LOCK_SECONDS} s); this run's other measurements are not saved either")
        except OSError as e:  # the plan is used all the same, only measured again by a later run
            status(f"warning: int4 kernel measurements not saved to {self.path} ({e.strerror or e})")
