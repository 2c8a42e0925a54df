"""The report over several results directories and many results, from results files written by
the harness's own writers (tests.synthetic_results): every table cell is one number or '-', no
result is averaged with another, every figure's text is readable (no two texts overlap, none
leaves the figure), and failed and skipped results are visible in the figures."""
import re
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pandas as pd
import pytest
from matplotlib.text import Text

from bench.analysis import compare_figures, figures, report, sources
from bench.analysis.compare import compare_runs, load_runs
from bench.analysis.plotting import mib_unit
from tests.conftest import ROOT
from tests.synthetic_results import write_results

SHARED = [{"variant": "fp16"}, {"variant": "prefix", "cache_state": "cold"},
          {"variant": "prefix", "cache_state": "warm"}, {"variant": "bnb4"},
          {"variant": "fp16+graph", "engine": "graph", "status": "skipped", "error": "graph needs a CUDA device"}]
FAILED = "bnb8+graph-exact"
SKIPPED = "awq4+graph-exact"


@pytest.fixture(scope="module")
def three_dirs(tmp_path_factory):
    """Three directories of one name, holding the same results of one model under one run id
    (copies of one run's directory, as `report a/results b/results c/results` gets them), with
    different timings."""
    root = tmp_path_factory.mktemp("three")
    return [write_results(root / name / "results", SHARED, runs=3, seed=i) for i, name in enumerate("abc")]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A summary of 30 results at each of three batch sizes (10 variants and cache states x 3
    engines), one failed and one skipped variant, a second model's loader and prompt-length
    sweep and a third model's two int4 results: every figure has something to draw."""
    root = tmp_path_factory.mktemp("many")
    kinds = [("fp16", "none"), ("bnb8", "none"), ("bnb4", "none"), ("awq4", "none"), ("rtn4", "none"),
             ("prefix", "cold"), ("prefix", "warm"), ("bnb4+prefix", "cold"), ("bnb4+prefix", "warm"),
             ("awq4+prefix", "warm")]
    wide = [{"variant": v if engine == "hf" else f"{v}+{engine}", "engine": engine, "cache_state": c, "batch_size": b,
             "scale": 1 + i / 10} for i, (engine, (v, c)) in enumerate((e, k) for e in ("hf", "static", "graph")
                                                                        for k in kinds) for b in (1, 2, 4)]
    wide += [{"variant": FAILED, "engine": "graph-exact", "status": "failed",
              "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.80 GiB total "
                       "capacity; 137.21 GiB already allocated; 1.02 GiB free; 138.00 GiB reserved in total by "
                       "PyTorch) If reserved memory is >> allocated memory try setting max_split_size_mb"},
             {"variant": SKIPPED, "engine": "graph-exact", "status": "skipped",
              "error": "graph-exact needs a CUDA device"}]
    video = [{"model": "tiny-vila", "family": "vila", "variant": v, "loader": loader, "question_tokens": q}
             for v in ("fp16", "bnb4", "awq4") for loader in ("serial", "prefetch") for q in (4, 24)]
    # int4 only: KL values within one decade of each other (a log axis without a decade inside)
    video += [{"model": "tiny-internvl", "family": "internvl", "variant": v, "kl_mean": kl}
              for v, kl in (("awq4", 4.4e-6), ("rtn4", 5.1e-6))]
    dirs = [write_results(root / "wide", wide, runs=3), write_results(root / "video", video, runs=3)]
    return sources.load(dirs)[1]


# ---- tables -----------------------------------------------------------------------------------
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]\d+)?")
TEXT_COLUMNS = {"model", "variant", "engine", "status", "error", "valid"}


def markdown_tables(md: str) -> list[list[dict]]:
    """Every table of a Markdown text, as rows of {header: cell}."""
    tables, block = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif block:
            header, _, *rows = block
            assert all(len(r) == len(header) for r in rows), block
            tables.append([dict(zip(header, r)) for r in rows])
            block = []
    return tables


