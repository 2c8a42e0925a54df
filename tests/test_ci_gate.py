"""Our own CI gate: the tiny CPU benchmark against the committed baseline, and an end-to-end check
that the gate fails on injected per-token work and passes an interleaved A/A pair."""
import subprocess
import sys
import time

import pytest

from bench.cli.ci_bench import BASELINE_DIR, CI_BENCH_ARGS, CI_GATE_FACTOR, CI_GATE_METRICS
from bench.cli import main, run_main
from bench.models.vila import VilaAdapter
from tests.conftest import ROOT

SMALL = ["--preset", "tiny-vila", "--device", "cpu", "--variants", "fp16", "--num-runs", "4", "--min-seconds", "0",
         "--max-new-tokens", "16", "--warmup", "1", "--no-fidelity", "--text-prompt", "What is here?"]


@pytest.mark.timing
def test_ci_benchmark_against_committed_baseline(tmp_path):
    """Fails when a change breaks the KV cache or adds per-token work (gross slowdowns only)."""
    assert (ROOT / BASELINE_DIR / "runs.csv").is_file(), "refresh with: python -m bench ci-bench " + BASELINE_DIR
    # A fresh process, as the baseline was made (python -m bench ci-bench, run twice into one directory).
    proc = subprocess.run([sys.executable, "-m", "bench", "ci-bench", str(tmp_path / "cand")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rc = main(["compare", str(ROOT / BASELINE_DIR), str(tmp_path / "cand"), "--metrics", CI_GATE_METRICS,
               "--factor", str(CI_GATE_FACTOR), "--json", str(tmp_path / "verdict.json")])
    assert rc == 0, (tmp_path / "verdict.json").read_text()


@pytest.mark.timing
def test_gate_catches_injected_per_token_delay_and_passes_interleaved_aa(tmp_path, monkeypatch):
    a, b, slow = tmp_path / "a", tmp_path / "b", tmp_path / "slow"
    for _ in range(3):  # interleaved A/A: machine drift hits both sides alike
        assert run_main([*SMALL, "--append", "--output-dir", str(a)]) == 0
        assert run_main([*SMALL, "--append", "--output-dir", str(b)]) == 0
    assert main(["compare", str(a), str(b), "--metrics", CI_GATE_METRICS, "--factor", str(CI_GATE_FACTOR)]) == 0

    real = VilaAdapter.lm_forward

    def with_delay(self, inputs_embeds, cache, logits_to_keep=1):
        if inputs_embeds.shape[1] == 1:  # one decode step
            time.sleep(0.002)
        return real(self, inputs_embeds, cache, logits_to_keep)

    monkeypatch.setattr(VilaAdapter, "lm_forward", with_delay)
    for _ in range(3):
        assert run_main([*SMALL, "--append", "--output-dir", str(slow)]) == 0
    assert main(["compare", str(a), str(slow), "--metrics", CI_GATE_METRICS, "--factor", str(CI_GATE_FACTOR)]) == 1


def test_ci_bench_args_are_a_valid_run_config():
    from bench.run.config import config_from_args

    cfg = config_from_args(CI_BENCH_ARGS)
    assert cfg.num_runs >= 10 and not cfg.fidelity
