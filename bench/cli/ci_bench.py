"""`vlm-bench ci-bench DIR`: the tiny CPU benchmark our own CI gates on, and its gate settings (one place)."""
from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, UsageError, clipped, path_problem

# One CPU thread and --calibrate: every request is timed next to a fixed reference workload
# (bench.measure.calibration) and the gate compares the ratios, so another process on the
# machine slows both sides of each ratio alike (tests/test_ci_gate.py runs it beside a CPU
# burner, and checks that a +30% per-token slowdown is still caught).
CI_BENCH_ARGS = [
    "--preset", "tiny-vila", "--device", "cpu", "--variants", "fp16,prefix", "--num-runs", "12",
    "--min-seconds", "0", "--max-new-tokens", "32", "--warmup", "2", "--no-fidelity", "--cpu-threads", "1",
    "--calibrate", "--text-prompt", "What is shown in this image?",
]
CI_GATE_METRICS = "ttft_rel,tpot_rel"
# Beside a CPU burner (2 cores) A/A pairs measured tpot_rel ratios of 0.99-1.17 and a +30% slowdown
# (30% more decode forwards) 1.24-1.59; quiet, the same slowdown measured 1.23-1.33.
CI_GATE_FACTOR = 1.2
BASELINE_DIR = "results/ci-baseline"


def parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog=f"{PROG} ci-bench",
        description=f"{describe('ci-bench')[:-1]}, the same as:\n  {PROG} run {shlex.join(CI_BENCH_ARGS)} "
                    "--append --output-dir OUTPUT_DIR",
        epilog=textwrap.fill(f"The gate compares {CI_GATE_METRICS} with {BASELINE_DIR} and flags slowdowns "
                             f"larger than x{CI_GATE_FACTOR}. Running it twice into one new directory makes a "
                             "baseline.", 79))
    ap.add_argument("output_dir", metavar="OUTPUT_DIR", help="results directory (new, or one written by ci-bench: "
                                                             "the run is appended)")
    return ap


def is_ci_bench(command) -> bool:
    """Whether a command env.json records is ci-bench's run (its settings, then --append and the
    directory): the command line, not the config, since the config holds paths of the checkout."""
    try:
        words = shlex.split(command) if isinstance(command, str) else []
    except ValueError:
        return False
    head = ["run", *CI_BENCH_ARGS, "--append", "--output-dir"]  # then the directory, and nothing after it
    return any(words[i:i + len(head)] == head and len(words) == i + len(head) + 1 for i in range(len(words)))


def other_commands(out: Path) -> list[str]:
    """The commands of the runs in `out` that ci-bench did not make (env.json's top-level record
    and its earlier runs'); none where there is no readable env.json (run refuses that itself)."""
    if path_problem(out / "env.json"):  # (a FIFO would block the read for ever)
        return []
    try:
        env = json.loads((out / "env.json").read_text())
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(env, dict):
        return []
    runs = env.get("runs")
    records = [env, *(runs.values() if isinstance(runs, dict) else ())]
    return [str(r.get("command")) for r in records if isinstance(r, dict) and not is_ci_bench(r.get("command"))]


def main(argv: list[str]) -> int:
    """Run the tiny CPU benchmark CI gates on (settings above)."""
    args = parser().parse_args(argv)
    if not args.output_dir.strip():
        raise UsageError("OUTPUT_DIR is empty; give the results directory to write")
    other = other_commands(Path(args.output_dir))
    if other:  # appended to, its summaries would hold the gate's runs beside another benchmark's
        shown = clipped(" ".join(other[0].split()), 120)  # one line, whatever the command's quoted text holds
        raise UsageError(f"OUTPUT_DIR {args.output_dir} holds a run ci-bench did not make with these settings "
                         f"({shown}): give a new directory or one ci-bench wrote")
    from bench.cli.run import main as run_main

    return run_main([*CI_BENCH_ARGS, "--append", "--output-dir", args.output_dir], prog=f"{PROG} run")
