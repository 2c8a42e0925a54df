"""Notebooks execute (nbclient) against a tiny CPU run; the static report writes its figures."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from bench.cli import main, run_main
from tests.conftest import ROOT
from tests.synthetic_results import write_results


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "tiny"
    assert run_main(["--preset", "tiny-llava", "--variants", "fp16,prefix,bnb4", "--engine", "hf,graph",
                     "--num-runs", "5", "--min-seconds", "0", "--max-new-tokens", "8", "--warmup", "1",
                     "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "sweep"
    assert run_main(["--preset", "tiny-vila", "--variants", "fp16,prefix", "--batch-size", "1,2,4",
                     "--prompt-lengths", "4,24", "--num-runs", "3", "--min-seconds", "0", "--max-new-tokens", "4",
                     "--warmup", "0", "--no-fidelity", "--output-dir", str(out)]) == 0
    return out


def execute(name: str, env: dict):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb


def outputs_text(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_compare_notebook_runs(tiny_results, sweep_results):
    nb = execute("compare_variants.ipynb", {"BENCH_RESULTS_DIRS": str(tiny_results)})
    text = outputs_text(nb)
    assert "skipped" in text and "fp16+graph" in text  # the CPU-skipped graph variants are shown
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 4 and "no --batch-size sweep" in text
    nb = execute("compare_variants.ipynb", {"BENCH_RESULTS_DIRS": os.pathsep.join([str(tiny_results),
                                                                                      str(sweep_results)])})
    text = outputs_text(nb)
    swept = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert swept == images + 2 and "no --batch-size sweep" not in text and "no --prompt-lengths sweep" not in text


def test_regression_notebook_runs(tiny_results, tmp_path):
    # the candidate: results files of the same identity as the tiny run's fp16 and prefix
    other = write_results(tmp_path / "other", [{"variant": "fp16"}, {"variant": "prefix", "cache_state": "cold"},
                                               {"variant": "prefix", "cache_state": "warm"}])
    nb = execute("regression.ipynb", {"BENCH_BASELINE": str(tiny_results), "BENCH_CANDIDATE": str(other)})
    assert "verdict:" in outputs_text(nb)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 3  # the ratios, and the samples of two metrics


def test_notebooks_take_paths_relative_to_the_repository_root():
    """As typed at the repository root (`BENCH_BASELINE=results/ci-baseline jupyter nbconvert --execute
    notebooks/...`), though the kernel runs in notebooks/."""
    nb = execute("regression.ipynb", {"BENCH_BASELINE": "results/ci-baseline", "BENCH_CANDIDATE": "results/ci-baseline"})
    assert "verdict: pass" in outputs_text(nb)
    nb = execute("compare_variants.ipynb", {"BENCH_RESULTS_DIRS": "results/ci-baseline"})
    assert "results/ci-baseline" in outputs_text(nb)


def test_static_report(tiny_results, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(tiny_results), "--out", str(out)]) == 0
    for name in ("phases", "latency_ci", "memory", "fidelity", "cold_warm"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "Speed-up over fp16" in md and "| tiny-llava | fp16 |" in md and "skipped" in md
    assert "weights=random" in md
    assert main(["report", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_a_report_of_nothing_measured_says_so_instead_of_an_empty_table(tmp_path):
    write_results(tmp_path / "skipped", [{"variant": "rtn4+static", "status": "skipped", "error": "needs CUDA"}])
    assert main(["report", str(tmp_path / "skipped"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "No measured result (see Skipped or failed)." in md and "needs CUDA" in md
    assert all(line.count("|") != 1 and line.strip() != "|  |" for line in md.splitlines()), md


def test_a_report_of_a_summary_without_results_says_how_to_rebuild_it(tmp_path):
    """A summary.csv of its header only (runs.csv has measured rows): no pointer to a Skipped or
    failed section the report does not have."""
    write_results(tmp_path / "d", [{"variant": "fp16"}])
    summary = tmp_path / "d" / "summary.csv"
    summary.write_text(summary.read_text().splitlines()[0] + "\n")
    assert main(["report", str(tmp_path / "d"), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Skipped or failed" not in md and "summarize DIR" in md


def test_a_report_of_a_directory_a_run_is_writing_says_so(tmp_path, capsys):
    from bench.measure.results import DirLock

    write_results(tmp_path / "d", [{"variant": "fp16"}])
    (tmp_path / "d" / "summary.csv").unlink()  # written when the run ends
    lock = DirLock(tmp_path / "d")
    try:
        capsys.readouterr()
        assert main(["report", str(tmp_path / "d"), "--out", str(tmp_path / "report")]) == 2
        assert "no summary.csv; a run is writing it (PID" in capsys.readouterr().err
    finally:
        lock.release()
    assert not (tmp_path / "report").exists()


def test_a_directory_name_that_is_not_utf8_is_written_escaped(tmp_path, capsys, monkeypatch):
    from bench.analysis import figures

    monkeypatch.setattr(figures, "FIGURES", {})  # the names are in report.md's text
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/o\xff")  # as the shell passes such a name
    write_results(Path(odd), [{"variant": "fp16"}])
    write_results(tmp_path / "plain", [{"variant": "fp16"}])
    out = tmp_path / "report"
    assert main(["report", odd, str(tmp_path / "plain"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "o\\xff." not in md and "/o\\xff, " in md and "fp16 (o\\xff)" in md  # the source and its label
    from bench.analysis.report import END, START

    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    capsys.readouterr()
    assert main(["report", odd, "--out", odd + "-report", "--readme", str(readme)]) == 2  # no link can name it
    assert "not UTF-8" in capsys.readouterr().err and not os.path.exists(odd + "-report")


def test_a_report_that_fails_leaves_out_as_it_was(tmp_path, monkeypatch):
    from bench.analysis import figures, report

    write_results(tmp_path / "res", [{"variant": "fp16"}])
    earlier = tmp_path / "earlier"  # an earlier report's files
    earlier.mkdir()
    (earlier / "report.md").write_text("# Benchmark report\n")
    (earlier / "phases.png").write_bytes(b"an earlier figure")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}

    def broken(summary):
        raise RuntimeError("drawing failed")

    monkeypatch.setitem(figures.FIGURES, "latency_ci", broken)  # the second figure: the first is drawn
    for out in (tmp_path / "new" / "report", earlier):
        with pytest.raises(RuntimeError, match="drawing failed"):
            report.write_report([tmp_path / "res"], out)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_report_into_a_readme_between_the_markers_its_help_names(tiny_results, tmp_path, capsys):
    from bench.analysis.report import END, START
    from bench.cli.report import parser

    assert START in " ".join(parser().format_help().split()) and END in parser().format_help()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Ours\n\n{START}\n{END}\n\nafter\n")
    assert main(["report", str(tiny_results), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 0
    assert f"and its block in {readme}" in capsys.readouterr().out
    text = readme.read_text()
    assert text.startswith("# Ours") and text.endswith("after\n") and "Speed-up over fp16" in text


def test_report_into_a_readme_keeps_the_rest_of_it_byte_for_byte(tiny_results, tmp_path, capsys):
    """Outside the markers a README with Windows line ends and non-ASCII text comes back as it
    was (the block takes its line ends); a results directory named like a marker stays text, so
    the README can take the next report; the README cannot be a file the report writes."""
    import shutil

    from bench.analysis.report import END, START

    named = tmp_path / f"run {END}"  # what the report quotes: its results directory's name
    shutil.copytree(tiny_results, named)
    readme = tmp_path / "README.md"
    head, tail = "# Ünsere Läufe\r\n\r\n".encode(), "\r\nnach — after\r\n".encode()
    readme.write_bytes(head + f"{START}\r\n{END}".encode() + tail)
    for _ in range(2):  # the second report replaces the first's block
        assert main(["report", str(named), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 0
        data = readme.read_bytes()
        assert data.startswith(head + START.encode() + b"\r\n") and data.endswith(b"\r\n" + END.encode() + tail)
        assert data.count(END.encode()) == 1 and b"\n" not in data.replace(b"\r\n", b"")
    out = tmp_path / "r"
    (out / "report.md").write_text(f"{START}\n{END}\n")  # markers there too: still the report's own file
    before = (out / "report.md").read_bytes()
    assert main(["report", str(named), "--out", str(out), "--readme", str(out / "report.md")]) == 2
    assert "a file the report writes" in capsys.readouterr().err and (out / "report.md").read_bytes() == before


def test_a_report_of_results_without_a_median_draws_without_warnings(tiny_results, tmp_path):
    """Every median missing (a summary.csv edited, or written by failed runs only): the figures
    draw no legend of nothing, which matplotlib would warn of."""
    import shutil
    import warnings

    import pandas as pd

    blank = tmp_path / "blank"
    shutil.copytree(tiny_results, blank)
    summary = pd.read_csv(blank / "summary.csv")
    summary["median"] = float("nan")
    summary.to_csv(blank / "summary.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["report", str(blank), "--out", str(tmp_path / "r")]) == 0


def test_sweep_figures_follow_the_axes(sweep_results, tiny_results, tmp_path):
    from bench.analysis import figures, sources

    runs, summary = sources.load([sweep_results])
    t = figures._sweep(summary, "batch_size", ["tpot_ms"])
    # batch sweep: the question length held at the first point's (4 tokens), every batch size present
    assert set(t["question_tokens"]) == {4} and set(t["batch_size"]) == {1, 2, 4}
    assert set(t["label"]) == {"fp16", "prefix [cold]", "prefix [warm]"}
    p = figures._sweep(summary, "question_tokens", ["ttft_ms"])
    assert set(p["batch_size"]) == {1} and set(p["question_tokens"]) == {4, 24}
    one = sources.first_point(summary)
    assert set(one[one["status"] == "ok"]["batch_size"]) == {1}
    out = tmp_path / "r"
    assert main(["report", str(sweep_results), "--out", str(out)]) == 0
    assert (out / "batch.png").is_file() and (out / "prompt_length.png").is_file() and not (out / "loader.png").exists()
    assert "first workload point" in (out / "report.md").read_text()
    (out / "mine.png").write_bytes(b"")  # not a figure's name: kept
    assert main(["report", str(tiny_results), "--out", str(out)]) == 0  # a report with no sweep, over it
    assert not (out / "batch.png").exists() and not (out / "prompt_length.png").exists()
    assert (out / "phases.png").is_file() and (out / "mine.png").is_file()


def test_committed_notebooks_have_no_outputs():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), path
