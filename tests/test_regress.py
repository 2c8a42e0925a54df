"""The regression gate's statistics on synthetic samples, and the compare command's exit codes."""
import io
import json

import numpy as np
import pandas as pd
import pytest

from bench.cli.compare import main as compare_main
from bench.measure.schema import RUN_COLUMNS
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
    assert v.status == "inconclusive" and v.reason == "fewer than --min-samples 5 runs on a side"
    v = compare_samples([1.0, 1.1, 1.2, 1.0], [5.0, 5.1, 5.2, 5.0], "ttft_ms", min_samples=2)
    assert v.status == "inconclusive" and v.reason == "too few runs for p < --alpha 0.01"
    v = compare_samples([0.0, 1.1, 1.2, 1.0, 1.0], [5.0, 5.1, 5.2, 5.0, 5.3], "ttft_ms")
    assert v.status == "inconclusive" and "at or below zero" in v.reason
    assert compare_samples([1.0, 1.1, 1.2, 1.0, 1.0], [5.0, 5.1, 5.2, 5.0, 5.3], "ttft_ms").reason == ""


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


def test_a_result_the_candidate_lost_fails_the_comparison_and_says_why(tmp_path, capsys):
    """The baseline measured fp16 and rtn4; the candidate's rtn4 was skipped (or not run): the
    fp16 verdicts alone would pass, so the lost result is a `missing` verdict, exit 1, with the
    skip's reason; --allow-missing passes and still lists it."""
    rng = np.random.default_rng(6)
    write_runs(tmp_path / "base" / "runs.csv", {"fp16": lognormal(rng, 10, 100), "rtn4": lognormal(rng, 10, 80)})
    write_runs(tmp_path / "cand" / "runs.csv", {"fp16": lognormal(rng, 10, 100)})
    runs = pd.read_csv(tmp_path / "cand" / "runs.csv")
    skipped = {**{c: None for c in runs.columns}, "model": "m", "variant": "rtn4", "engine": "hf",
               "status": "skipped", "error": "--int4-kernels triton-tiles needs CUDA"}
    (tmp_path / "skipped").mkdir()
    pd.concat([runs, pd.DataFrame([skipped])]).to_csv(tmp_path / "skipped" / "runs.csv", index=False)
    out = tmp_path / "v.json"
    for cand, why in (("skipped", "skipped in the candidate: --int4-kernels triton-tiles needs CUDA"),
                      ("cand", "not in the candidate")):
        capsys.readouterr()
        assert compare_main([str(tmp_path / "base"), str(tmp_path / cand), "--json", str(out)]) == 1
        text = capsys.readouterr().out
        assert "verdict: missing" in text and "missing: rtn4 hf none " in text and f": {why}\n" in text, text
        verdict = json.loads(out.read_text())
        lost = [c for c in verdict["comparisons"] if c["status"] == "missing"]
        assert [(c["variant"], c["n_baseline"], c["n_candidate"], c["reason"]) for c in lost] == \
            [("rtn4", 10, 0, why)]
        assert {c["status"] for c in verdict["comparisons"] if c["variant"] == "fp16"} == {"unchanged"}
        assert compare_main([str(tmp_path / "base"), str(tmp_path / cand), "--allow-missing"]) == 0
        assert "(--allow-missing)" in capsys.readouterr().out
    # results the candidate adds are no loss
    assert compare_main([str(tmp_path / "cand"), str(tmp_path / "base")]) == 0


