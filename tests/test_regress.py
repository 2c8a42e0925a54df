"""The regression gate's statistics on synthetic samples, and the compare command's exit codes."""
import json

import numpy as np
import pandas as pd
import pytest

from bench.cli.compare import main as compare_main
from bench.measure.metrics import RUN_COLUMNS
from bench.analysis.regress import compare_samples, hodges_lehmann_ratio, min_samples_ok


def lognormal(rng, n, scale=1.0, sigma=0.05):
    return list(scale * rng.lognormal(0.0, sigma, n))


def test_aa_false_alarm_rate_at_most_1pct():
    rng = np.random.default_rng(0)
    trials = 600
    alarms = sum(compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 100), "ttft_ms").status == "regression"
                 for _ in range(trials))
    assert alarms / trials <= 0.01


def test_true_15pct_slowdown_caught_95pct():
    rng = np.random.default_rng(1)
    trials = 600
    caught = sum(compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 115), "ttft_ms").status == "regression"
                 for _ in range(trials))
    assert caught / trials >= 0.95


def test_significant_but_small_change_is_not_flagged():
    rng = np.random.default_rng(2)
    v = compare_samples(lognormal(rng, 50, 100, 0.01), lognormal(rng, 50, 105, 0.01), "ttft_ms")
    assert v.p_value < 1e-6 and v.status == "unchanged"


def test_improvement_and_direction():
    rng = np.random.default_rng(3)
    assert compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 70), "tpot_ms").status == "improvement"
    # throughput: lower is worse
    assert compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 70), "decode_tok_s").status == "regression"
    assert compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 130), "decode_tok_s").status == "improvement"


def test_too_few_samples_is_inconclusive():
    assert not min_samples_ok(4, 4, 0.01)  # best attainable p = 1/70
    assert min_samples_ok(5, 5, 0.01)  # 1/252
    v = compare_samples([1.0, 1.1, 1.2, 1.0], [5.0, 5.1, 5.2, 5.0], "ttft_ms")
    assert v.status == "inconclusive"


def test_hodges_lehmann_ratio():
    assert hodges_lehmann_ratio(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(2.0)
    assert hodges_lehmann_ratio(np.array([10.0] * 5), np.array([11.0] * 4 + [1000.0])) == pytest.approx(1.1)


def write_runs(path, samples: dict[str, list[float]], extra_cols=True):
    rows = []
    for variant, xs in samples.items():
        for x in xs:
            rows.append({"model": "m", "variant": variant, "engine": "hf", "cache_state": "none", "kind": "measured",
                         "status": "ok", "ttft_ms": x, "tpot_ms": x / 10, "prefill_ms": x / 2, "e2e_ms": x * 10,
                         "peak_alloc_mb": None})
    df = pd.DataFrame(rows)
    if extra_cols:
        df = df.reindex(columns=list(RUN_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def test_compare_exit_codes_and_json(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_runs(tmp_path / "a" / "runs.csv", {"fp16": lognormal(rng, 10, 100)})
    write_runs(tmp_path / "b" / "runs.csv", {"fp16": lognormal(rng, 10, 101)})
    write_runs(tmp_path / "c" / "runs.csv", {"fp16": lognormal(rng, 10, 150)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = tmp_path / "v.json"
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "c" / "runs.csv"), "--json", str(out)]) == 1
    verdict = json.loads(out.read_text())
    assert verdict["verdict"] == "regression"
    flagged = {c["metric"] for c in verdict["comparisons"] if c["status"] == "regression"}
    assert flagged == {"ttft_ms", "tpot_ms", "prefill_ms", "e2e_ms"}
    assert "regression" in capsys.readouterr().out


def test_compare_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(5)
    write_runs(tmp_path / "a" / "runs.csv", {"fp16": lognormal(rng, 10)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "bad.csv")]) == 2
    write_runs(tmp_path / "few" / "runs.csv", {"fp16": lognormal(rng, 3)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "few")]) == 2  # inconclusive, never a pass
    write_runs(tmp_path / "other" / "runs.csv", {"bnb4": lognormal(rng, 10)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "other")]) == 2
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "nope_ms"]) == 2
    err = capsys.readouterr().err
    assert "no runs.csv" in err and "missing columns" in err and "nothing" not in err
