"""The documentation cannot drift from the code or the reference runs: reference runs carry a
generated MANIFEST, docs/findings.md and the README's variants table are what the generators
write, the README names every subcommand, the numbers the docs state are the code's, and every
relative link resolves."""
import json
import re
import shutil

import pytest

from bench.analysis.generated_blocks import markers, replace_block, variants_table
from bench.analysis.reference import (REQUIRED_FIELDS, manifest_fields, read_manifest, reference_dirs,
                                      render_findings, write_manifest)
from bench.cli import COMMANDS
from bench.errors import UsageError
from tests.conftest import ROOT

REGENERATE = "regenerate: python scripts/write_docs.py"


def test_every_reference_run_has_a_manifest_generated_from_its_env_json():
    dirs = reference_dirs(ROOT / "results" / "reference")
    assert dirs
    for d in dirs:
        assert not re.search(r"-[0-9a-f]{7,40}$", d.name), f"{d.name}: the commit belongs in MANIFEST, not the name"
        assert all((d / f).is_file() for f in ("runs.csv", "summary.csv", "env.json")), d
        m = read_manifest(d)
        assert all(m.get(k) for k in REQUIRED_FIELDS), (d, m)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["date"]) and re.fullmatch(r"[0-9a-f]{7,40}", m["commit"])
        fresh = manifest_fields(d, m["commit"], m["shows"])
        assert m == fresh, f"{d}: MANIFEST is not what scripts/write_manifest.py writes"


def test_write_manifest_takes_date_and_command_from_env_json(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "results" / "reference" / "h200" / "tiny-vila-int4", run)
    (run / "MANIFEST").unlink()
    write_manifest(run, "abc1234", "what it shows")
    m = read_manifest(run)
    assert m["date"] == "2026-12-04" and m["commit"] == "abc1234" and m["shows"] == "what it shows"
    assert m["command"].startswith("python vila_prefix_benchmark.py --variants awq4,rtn4")
    assert "env_git_sha" in m  # env.json records another sha than the one given
    assert "resumed" not in m
    env = json.loads((run / "env.json").read_text())
    env["resumed"] = [{"at": "2026-12-04T10:00:00+00:00", "command": env["command"] + " --resume"},
                      {"at": "2026-12-04T10:05:00+00:00", "command": env["command"] + " --resume --workers 2"}]
    (run / "env.json").write_text(json.dumps(env))
    write_manifest(run, "abc1234", "what it shows")
    assert read_manifest(run)["resumed"] == (
        "2 times with the command above plus --resume (or as shown), at 2026-12-04T10:00:00+00:00, "
        "2026-12-04T10:05:00+00:00 "
        f"({env['command']} --resume --workers 2)")  # a resume given other unfingerprinted flags says so
    (run / "env.json").unlink()
    with pytest.raises(UsageError):
        write_manifest(run, "abc1234", "what it shows")


def test_findings_are_generated_from_the_reference_runs():
    text = (ROOT / "docs" / "findings.md").read_text()
    assert text == render_findings(ROOT / "results" / "reference"), REGENERATE
    for d in reference_dirs(ROOT / "results" / "reference"):
        assert f"commit {read_manifest(d)['commit']}: {d.name}" in text


def test_readme_variants_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert readme == replace_block(readme, "variants", variants_table()), REGENERATE
    assert markers("variants")[0] in readme


def test_int4_docs_table_is_the_reference_runs():
    from bench.analysis.int4_against_fp16 import int4_table

    text = (ROOT / "docs" / "int4.md").read_text()
    assert markers("int4-against-fp16")[0] in text
    assert text == replace_block(text, "int4-against-fp16", int4_table(ROOT / "results" / "reference")), REGENERATE


def _summary_rows(variant, batch, tpot, prefill, valid=True, cache="none", question_tokens=0):
    metrics = [("tpot_ms", tpot)] + ([("prefill_ms", prefill), ("ttft_ms", prefill + 1)] if prefill else [])
    return [{"model": "m", "variant": variant, "engine": "graph", "cache_state": cache, "batch_size": batch,
             "new_tokens": 128, "question_tokens": question_tokens, "status": "ok", "metric": metric,
             "median": value, "valid": valid} for metric, value in metrics]


