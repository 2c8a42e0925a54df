"""Dependencies stay quiet: what they print does not grow with the number of requests, no hub
access is attempted, and `summarize` loads no model library."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MARK = "--- the longer run ---"
# Two runs of bnb8 (bitsandbytes 8-bit: on a CPU in float32 it used to log on every forward) in one
# process: the second makes four times the requests of the first.
SCRIPT = f"""
import sys
from bench.cli import run_main
args = ["--preset", "tiny-vila", "--device", "cpu", "--variants", "bnb8", "--warmup", "0", "--min-seconds", "0",
        "--max-new-tokens", "3", "--no-fidelity"]
assert run_main([*args, "--num-runs", "1", "--output-dir", sys.argv[1] + "/short"]) == 0
print({MARK!r}, file=sys.stderr, flush=True)
assert run_main([*args, "--num-runs", "4", "--output-dir", sys.argv[1] + "/long"]) == 0
"""


def dependency_lines(text: str) -> list[str]:
    """stderr lines that are not the harness's own progress lines ("[12:00:00] ...")."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("[")]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("quiet")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    short, long = proc.stderr.split(MARK)
    return out, dependency_lines(short), dependency_lines(long), proc.stderr


def test_dependency_output_does_not_grow_with_requests(two_runs):
    _, short, long, _ = two_runs
    assert len(long) <= len(short), long
    assert not any("kernels-community" in line or "publisher trust" in line for line in short + long)


def test_no_dependency_line_at_all_and_bnb8_says_its_float16_cast_itself(two_runs):
    _, short, long, stderr = two_runs
    assert short == [] and long == []  # only the harness's own progress lines
    assert stderr.count("bnb8: LLM.int8 casts float32 inputs to float16") == 2  # once per run, as it loads



def test_summarize_imports_no_model_library(two_runs):
    out, _, _, _ = two_runs
    code = ("import sys; from bench.cli import main; rc = main(['summarize', sys.argv[1]]); "
            "assert rc == 0; assert not {'torch', 'transformers', 'torchao', 'bitsandbytes'} & set(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "long")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("wrote ")
