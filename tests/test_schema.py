"""The column table and a result's identity (bench.measure.schema): one definition each."""
import re

import pytest

from bench.measure.results import CsvWriter
from bench.measure.schema import (BY_NAME, COLUMNS, IDENTITY_DEFAULTS, RESULT_KEY, RUN_COLUMNS, SUMMARY_COLUMNS,
                                  SUMMARY_KEY, SUMMARY_METRICS, WORKLOAD_KEYS, point_label)


def test_one_table_for_columns_metrics_and_directions():
    assert list(RUN_COLUMNS) == [c.name for c in COLUMNS] and len(BY_NAME) == len(COLUMNS)
    assert sorted(SUMMARY_METRICS) == sorted(c.name for c in COLUMNS if c.summarized)
    assert SUMMARY_METRICS[:2] == ["ttft_ms", "prefill_ms"]  # summary.csv: latency first
    assert all(c.description and c.higher_is_better in (True, False, None) for c in COLUMNS)
    # identity columns are columns of both files, never metrics
    assert set(SUMMARY_KEY) <= set(RUN_COLUMNS) and set(SUMMARY_KEY) <= set(SUMMARY_COLUMNS)
    assert all(BY_NAME[k].higher_is_better is None for k in SUMMARY_KEY)
    assert set(IDENTITY_DEFAULTS) == set(SUMMARY_KEY) and set(WORKLOAD_KEYS) <= set(RESULT_KEY)
    assert {"dtype", "device", "family", "weights", "engine", "cache_state"} <= set(RESULT_KEY)


def test_point_label_is_the_workload_points():
    from bench.run.workload import WorkloadPoint

    for p in (WorkloadPoint(), WorkloadPoint(4, 32, 64, 2, "prefetch"), WorkloadPoint(question_tokens=None)):
        row = {k: ("" if v is None else str(v)) for k, v in p.columns().items()}  # as read back from a CSV
        assert point_label(p.columns()) == point_label(row) == p.label()
    assert WorkloadPoint(4, 32, 64, 2, "prefetch").label() == "b4 n64 q32 img2 prefetch"


def test_docs_render_unit_and_direction():
    from bench.analysis.docs import render

    text = render()
    assert "| `output_tok_s` | tokens/s | higher | yes |" in text
    assert "| `ttft_ms` | ms | lower | yes |" in text
    # a description listing values as 'a | b' stays in its cell: every table row has its table's cells
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) in (2, 5), line


def test_csv_writer_never_appends_under_other_columns(tmp_path):
    from bench.errors import UsageError

    w = CsvWriter(tmp_path / "runs.csv", ["a", "b"])
    w.write({"a": 1, "b": 2})
    w.close()
    CsvWriter(tmp_path / "runs.csv", ["a", "b"]).close()  # same columns: appended to
    with pytest.raises(UsageError, match="other columns"):
        CsvWriter(tmp_path / "runs.csv", ["a", "run_id", "b"])
