"""The end-of-run console table: fits 100 columns, names whole, dtype shown, ok rows first."""
import re

from rich.console import Console

from bench.analysis.console import NARROW, PRIORITY, SERVED_SHOWN, SHOWN, SWEEP_SHOWN, print_summary
from bench.measure.schema import SUMMARY_METRICS, title

LONG = ["awq4+prefix+graph-exact", "bnb4-fp4+embedcache+static", "fp16+graph-exact", "fp16"]


def summary_rows() -> list[dict]:
    """summary.csv rows of a CPU sweep: long variant names on several engines, three batch sizes,
    cold and warm cache states, and one failed and one skipped variant listed before them."""
    base = {"model": "tiny-vila", "family": "vila", "weights": "random", "device": "cpu", "dtype": "float32",
            "question_tokens": 0, "new_tokens": 128, "num_images": 1, "loader": "", "run_id": "r1"}
    rows = [{**base, "variant": "bnb8+prefix+graph-exact", "engine": "graph-exact", "cache_state": "none",
             "batch_size": 1, "status": "failed", "error": "OutOfMemoryError: CUDA out of memory. " * 4},
            {**base, "variant": "bnb4+static", "engine": "static", "cache_state": "none", "batch_size": 1,
             "status": "skipped", "error": "bnb4 needs the package 'bitsandbytes' (not installed)"}]
    for variant in LONG:
        engine = next((e for e in ("graph-exact", "static") if variant.endswith("+" + e)), "hf")
        for state in (("cold", "warm") if "prefix" in variant or "embedcache" in variant else ("none",)):
            for batch in (1, 4, 16):
                for i, metric in enumerate(SHOWN + SWEEP_SHOWN):
                    rows.append({**base, "variant": variant, "engine": engine, "cache_state": state,
                                 "batch_size": batch, "status": "ok", "metric": metric, "n": 12,
                                 "median": 1234.5678 / (i + 1) * batch, "valid": i % 2 == 0})
    return rows


def render(width: int | None = NARROW, wide: bool = False) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    print_summary(summary_rows(), "results/local/x", "random", console=console, wide=wide)
    return console.export_text().splitlines()


def test_table_fits_100_columns_with_whole_names_dtype_and_ok_rows_first():
    lines = render()
    assert max(map(len, lines)) <= NARROW
    text = "\n".join(lines)
    words = set(text.split())
    assert set(LONG) | {"bnb8+prefix+graph-exact", "bnb4+static"} <= words  # never cut
    assert "graph-exact" in words and "static" in words  # the engine column
    table_rows = [line for line in lines if re.match(r"\S+\s+(hf|static|graph-exact)\s", line)]
    assert all("float32" in line for line in table_rows) and len(table_rows) == 3 * (2 + 2 + 1 + 1) + 2
    statuses = [line.split()[-1] for line in table_rows]
    assert statuses[-2:] == ["skipped", "failed"] and set(statuses[:-2]) <= {"yes", "no"}
    for heading in ("TTFT", "TPOT"):
        assert heading in text
    assert "not shown here:" in text and "--wide" in text
    assert "b16 n128" in text  # the workload point
    assert "valid no: a TTFT or TPOT summary missed" in " ".join(text.split())  # what "no" means
    assert lines[-1] == "results in results/local/x/: runs.csv, summary.csv, env.json"


def test_wide_shows_every_metric():
    lines = render(width=300, wide=True)
    text = " ".join(" ".join(lines).split())
    assert "not shown here" not in text
    for metric in SHOWN + SWEEP_SHOWN:
        assert title(metric).split(" ", 1)[0] in text, metric


def test_narrow_terminal_keeps_names_whole():
    lines = render(width=80)
    assert max(map(len, lines)) <= 80 and "awq4+prefix+graph-exact" in "\n".join(lines)


def test_every_metric_a_table_shows_is_one_summary_csv_has():
    """The table shows summary.csv's medians: a column of a metric that is not summarised (one
    value per point, e.g. goodput_rps) would be empty in every row."""
    shown = {*SHOWN, *SWEEP_SHOWN, *SERVED_SHOWN}
    assert shown <= set(SUMMARY_METRICS), shown - set(SUMMARY_METRICS)
    assert shown <= set(PRIORITY), shown - set(PRIORITY)  # the narrow table ranks each


def test_random_weights_note_speaks_of_fidelity_only_where_it_was_measured():
    def note(rows) -> str:
        console = Console(width=NARROW, record=True, file=open("/dev/null", "w"))
        print_summary(rows, "results/local/x", "random", console=console)
        return " ".join(console.export_text().split())

    assert "weights=random" in note(summary_rows()) and "numeric fidelity only" in note(summary_rows())
    without = [r for r in summary_rows() if r.get("metric") not in ("token_agree", "kl_mean", "engine_kl_mean")]
    said = note(without)  # --no-fidelity: no such columns, nothing said of them
    assert "generated text is meaningless." in said and "token agree" not in said


def test_valid_means_ttft_and_tpot_as_in_the_report():
    """A result whose TPOT summary is not valid is not valid (the report's speedup table reads
    the same VALIDITY_METRICS), and the note below the table gives the reason."""
    from bench.measure.schema import VALIDITY_METRICS

    base = {"model": "m", "variant": "bnb8", "engine": "hf", "device": "cpu", "dtype": "float32",
            "cache_state": "none", "batch_size": 1, "new_tokens": 8, "status": "ok", "n": 10, "median": 5.0}
    rows = [{**base, "metric": m, "valid": m != "tpot_ms",
             "invalid_reason": "cv 0.12 > --max-cv 0.1" if m == "tpot_ms" else ""}
            for m in ("ttft_ms", "tpot_ms", "e2e_ms")]
    console = Console(width=NARROW, record=True, file=open("/dev/null", "w"))
    print_summary(rows, "out", "checkpoint", console=console)
    lines = console.export_text().splitlines()
    row = next(line for line in lines if line.startswith("bnb8"))
    assert VALIDITY_METRICS == ("ttft_ms", "tpot_ms") and row.split()[-1] == "no"
    assert "bnb8 none b1 n8 TPOT: cv 0.12 > --max-cv 0.1" in " ".join(" ".join(lines).split())