def test_a_missing_results_reason_is_its_points_and_where_narrowing_is_no_loss(tmp_path, capsys):
    """A point's failed row explains that point only, a whole variant's skipped row every point of
    it; a result --candidate-where leaves out is not missing; --allow-missing never passes a
    comparison of nothing."""
    from tests.synthetic_results import write_results

    base = write_results(tmp_path / "base", [{"variant": "fp16"}, {"variant": "fp16", "batch_size": 4},
                                             {"variant": "prefix"}], runs=6)
    cand = write_results(tmp_path / "cand", [{"variant": "fp16"},
                                             {"variant": "prefix", "status": "skipped", "error": "no GPU"}], runs=6)
    runs = pd.read_csv(cand / "runs.csv")
    oom = {**runs.iloc[0].to_dict(), "kind": None, "status": "failed", "batch_size": 4,
           "error": "OutOfMemoryError at b4"}
    pd.concat([runs, pd.DataFrame([{k: oom.get(k) for k in runs.columns}])]).to_csv(cand / "runs.csv", index=False)
    out = tmp_path / "v.json"
    assert compare_main([str(base), str(cand), "--json", str(out)]) == 1
    lost = {(c["variant"], c["batch_size"]): c["reason"] for c in json.loads(out.read_text())["comparisons"]
            if c["status"] == "missing"}
    assert lost == {("fp16", 4): "failed in the candidate: OutOfMemoryError at b4",
                    ("prefix", 1): "skipped in the candidate: no GPU"}
    assert compare_main([str(base), str(cand), "--candidate-where", "variant=fp16", "--json", str(out)]) == 1
    assert [(c["variant"], c["batch_size"]) for c in json.loads(out.read_text())["comparisons"]
            if c["status"] == "missing"] == [("fp16", 4)]
    assert compare_main([str(base), str(cand), "--candidate-where", "variant=fp16", "--baseline-where",
                         "batch_size=1"]) == 0
    capsys.readouterr()
    only_lost = write_results(tmp_path / "lost", [{"variant": "prefix", "status": "skipped", "error": "no GPU"}])
    assert compare_main([str(base), str(only_lost), "--baseline-where", "variant=prefix"]) == 1
    assert compare_main([str(base), str(only_lost), "--baseline-where", "variant=prefix", "--allow-missing"]) == 2
    assert "the candidate has no measured run" in capsys.readouterr().err


def test_compare_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(5)
    write_runs(tmp_path / "a" / "runs.csv", {"fp16": lognormal(rng, 10)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "bad.csv")]) == 2
    write_runs(tmp_path / "few" / "runs.csv", {"fp16": lognormal(rng, 3)})
    early = capsys.readouterr().err
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "few")]) == 2  # inconclusive, never a pass
    out = capsys.readouterr().out  # and says why
    assert "inconclusive: fewer than --min-samples 5 runs on a side (4 of 4 verdicts)" in out, out
    write_runs(tmp_path / "other" / "runs.csv", {"bnb4": lognormal(rng, 10)})
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "other")]) == 2
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "a"), "--metrics", "nope_ms"]) == 2
    err = early + capsys.readouterr().err
    assert "no runs.csv" in err and "missing columns" in err and "nothing" not in err


def test_throughput_gain_is_an_improvement_never_a_regression():
    rng = np.random.default_rng(6)
    for metric in ("output_tok_s", "requests_per_s", "decode_tok_s", "token_agree", "engine_top1_agree"):
        up = compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 130), metric)
        down = compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 70), metric)
        assert (up.status, down.status) == ("improvement", "regression"), metric
    # the direction can also be given (a column the table does not know)
    assert compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 130), "my_rate",
                           higher_better=True).status == "improvement"
    assert compare_samples(lognormal(rng, 10, 100), lognormal(rng, 10, 130), "my_ms").status == "regression"


def test_every_summarized_metric_has_a_direction():
    from bench.measure.schema import BY_NAME, COLUMNS, SUMMARY_METRICS, higher_is_better

    better = {c.name for c in COLUMNS if higher_is_better(c.name)}

    assert SUMMARY_METRICS and all(BY_NAME[m].higher_is_better is not None for m in SUMMARY_METRICS)
    assert all(c.unit for c in COLUMNS if c.summarized)
    assert {"output_tok_s", "requests_per_s", "decode_tok_s", "token_agree", "engine_top1_agree"} <= better
    assert not any(m.endswith(("_ms", "_mb")) for m in better)