def test_three_directories_sharing_variants_give_one_number_per_cell(three_dirs, tmp_path):
    md = report.write_report(three_dirs, tmp_path / "report").read_text()
    speedup, skipped = markdown_tables(md)
    for row in speedup + skipped:
        for column, cell in row.items():
            if column in TEXT_COLUMNS:
                assert cell and "dtype" not in cell and "Name:" not in cell, (column, cell)
            else:
                assert cell == "-" or NUMBER.fullmatch(cell), (column, cell)
    # one row per result, each named by its directory
    names = ["a/results", "b/results", "c/results"]
    assert sorted(r["variant"] for r in speedup) == sorted(
        f"{v} ({n})" for v in ("fp16", "bnb4", "prefix [cold]", "prefix [warm]") for n in names)
    assert sorted(r["variant"] for r in skipped) == sorted(f"fp16+graph ({n})" for n in names)
    # each cell is its own directory's median, held against its own directory's baseline
    for d, name in zip(three_dirs, names):
        s = pd.read_csv(d / "summary.csv")
        for variant in ("fp16", "bnb4"):
            median = s[(s["variant"] == variant) & (s["metric"] == "ttft_ms")]["median"].item()
            row = next(r for r in speedup if r["variant"] == f"{variant} ({name})")
            assert row["ttft_ms median"] == f"{median:.3g}"
        fp16 = next(r for r in speedup if r["variant"] == f"fp16 ({name})")
        assert fp16["speedup ttft"] == "1" and fp16["speedup peak_alloc"] == "-"  # CPU: no peak memory


def test_table_numbers_from_a_thousand_up_are_written_whole():
    md = report._md(pd.DataFrame({"variant": ["a", "b", "c"], "e2e_ms median": [1099.4, 4.2e-5, float("nan")]}))
    assert [r["e2e_ms median"] for r in markdown_tables(md)[0]] == ["1099", "4.2e-05", "-"]  # not 1.1e+03


def test_cold_warm_draws_each_directorys_own_medians(three_dirs):
    _, summary = sources.load(three_dirs)
    fig = figures.fig_cold_warm(summary)
    drawn = sorted(round(bar.get_width(), 4) for bar in fig.axes[0].patches)
    medians = pd.concat(pd.read_csv(d / "summary.csv") for d in three_dirs)
    medians = medians[(medians["variant"] == "prefix") & (medians["metric"] == "ttft_ms")]["median"]
    assert len(drawn) == 6 and drawn == sorted(round(m, 4) for m in medians)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "prefix (a/results)", "prefix (b/results)", "prefix (c/results)"]
    plt.close(fig)