def test_int4_table_compares_fp16_and_awq4_within_one_run_only(tmp_path):
    """Ratios per batch come from runs holding both fp16 and awq4 (an awq4-only run is left out);
    cached rows do not count; the prefill option is read from the command; a ratio meeting its
    target is ticked only where both summaries are valid."""
    import pandas as pd

    from bench.analysis.int4_against_fp16 import comparisons, int4_table, prefill_option

    def run(name, rows, command):
        d = tmp_path / "h100" / name
        d.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(d / "summary.csv", index=False)
        point = ["model", "variant", "engine", "cache_state", "batch_size", "new_tokens", "question_tokens"]
        detail = ("compiled layers" + (", split-kv decode attention" if "split-kv" in command else "")
                  + ("SDPA as torch picks (auto)" if "--attention-kernels auto" in command else
                     ", SDPA without cuDNN below 16 queries (deterministic)"))
        pd.DataFrame(rows)[point].drop_duplicates().assign(kind="measured", worker="serial", engine_detail=detail).to_csv(
            d / "runs.csv", index=False)  # one row per result, written by this one process
        (d / "MANIFEST").write_text(f"date: 2026-12-06\ncommit: abc1234\ngpu: H100\nweights: random\n"
                                    f"command: {command}\nshows: x\n")

    run("m-batch", _summary_rows("fp16+graph", 1, 6.0, 10.0) + _summary_rows("awq4+graph", 1, 2.0, 10.4)
        + _summary_rows("fp16+graph", 4, 6.6, 40.0) + _summary_rows("awq4+graph", 4, 6.0, 50.0, valid=False)
        + _summary_rows("awq4+prefix+graph", 1, 0.5, 0.5, cache="warm"),
        "python vila_prefix_benchmark.py --variants fp16,awq4,awq4+prefix --batch-size 1,4")
    run("m-copy", _summary_rows("fp16+graph", 1, 6.0, 10.0) + _summary_rows("awq4+graph", 1, 3.0, 12.0),
        "python vila_prefix_benchmark.py --variants fp16,awq4 --int4-prefill-copy --decode-attention split-kv")
    run("m-alone", _summary_rows("awq4+graph", 1, 3.0, 10.0), "python vila_prefix_benchmark.py --variants awq4")
    run("m-points", [r for q, t in ((16, 2.0), (1024, 4.0)) for r in _summary_rows("fp16+graph", 1, 6.0, 0, question_tokens=q)
                     + _summary_rows("awq4+graph", 1, t, 0, question_tokens=q)],
        "python vila_prefix_benchmark.py --variants fp16,awq4 --prompt-lengths 16,1024 --attention-kernels auto")
    got = comparisons(tmp_path).set_index(["run", "point"])
    assert sorted(got.index) == [("m-batch", "b1 n128"), ("m-batch", "b4 n128"), ("m-copy", "b1 n128"),
                                 ("m-points", "b1 n128 q1024"), ("m-points", "b1 n128 q16")]
    assert got.loc[("m-batch", "b1 n128"), "decode_speedup"] == 3.0
    assert got.loc[("m-batch", "b4 n128"), "prefill_ratio"] == 1.25 and not got.loc[("m-batch", "b4 n128"), "tpot_valid"]
    assert got.loc[("m-copy", "b1 n128"), "prefill_option"] == "dense copy"
    assert got.loc[("m-copy", "b1 n128"), "decode_attention"] == "split-kv"  # from the rows' engine_detail
    assert got.loc[("m-batch", "b1 n128"), "decode_attention"] == "matmul"
    assert got.loc[("m-points", "b1 n128 q16"), "decode_attention"] == "SDPA"  # --attention-kernels auto
    assert [got.loc[("m-points", p), "decode_speedup"] for p in ("b1 n128 q16", "b1 n128 q1024")] == [3.0, 1.5]
    table = int4_table(tmp_path)
    assert "| 3.00 ✓ | 10.00 | 10.40 | 1.04 ✓ |" in table  # batch 1: both targets met
    assert "| 1.10 (not valid) |" in table and "| 1.25 (not valid) |" in table  # awq4's batch-4 rows invalid
    assert "| graph | split-kv | dense copy | b1 n128 | 6.000 | 3.000 | 2.00 | 10.00 | 12.00 | 1.20 |" in table  # neither met
    assert "| b1 n128 q1024 | 6.000 | 4.000 | 1.50 | - | - | - |" in table  # no prefill measured: dashes
    assert prefill_option("x --int4-prefill-kernel marlin") == "marlin"
    assert prefill_option("x --int4-prefill-kernel=fbgemm-shuffled") == "fbgemm-shuffled"