def write_identity_runs(path, groups: list[tuple[dict, float]], n=10, seed=7):
    """runs.csv with a group of measured runs per (identity overrides, ttft scale)."""
    rng = np.random.default_rng(seed)
    base = {"model": "m", "family": "llava", "weights": "random", "variant": "fp16", "engine": "hf",
            "device": "cuda", "dtype": "float16", "cache_state": "none", "batch_size": 1, "new_tokens": 32,
            "num_images": 1, "loader": "", "kind": "measured", "status": "ok"}
    rows = [{**base, **over, "ttft_ms": x, "tpot_ms": x / 10, "prefill_ms": x / 2, "e2e_ms": x * 10}
            for over, scale in groups for x in lognormal(rng, n, scale)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).reindex(columns=list(RUN_COLUMNS)).to_csv(path, index=False)


@pytest.mark.parametrize("column,a,b", [("dtype", "float16", "bfloat16"), ("device", "cuda", "cpu"),
                                        ("family", "llava", "vila"), ("weights", "random", "checkpoint"),
                                        ("batch_size", 1, 4), ("new_tokens", 32, 128)])
def test_compare_never_pools_rows_that_differ_in_identity(tmp_path, column, a, b):
    from bench.analysis.compare import compare_runs, load_runs, print_table

    # one directory holds both values: the slow one (b) must not dilute or mask the fast one (a)
    write_identity_runs(tmp_path / "base" / "runs.csv", [({column: a}, 100), ({column: b}, 300)])
    write_identity_runs(tmp_path / "cand" / "runs.csv", [({column: a}, 100), ({column: b}, 300)], seed=8)
    rows = compare_runs(load_runs(tmp_path / "base"), load_runs(tmp_path / "cand"), ["ttft_ms"], 0.01, 1.1)
    assert sorted(str(r[column]) for r in rows) == sorted([str(a), str(b)])
    assert all(r["n_baseline"] == r["n_candidate"] == 10 for r in rows)
    medians = {str(r[column]): r["baseline_median"] for r in rows}
    assert medians[str(a)] < 150 < medians[str(b)]
    assert compare_main([str(tmp_path / "base"), str(tmp_path / "cand")]) == 0
    if column in ("dtype", "device", "family", "weights"):  # the table says which row is which
        out = io.StringIO()
        print_table(rows, out=out)
        assert column in out.getvalue() and str(b) in out.getvalue()
    # a candidate of the other value only has nothing in common with a baseline of the one
    write_identity_runs(tmp_path / "only_b" / "runs.csv", [({column: b}, 100)])
    write_identity_runs(tmp_path / "only_a" / "runs.csv", [({column: a}, 100)])
    assert compare_main([str(tmp_path / "only_a"), str(tmp_path / "only_b")]) == 2


def test_compare_table_fits_100_columns_with_whole_names_and_shared_identity_said_once(tmp_path):
    from bench.analysis.compare import compare_runs, load_runs, print_table

    long = [("bnb4-fp4+embedcache+static", "static"), ("awq4+prefix+graph-exact", "graph-exact"), ("fp16", "hf")]
    for side, seed in (("base", 7), ("cand", 8)):
        write_identity_runs(tmp_path / side / "runs.csv", [({"variant": v, "engine": e}, 100) for v, e in long],
                            seed=seed)
    rows = compare_runs(load_runs(tmp_path / "base"), load_runs(tmp_path / "cand"),
                        ["ttft_ms", "tpot_ms", "prefill_ms", "e2e_ms"], 0.01, 1.1)
    out = io.StringIO()
    print_table(rows, out=out)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 100
    assert {v for v, _ in long} | {e for _, e in long} <= set(out.getvalue().split())
    # what every row shares is said once, above the table
    assert lines[0] == "baseline vs candidate: model m, cache none, point b1 n32, 10/10 runs (baseline/candidate)"