# ---- figures ----------------------------------------------------------------------------------
def drawn_texts(fig, monkeypatch) -> list[Text]:
    """The non-empty texts drawing the figure draws (tick labels outside the view are not)."""
    drawn = {}
    draw = Text.draw

    def recording(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn[id(self)] = self
        return draw(self, renderer)

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", recording)
        fig.canvas.draw()
    return list(drawn.values())


def assert_readable(fig, monkeypatch) -> list[str]:
    """No two texts overlap and none leaves the figure; returns the texts."""
    texts = drawn_texts(fig, monkeypatch)
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    page = fig.bbox
    for text, b in boxes:
        assert b.x0 >= page.x0 - 1 and b.y0 >= page.y0 - 1 and b.x1 <= page.x1 + 1 and b.y1 <= page.y1 + 1, (
            f"{text!r} leaves the figure: {b} outside {page}")
    for i, (t1, b1) in enumerate(boxes):
        for t2, b2 in boxes[i + 1:]:
            w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
            h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
            assert w <= 1 or h <= 1, f"{t1!r} overlaps {t2!r}"
    return [t for t, _ in boxes]


@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_every_figure_is_readable_with_30_results(many, name, monkeypatch):
    fig = figures.FIGURES[name](many)
    assert fig is not None
    texts = assert_readable(fig, monkeypatch)
    if name in ("phases", "latency_ci", "memory", "fidelity"):  # failed and skipped results are rows too
        assert FAILED in texts and SKIPPED in texts
        assert "skipped: graph-exact needs a CUDA device" in texts
        assert any(t.startswith("failed: RuntimeError: CUDA out of memory") and t.endswith("…") for t in texts)
    if name in ("phases", "latency_ci", "memory", "fidelity"):  # every model, whatever its workload point
        assert all(any(t.startswith((f"{m}: ", f"{m} at ")) for t in texts)
                   for m in ("tiny-llava", "tiny-vila", "tiny-internvl"))
    if name in ("phases", "latency_ci", "memory", "fidelity", "cold_warm"):  # a swept model: the point shown
        assert any(t.startswith("tiny-llava at b1 n8: ") for t in texts)
        assert not any(t.startswith("tiny-internvl at") for t in texts)  # measured at one point
    if name == "phases":
        assert {"decode", "cache store", "prefill", "vision"} <= set(texts)  # every phase in the legend
    plt.close(fig)


def test_token_agreement_bars_say_their_value_zero_included(tmp_path, monkeypatch):
    d = write_results(tmp_path / "r", [{"variant": "fp16"}, {"variant": "bnb4", "token_agree": 0.0},
                                       {"variant": "rtn4", "token_agree": 0.375}], runs=3)
    fig = figures.fig_fidelity(sources.load([d])[1])
    texts = assert_readable(fig, monkeypatch)
    assert [t.get_text() for t in fig.axes[1].texts] == ["1.00", "0.00", "0.38"]  # a share of 0 draws no bar
    assert "token agreement" in texts
    plt.close(fig)


def test_figures_name_each_directory(three_dirs, monkeypatch):
    _, summary = sources.load(three_dirs)
    for name in ("phases", "latency_ci", "memory", "fidelity"):
        fig = figures.FIGURES[name](summary)
        texts = assert_readable(fig, monkeypatch)
        assert {"fp16 (a/results)", "fp16 (b/results)", "fp16 (c/results)", "fp16+graph (c/results)"} <= set(texts)
        plt.close(fig)


def test_memory_unit_follows_the_size():
    assert mib_unit(0.76) == (1024.0, "KiB") and mib_unit(500)[1] == "MiB" and mib_unit(14_000) == (1 / 1024, "GiB")


def test_labels_name_what_differs_and_nothing_else():
    df = pd.DataFrame({"source": ["a", "a", "a", "a", "b"], "model": ["m", "m", "m", "m", "n"],
                       "variant": ["fp16", "fp16", "fp16", "bnb4", "fp16"], "cache_state": ["none"] * 5,
                       "family": ["llava"] * 5, "weights": ["random"] * 5, "engine": ["hf"] * 5, "device": ["cpu"] * 5,
                       "dtype": ["float16", "float32", "float32", "float16", "float16"],
                       "run_id": ["r1", "r1", "r2", "r1", "r1"]})
    sources.label_results(df)
    assert list(df["label"]) == ["fp16 float16", "fp16 float32 run r1", "fp16 float32 run r2", "bnb4", "fp16"]


# ---- the regression notebook's figures -----------------------------------------------------
def test_regression_figures_have_title_legend_and_readable_text(tmp_path, monkeypatch):
    results = [{"variant": "fp16"}, {"variant": "prefix", "cache_state": "warm"}]
    base = write_results(tmp_path / "base", results, runs=6, run_id="r1")
    cand = write_results(tmp_path / "cand", [{**results[0], "scale": 1.5}, results[1]], runs=6, run_id="r2", seed=1)
    b, c = load_runs(base), load_runs(cand)
    verdicts = pd.DataFrame(compare_runs(b, c, ["ttft_ms", "tpot_ms"], 0.01, 1.1))
    fig = compare_figures.fig_ratios(verdicts, 1.1)
    ax = fig.axes[0]
    assert "Candidate vs baseline" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "regression" in legend and "1.1: slower / larger beyond" in legend
    texts = assert_readable(fig, monkeypatch)
    assert "fp16 ttft_ms" in texts and "prefix [warm] tpot_ms" in texts
    plt.close(fig)
    fig = compare_figures.fig_samples(b, c, "ttft_ms")
    texts = assert_readable(fig, monkeypatch)
    assert "fp16 baseline" in texts and "prefix [warm] candidate" in texts and "ttft_ms" in fig.axes[0].get_title()
    plt.close(fig)
    cells = "\n".join(c.source for c in nbformat.read(ROOT / "notebooks" / "regression.ipynb", as_version=4).cells)
    assert "compare_figures.fig_ratios(verdicts, FACTOR)" in cells and "compare_figures.fig_samples(" in cells
    assert Path(ROOT / "scripts" / "make_notebooks.py").read_text().count("compare_figures.fig_ratios") == 1