def test_int4_table_says_where_a_resumed_run_took_fp16_and_awq4_from_two_processes(tmp_path):
    """A run finished by --resume: a ratio of fp16 rows written by the first process and awq4 rows
    by the resumed one is labelled across processes and not ticked; both from the resumed one
    count as one process; a resume that did not record its first row leaves it unknown."""
    import json

    import pandas as pd

    from bench.analysis.int4_against_fp16 import comparisons, int4_table

    def run(name, resumed, row_variants, worker="serial", env=None):
        d = tmp_path / "h100" / name
        d.mkdir(parents=True)
        pd.DataFrame(_summary_rows("fp16+graph", 1, 6.0, 10.0) + _summary_rows("awq4+graph", 1, 2.0, 10.0)
                     + _summary_rows("fp16+graph", 4, 6.0, 40.0) + _summary_rows("awq4+graph", 4, 5.0, 40.0)
                     ).to_csv(d / "summary.csv", index=False)
        pd.DataFrame([{"timestamp": "t", "kind": "measured", "model": "m", "variant": v, "engine": "graph",
                       "cache_state": "none", "batch_size": b, "question_tokens": 0,
                       "new_tokens": 128, "num_images": 1, "loader": "", "worker": worker} for v, b in row_variants]
                     ).to_csv(d / "runs.csv", index=False)
        (d / "env.json").write_text(json.dumps(env or {"resumed": resumed}))
        (d / "MANIFEST").write_text("date: 2026-12-06\ncommit: abc1234\ngpu: H100\nweights: random\n"
                                    "command: python vila_prefix_benchmark.py --variants fp16,awq4 --batch-size 1,4\n"
                                    "shows: x\n")

    # the first process wrote fp16 at batch 1 and 4, then stopped; the resumed one wrote awq4 at
    # both, fp16 again nowhere: batch 1 and 4 cross processes
    rows = [("fp16+graph", 1), ("fp16+graph", 1), ("fp16+graph", 4), ("awq4+graph", 1), ("awq4+graph", 4)]
    run("split", [{"first_row": 3, "at": "x", "command": "c --resume"}], rows)
    # the first process stopped before writing a row of batch 4: the resumed one wrote both there
    rows = [("fp16+graph", 1), ("awq4+graph", 1), ("fp16+graph", 4), ("awq4+graph", 4)]
    run("tail", [{"first_row": 2, "at": "x", "command": "c --resume"}], rows)
    run("old", [{"at": "x", "command": "c --resume"}], rows)
    run("sweep", [], rows, worker="local:0")  # --executor local: a worker process per job
    # the split run, then another run appended to its directory: its record moved under "runs"
    split = [("fp16+graph", 1), ("fp16+graph", 1), ("fp16+graph", 4), ("awq4+graph", 1), ("awq4+graph", 4)]
    run("appended", [], split, env={"run_id": "b", "runs": {
        "a": {"run_id": "a", "resumed": [{"first_row": 3, "at": "x", "command": "c --resume"}]}, "b": {"run_id": "b"}}})
    got = comparisons(tmp_path).set_index(["run", "batch"])["one_process"].to_dict()
    assert got == {("old", 1): None, ("old", 4): None, ("split", 1): False, ("split", 4): False,
                   ("tail", 1): True, ("tail", 4): True, ("sweep", 1): False, ("sweep", 4): False,
                   ("appended", 1): False, ("appended", 4): False}
    table = int4_table(tmp_path)
    assert "| 3.00 (across processes) | 10.00 | 10.00 | 1.00 (across processes) |" in table
    assert "| 3.00 ✓ | 10.00 | 10.00 | 1.00 ✓ |" in table  # the tail run's batch 1
    assert "| 3.00 (processes unknown) |" in table


def test_readme_names_every_subcommand_and_fits_a_screenful_of_pages():
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in COMMANDS if f"`{c}`" not in readme]
    assert not missing, f"README.md does not list the subcommands {missing}"
    assert len(readme.splitlines()) <= 150


def test_numbers_the_docs_state_are_the_codes():
    """The constants docs/int4.md and docs/serving.md state in words: the measured kernel
    choice's row counts and error bound, and the server's default body limit."""
    from bench.quant.w4a16.choice import ROW_POINTS, TOLERANCE
    from bench.serve.body_limit import MAX_REQUEST_MB

    int4 = " ".join((ROOT / "docs" / "int4.md").read_text().split())
    points = ", ".join(map(str, ROW_POINTS[:-1])) + f" and {ROW_POINTS[-1]} rows"
    assert points in int4 and f"above {ROW_POINTS[-1]} rows" in int4 and f"at most {TOLERANCE:.0%})" in int4
    serving = " ".join((ROOT / "docs" / "serving.md").read_text().split())
    assert f"default {MAX_REQUEST_MB:g}," in serving


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", ROOT / "results" / "README.md", ROOT / "lab" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"


def test_ci_runs_the_readme_set_up_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["./environment_setup.sh", ".venv/bin/python -m pytest -n 2"]
    assert all(f"\n{cmd}" in readme for cmd in ci)


def test_findings_table_keeps_each_workload_point_apart():
    """A run over --batch-size 1,16 gives a row per batch size with that point's medians, not one
    row holding whichever point came last."""
    import pandas as pd

    from bench.analysis.reference import findings_table

    rows = [{"model": "m", "variant": "awq4+graph", "engine": "graph", "cache_state": "none", "dtype": "float16",
             "device": "cuda", "batch_size": b, "new_tokens": 128, "question_tokens": 0, "num_images": 1,
             "loader": None, "status": "ok", "metric": metric, "median": value, "valid": True}
            for b, tpot in ((1, 3.4), (16, 9.0)) for metric, value in (("ttft_ms", 20.0 * b), ("tpot_ms", tpot))]
    rows.append({**rows[0], "variant": "bnb4", "batch_size": float("nan"), "status": "skipped", "metric": "ttft_ms",
                 "median": float("nan"), "valid": False})
    lines = findings_table(pd.DataFrame(rows)).splitlines()[2:]
    assert len(lines) == 3
    assert lines[0].startswith("| m | awq4+graph | none | b1 n128 |") and "| 20 |" in lines[0] and "| 3.4 |" in lines[0]
    assert lines[1].startswith("| m | awq4+graph | none | b16 n128 |") and "| 320 |" in lines[1] and "| 9 |" in lines[1]
    assert lines[2].startswith("| m | bnb4 | none | b1 n128 |") and lines[2].endswith("| skipped |")