def test_compare_reads_files_without_the_newer_identity_columns(tmp_path):
    """Older runs.csv files lack engine, family, weights, device, dtype, the workload point and
    run_id: they load with the documented defaults and still compare with themselves."""
    from bench.analysis.compare import load_runs
    from bench.measure.schema import IDENTITY_DEFAULTS, RESULT_KEY

    write_runs(tmp_path / "old" / "runs.csv", {"fp16": lognormal(np.random.default_rng(9), 10)}, extra_cols=False)
    df = pd.read_csv(tmp_path / "old" / "runs.csv").drop(columns=["engine"])
    df.to_csv(tmp_path / "old" / "runs.csv", index=False)
    runs = load_runs(tmp_path / "old")
    assert len(runs) == 10
    for k in (*RESULT_KEY, "run_id"):
        if k not in ("model", "variant", "cache_state"):
            assert (runs[k] == IDENTITY_DEFAULTS[k]).all(), k
    assert compare_main([str(tmp_path / "old"), str(tmp_path / "old")]) == 0


def test_compare_pools_one_sides_invocations_but_summaries_do_not(tmp_path):
    """Two invocations appended to one directory: compare pools each side's runs (the run id
    always differs across directories); summarize_runs keeps the invocations apart."""
    from types import SimpleNamespace

    from bench.analysis.compare import compare_runs, load_runs
    from bench.run.summary import summarize_runs

    write_identity_runs(tmp_path / "a" / "runs.csv", [({"run_id": "r1"}, 100), ({"run_id": "r2"}, 100)])
    write_identity_runs(tmp_path / "b" / "runs.csv", [({"run_id": "r3"}, 100)])
    rows = compare_runs(load_runs(tmp_path / "a"), load_runs(tmp_path / "b"), ["ttft_ms"], 0.01, 1.1)
    assert [(r["n_baseline"], r["n_candidate"]) for r in rows] == [(20, 10)]
    runs = [{k: None if pd.isna(v) else v for k, v in r.items()}  # empty cells, as `summarize` reads them
            for r in pd.read_csv(tmp_path / "a" / "runs.csv").to_dict("records")]
    cfg = SimpleNamespace(num_runs=5, min_seconds=0, max_cv=1.0)
    ttft = [r for r in summarize_runs(runs, cfg) if r.get("metric") == "ttft_ms"]
    assert sorted((r["run_id"], r["n"]) for r in ttft) == [("r1", 10), ("r2", 10)]


def test_compare_across_pairs_a_served_endpoint_with_its_in_process_run(tmp_path, capsys):
    """--across names identity columns the sides may differ in (an endpoint's rows say engine
    endpoint, weights served, no family/device/dtype); rows pair on the rest, and a side with
    two values of such a column for one result is refused, never pooled."""
    from tests.synthetic_results import write_results

    inproc = {"model": "llava-1.5-7b", "family": "llava", "weights": "random", "variant": "fp16+graph",
              "engine": "graph", "device": "cuda", "dtype": "float16"}
    served = {"model": "llava-1.5-7b", "family": "", "weights": "served", "variant": "c1", "engine": "endpoint",
              "device": "", "dtype": ""}
    write_results(tmp_path / "inproc", [inproc], runs=8)
    write_results(tmp_path / "same", [served], runs=8, seed=1)
    write_results(tmp_path / "slow", [{**served, "scale": 1.3}], runs=8, seed=2)
    write_results(tmp_path / "two", [served, {**served, "variant": "c4"}], runs=8, seed=3)
    across = ["--across", "engine,variant,weights,family,device,dtype", "--metrics", "ttft_ms,tpot_ms"]
    assert compare_main([str(tmp_path / "inproc"), str(tmp_path / "same")]) == 2  # nothing in common
    assert "--across" in capsys.readouterr().err
    # a side that measured nothing is said to be that, not offered --across
    write_results(tmp_path / "skipped", [{**inproc, "status": "skipped", "error": "needs CUDA"}])
    for sides, which in (([tmp_path / "skipped"] * 2, "the baseline and the candidate have"),
                         ([tmp_path / "skipped", tmp_path / "inproc"], "the baseline has")):
        assert compare_main([str(p) for p in sides]) == 2
        err = capsys.readouterr().err
        assert f"{which} no measured run to compare" in err and "--across" not in err, err
    out = tmp_path / "v.json"
    assert compare_main([str(tmp_path / "inproc"), str(tmp_path / "same"), *across, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["comparisons"]
    assert {(r["engine"], r["variant"], r["metric"]) for r in rows} == {
        ("graph -> endpoint", "fp16+graph -> c1", m) for m in ("ttft_ms", "tpot_ms")}
    assert compare_main([str(tmp_path / "inproc"), str(tmp_path / "slow"), *across]) == 1
    capsys.readouterr()
    assert compare_main([str(tmp_path / "inproc"), str(tmp_path / "two"), *across]) == 2
    assert "2 variant values (c1, c4)" in capsys.readouterr().err
    assert compare_main([str(tmp_path / "inproc"), str(tmp_path / "same"), "--across", "ttft_ms"]) == 2
    assert "not an identity column" in capsys.readouterr().err


def test_compare_where_narrows_a_side_to_one_result(tmp_path, capsys):
    """--baseline-where / --candidate-where COLUMN=VALUE keep one side's runs holding those
    identity values: a cache variant's warm result against a served run (which has cache_state
    none), one point of an endpoint sweep. A value the side does not hold, a column that is no
    identity column, or a bad pair is a one-line error naming the flag."""
    from tests.synthetic_results import write_results

    inproc = {"model": "m", "variant": "prefix", "engine": "graph"}
    write_results(tmp_path / "inproc", [{**inproc, "cache_state": "cold", "scale": 3.0},
                                        {**inproc, "cache_state": "warm"}], runs=8)
    served = {"model": "m", "weights": "served", "engine": "endpoint", "cache_state": "none"}
    write_results(tmp_path / "sweep", [{**served, "variant": "c1 rinf"},
                                       {**served, "variant": "c4 rinf", "scale": 3.0}], runs=8, seed=1)
    across = ["--across", "engine,variant,weights,cache_state", "--metrics", "tpot_ms"]  # alike cold, warm, none
    pair = [str(tmp_path / "inproc"), str(tmp_path / "sweep"), *across]
    assert compare_main(pair) == 2
    assert "pick one with --baseline-where cache_state=cold" in capsys.readouterr().err
    out = tmp_path / "v.json"
    assert compare_main([*pair, "--baseline-where", "cache_state=warm", "--candidate-where", "variant=c1 rinf",
                         "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["comparisons"]
    assert row["across"]["cache_state"] == ["warm", "none"] and row["across"]["variant"] == ["prefix", "c1 rinf"]
    assert row["status"] == "unchanged" and row["n_baseline"] == row["n_candidate"] == 8
    # the slower point and the cold result: each a regression or an improvement, never pooled
    assert compare_main([*pair, "--baseline-where", "cache_state=warm", "--candidate-where", "variant=c4 rinf"]) == 1
    assert compare_main([*pair, "--baseline-where", "cache_state=cold", "--candidate-where", "variant=c1 rinf"]) == 0
    assert "improvement 1" in capsys.readouterr().out
    for flag, value, said in (("--baseline-where", "cache_state=hot", "cache_state there: cold, warm"),
                              ("--candidate-where", "variant=c2", "variant there: c1 rinf, c4 rinf"),
                              ("--baseline-where", "ttft_ms=1", "give identity COLUMN=VALUE pairs"),
                              ("--baseline-where", "cache_state", "give identity COLUMN=VALUE pairs"),
                              ("--baseline-where", " , ", "is empty"),
                              ("--candidate-where", "variant=c1 rinf,variant=c4 rinf", "names variant twice")):
        assert compare_main([*pair, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag}") and said in err and "\n" not in err, err


def test_compare_without_where_flags_never_speaks_of_them(tmp_path, capsys):
    """A side with no measured run: the candidate's variant skipped is a lost result (exit 1,
    saying why); a baseline with none is refused; neither names --baseline-where or
    --candidate-where when neither was given."""
    from tests.synthetic_results import write_results

    write_results(tmp_path / "a", [{"variant": "fp16"}], runs=6)
    write_results(tmp_path / "b", [{"variant": "fp16", "status": "skipped", "error": "no GPU"}])
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    said = capsys.readouterr()
    assert "skipped in the candidate: no GPU" in said.out and "-where" not in said.out + said.err, said
    assert compare_main([str(tmp_path / "b"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "-where" not in err, err


def test_compare_across_bad_and_edge_inputs_are_one_line_errors_or_paired_never_pooled(tmp_path, capsys):
    """--across: given empty is refused; a workload column pairs two points (the table shows
    'b1 n8 -> b4 n8'); every identity column pairs two single results and refuses a side holding
    two; an older runs.csv without a column pairs through its default; an across column the
    table hides when results share it is shown when the sides differ in it; numbers in a text
    identity column with an empty cell stay text ("1", not "1.0")."""
    import csv

    from bench.analysis.compare import KEYS
    from tests.synthetic_results import write_results

    write_results(tmp_path / "a", [{}], runs=8)
    write_results(tmp_path / "b4", [{"batch_size": 4}], runs=8, seed=1)
    write_results(tmp_path / "two", [{}, {"variant": "bnb8"}], runs=8, seed=2)
    write_results(tmp_path / "served", [{"weights": "served", "engine": "endpoint"}], runs=8, seed=3)
    metric = ["--metrics", "ttft_ms"]
    for bad in ("", " , "):
        assert compare_main([str(tmp_path / "a"), str(tmp_path / "a"), "--across", bad, *metric]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --across is empty") and "\n" not in err

    out = tmp_path / "v.json"
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b4"), "--across", "batch_size", *metric,
                         "--json", str(out)]) == 1
    assert "b1 n8 -> b4 n8" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["comparisons"]
    assert row["batch_size"] == "1 -> 4" and row["across"] == {"batch_size": [1, 4]} and row["num_images"] == 1

    every = ["--across", ",".join(KEYS), *metric]
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b4"), *every]) == 1
    capsys.readouterr()
    assert compare_main([str(tmp_path / "two"), str(tmp_path / "a"), *every]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --across variant: the baseline has 2 variant values") and "\n" not in err

    assert compare_main([str(tmp_path / "a"), str(tmp_path / "served"), "--across", "weights,engine", *metric]) == 0
    assert "random -> served" in capsys.readouterr().out  # weights: a column the table shows when it differs

    with open(tmp_path / "a" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    old = tmp_path / "old"
    old.mkdir()
    with open(old / "runs.csv", "w", newline="") as f:  # written before the family column existed
        w = csv.DictWriter(f, [c for c in rows[0] if c != "family"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert compare_main([str(old), str(tmp_path / "a"), *metric]) == 2
    capsys.readouterr()
    assert compare_main([str(old), str(tmp_path / "a"), "--across", "family", *metric, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["comparisons"][0]["family"] == "- -> llava"

    numeric = tmp_path / "numeric"
    numeric.mkdir()
    with open(numeric / "runs.csv", "w", newline="") as f:  # variant "1"; the warm-up row's left empty
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows({**r, "variant": "" if r["kind"] == "warmup" else "1"} for r in rows)
    capsys.readouterr()
    assert compare_main([str(numeric), str(tmp_path / "a"), "--across", "variant", *metric, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["comparisons"][0]["across"] == {"variant": ["1", "fp16"]}
