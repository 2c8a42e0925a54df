"""A results directory has one owner (refusals, --append, --resume, the lock file), exit codes,
faults that stay in their variant or point, and durable writes."""
import contextlib
import csv
import io
import json
import os
from pathlib import Path

import pytest

import variants
from bench.analysis.reference import process_of, processes
from bench.cli import main, run_main
from bench.engines import hf as engine_mod
from bench.measure.results import LOCK_NAME, CsvWriter
from tests.conftest import interrupt, on_run_batch_call
from variants.base import WeightsPart

TINY = ["--preset", "tiny-vila", "--device", "cpu", "--num-runs", "2", "--min-seconds", "0", "--max-new-tokens", "4",
        "--warmup", "0", "--no-fidelity"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(d):
    return {p.name: p.read_bytes() if p.is_file() else "a directory" for p in sorted(d.iterdir())}


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (read-only for the tests that use it: they copy it)."""
    out = tmp_path_factory.mktemp("finished") / "o"
    assert run_main([*TINY, "--output-dir", str(out)]) == 0
    return out


def copy_of(finished, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(finished, out)
    return out


def test_rerun_into_non_empty_dir_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    capsys.readouterr()
    assert run_main([*TINY, "--output-dir", str(out)]) == 2
    one_line_error(capsys, "is not empty")
    assert snapshot(out) == before
    other = tmp_path / "other"  # any file makes a directory non-empty
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert run_main([*TINY, "--output-dir", str(other)]) == 2
    one_line_error(capsys, "is not empty (notes.txt)")
    assert snapshot(other) == {"notes.txt": b"mine\n"}


def test_append_adds_a_run_and_summaries_keep_runs_apart(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    capsys.readouterr()
    assert run_main([*TINY, "--append", "--output-dir", str(out)]) == 0
    said = capsys.readouterr().out  # the table is this run's: one line per result, the earlier run said so
    assert sum(line.startswith("fp16 ") for line in said.splitlines()) == 1, said
    assert "hold 1 earlier run too, by run_id" in " ".join(said.split()), said
    rows = read_rows(out / "runs.csv")
    run_ids = list(dict.fromkeys(r["run_id"] for r in rows))
    assert len(run_ids) == 2 and all(run_ids)
    ttft = [s for s in read_rows(out / "summary.csv") if s["metric"] == "ttft_ms"]
    assert sorted(s["run_id"] for s in ttft) == sorted(run_ids)  # one summary per run, never pooled
    assert all(s["n"] == "2" for s in ttft)
    env = json.loads((out / "env.json").read_text())
    assert env["run_id"] == run_ids[1] and set(env["runs"]) == set(run_ids)
    # asked for, runs pool
    assert main(["summarize", str(out), "--pool-runs"]) == 0
    ttft = [s for s in read_rows(out / "summary.csv") if s["metric"] == "ttft_ms"]
    assert len(ttft) == 1 and ttft[0]["n"] == "4" and ttft[0]["run_id"] == ""
    assert main(["summarize", str(out)]) == 0
    assert len([s for s in read_rows(out / "summary.csv") if s["metric"] == "ttft_ms"]) == 2


def test_summarize_counts_the_measured_runs_not_the_warm_ups(tmp_path, capsys):
    import shutil

    from tests.conftest import ROOT

    out = tmp_path / "ci"
    shutil.copytree(ROOT / "results" / "ci-baseline", out)
    rows = read_rows(out / "runs.csv")
    measured = sum(r["kind"] == "measured" for r in rows)
    assert 0 < measured < len(rows)
    assert main(["summarize", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"from {measured} measured runs (and {len(rows) - measured} other rows of runs.csv" in said, said


def test_append_to_a_new_dir_is_a_first_run(tmp_path):
    out = tmp_path / "new"
    assert run_main([*TINY, "--append", "--output-dir", str(out)]) == 0
    assert len({r["run_id"] for r in read_rows(out / "runs.csv")}) == 1


def test_resume_needs_the_same_configuration(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    capsys.readouterr()
    assert run_main([*TINY[:-1], "--fidelity", "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--fidelity False -> True)")
    assert snapshot(out) == before
    # the same configuration, finished already: nothing runs again
    assert run_main([*TINY, "--resume", "--output-dir", str(out)]) == 0
    assert read_rows(out / "runs.csv") == read_rows(finished / "runs.csv")
    # comma lists spelled otherwise are the same configuration; another sweep is not
    assert run_main([*TINY, "--batch-size", " 01 ", "--resume", "--output-dir", str(out)]) == 0
    assert read_rows(out / "runs.csv") == read_rows(finished / "runs.csv")
    capsys.readouterr()
    assert run_main([*TINY, "--batch-size", "1,2", "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--batch-size '1' -> '1,2')")
    # --max-runs 0 follows --num-runs: a change of --num-runs names that flag alone; one given, itself
    assert run_main([*TINY, "--num-runs", "3", "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--num-runs 2 -> 3):")
    assert run_main([*TINY, "--max-runs", "50", "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--max-runs 40 -> 50):")
    # a path spelled otherwise names the same file or directory (relative to where the run begins,
    # "./", a trailing "/", "~" expanded): the same configuration; another directory is not
    from bench.quant import DEFAULT_CACHE_DIR
    from bench.run.config import DEMO_IMAGE

    monkeypatch.chdir(DEMO_IMAGE.parent)
    spelled = ["--image-path", f"./{DEMO_IMAGE.name}", "--int4-cache-dir", f"{Path(DEFAULT_CACHE_DIR).expanduser()}/"]
    assert run_main([*TINY, *spelled, "--resume", "--output-dir", str(out)]) == 0
    assert read_rows(out / "runs.csv") == read_rows(finished / "runs.csv")
    capsys.readouterr()
    assert run_main([*TINY, "--int4-cache-dir", str(tmp_path / "other"), "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, f"another configuration (--int4-cache-dir '{Path(DEFAULT_CACHE_DIR).expanduser()}' -> "
                           f"'{tmp_path / 'other'}')")
    from bench.run.runner import config_fingerprint

    same = [config_fingerprint({"int4_kernel_candidates": c}) for c in ("dense,tinygemm", "tinygemm, dense,dense")]
    assert same[0] == same[1]  # a set of kernel names: order and repeats do not matter
    assert not json.loads((out / "env.json").read_text()).get("resumed")  # it ran nothing: no resume recorded
    # a directory written while --loader defaulted to "prefetch" (recorded so) is the same configuration
    env = json.loads((out / "env.json").read_text())
    assert env["config"]["loader"] is None
    env["config"]["loader"] = "prefetch"
    (out / "env.json").write_text(json.dumps(env))
    assert run_main([*TINY, "--resume", "--output-dir", str(out)]) == 0
    del env["config"]["decode_attention"]  # written before --decode-attention existed: matmul
    (out / "env.json").write_text(json.dumps(env))
    assert run_main([*TINY, "--decode-attention", "matmul", "--resume", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    # today's default, auto, is split-kv wherever it runs: not that directory's configuration
    assert run_main([*TINY, "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--decode-attention 'matmul' -> 'auto')")
    assert run_main([*TINY, "--decode-attention", "split-kv", "--resume", "--output-dir", str(out)]) == 2
    one_line_error(capsys, "another configuration (--decode-attention 'matmul' -> 'split-kv')")
    assert snapshot(out) == before
    assert env["config"]["pdl"] == "auto"  # the default
    del env["config"]["pdl"]  # written before --pdl existed: launched without PDL, as --pdl off does
    (out / "env.json").write_text(json.dumps(env))
    before = snapshot(out)
    for pdl in ([], ["--pdl", "auto"]):  # today's default is auto
        assert run_main([*TINY, "--decode-attention", "matmul", *pdl, "--resume", "--output-dir", str(out)]) == 2
        one_line_error(capsys, "another configuration (--pdl 'off' -> 'auto')")
    assert snapshot(out) == before
    assert run_main([*TINY, "--decode-attention", "matmul", "--pdl", "off", "--resume", "--output-dir", str(out)]) == 0
    env = json.loads((out / "env.json").read_text())
    assert env["config"]["int4_fold_norms"] is True  # the default
    del env["config"]["int4_fold_norms"]  # written before --int4-fold-norms existed: norms of their own
    (out / "env.json").write_text(json.dumps(env))
    old = [*TINY, "--decode-attention", "matmul", "--pdl", "off", "--resume", "--output-dir", str(out)]
    for fold in ([], ["--int4-fold-norms"]):  # today's default folds
        assert run_main([*old, *fold]) == 2
        one_line_error(capsys, "another configuration (--int4-fold-norms False -> True)")
    assert run_main([*old, "--no-int4-fold-norms"]) == 0


def test_resume_after_a_run_left_out_goes_on_after_every_earlier_attempt(tmp_path, monkeypatch, capsys):
    """A measured run that captured is recorded, left out and made again; a resume after it numbers
    its runs past it (it numbered them from the clean ones, writing a second row of one attempt,
    which summaries would count twice)."""
    from bench.measure import compile_events

    out = tmp_path / "o"
    args = [*TINY, "--variants", "fp16", "--output-dir", str(out)]
    _, real = on_run_batch_call(monkeypatch, {1: compile_events.note_capture, 3: interrupt})
    assert run_main(args) == 130
    assert [(r["run_index"], r["compiles"]) for r in read_rows(out / "runs.csv")] == [("0", "1"), ("1", "0")]
    monkeypatch.setattr(engine_mod.HFEngine, "run_batch", real)
    assert run_main([*args[:-2], "--resume", "--output-dir", str(out)]) == 0
    assert [r["run_index"] for r in read_rows(out / "runs.csv")] == ["0", "1", "2"]
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0 and "from 2 measured runs" in capsys.readouterr().out


def test_resume_refuses_inputs_whose_contents_changed_at_the_same_paths(tmp_path, monkeypatch, capsys):
    """The settings name the image and questions files; their contents are digested too (env.json
    "inputs"), so a resume after either was rewritten is refused instead of mixing two workloads."""
    from PIL import Image

    questions, image, out = tmp_path / "q.txt", tmp_path / "x.png", tmp_path / "o"
    questions.write_text("What is here?\n")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    args = [*TINY, "--variants", "fp16", "--questions", str(questions), "--image-path", str(image),
            "--output-dir", str(out)]
    _, real = on_run_batch_call(monkeypatch, {2: interrupt})
    assert run_main(args) == 130
    monkeypatch.setattr(engine_mod.HFEngine, "run_batch", real)
    before = snapshot(out)
    resume = [*args[:-2], "--resume", "--output-dir", str(out)]
    questions.write_text("What colour is the shape?\n")
    capsys.readouterr()
    assert run_main(resume) == 2
    one_line_error(capsys, "the questions at the same paths changed")
    questions.write_text("What is here?\n")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(image)
    assert run_main(resume) == 2
    one_line_error(capsys, "the image at the same paths changed")
    assert snapshot(out) == before
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)  # the run's own inputs again: it finishes
    assert run_main(resume) == 0 and len(read_rows(out / "runs.csv")) == 2


@pytest.mark.parametrize("stop_at", [4, 8])  # in fp16's second point; in prefix's first warm group
def test_resume_finishes_an_interrupted_run_without_duplicates(tmp_path, monkeypatch, stop_at):
    out = tmp_path / "o"
    args = [*TINY, "--variants", "fp16,prefix", "--new-tokens", "2,4", "--output-dir", str(out)]
    _, real = on_run_batch_call(monkeypatch, {stop_at: interrupt})
    assert run_main(args) == 130
    first = read_rows(out / "runs.csv")
    assert len(first) == stop_at - 1
    seen_during = []  # env.json's resumed entries while the resumed process still runs

    def watched(self, *a, **k):
        seen_during.append(json.loads((out / "env.json").read_text()).get("resumed"))
        return real(self, *a, **k)

    monkeypatch.setattr(engine_mod.HFEngine, "run_batch", watched)
    assert run_main([*args[:-2], "--resume", "--output-dir", str(out)]) == 0
    # recorded with its first row (a process killed outright keeps its rows apart from the one's before)
    assert not seen_during[0] and [e["first_row"] for e in seen_during[-1]] == [stop_at - 1]
    rows = read_rows(out / "runs.csv")
    assert rows[:stop_at - 1] == first and {r["run_id"] for r in rows} == {first[0]["run_id"]}  # the same run
    resumed = json.loads((out / "env.json").read_text())["resumed"]
    assert [r["command"].endswith("--resume --output-dir " + str(out)) for r in resumed] == [True]
    starts = processes(out)  # which process wrote each row: the first's rows, then the resumed one's
    assert starts == [0, stop_at - 1] and resumed[0]["first_row"] == stop_at - 1
    assert [process_of(starts, i) for i in range(len(rows))] == [0] * (stop_at - 1) + [1] * (len(rows) - stop_at + 1)
    groups = {}
    for r in rows:
        assert r["status"] == "ok" and r["kind"] == "measured"
        groups.setdefault((r["variant"], r["new_tokens"], r["cache_state"]), []).append(int(r["run_index"]))
    assert set(groups) == {(v, n, c) for n in ("2", "4") for v, c in
                           [("fp16", "none"), ("prefix", "cold"), ("prefix", "warm")]}
    assert all(sorted(ix) == [0, 1] for ix in groups.values()), groups  # no group run twice
    assert all(r["cache_hit"] == "true" for r in rows if r["cache_state"] == "warm")  # warm after a resume too
    ttft = [s for s in read_rows(out / "summary.csv") if s["metric"] == "ttft_ms"]
    assert len(ttft) == 6 and all(s["n"] == "2" for s in ttft)
    if stop_at == 4:  # a run appended, interrupted and resumed, then another appended: both resumes kept
        on_run_batch_call(monkeypatch, {stop_at: interrupt})
        assert run_main([*args[:-2], "--append", "--output-dir", str(out)]) == 130
        appended_from = len(read_rows(out / "runs.csv"))
        monkeypatch.setattr(engine_mod.HFEngine, "run_batch", real)
        assert run_main([*args[:-2], "--resume", "--output-dir", str(out)]) == 0
        assert run_main([*args[:-2], "--variants", "fp16", "--append", "--output-dir", str(out)]) == 0
        assert processes(out) == [0, stop_at - 1, appended_from]


def test_a_held_lock_refuses_and_a_stale_one_is_taken(tmp_path, capsys):
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{os.getpid()}\n")
    with open(out / LOCK_NAME) as held:  # a live run holds its lock
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_main([*TINY, "--output-dir", str(out)]) == 2
        one_line_error(capsys, f"in use by another run (PID {os.getpid()}")
        assert snapshot(out) == {LOCK_NAME: f"{os.getpid()}\n".encode()}
    # a stale lock file, even one whose PID is a live process now (PID 1: reused), is taken over
    (out / LOCK_NAME).write_text("1\n")
    assert run_main([*TINY, "--output-dir", str(out)]) == 0
    assert not (out / LOCK_NAME).exists()  # removed at exit
    assert {"runs.csv", "summary.csv", "env.json"} <= set(snapshot(out))


def test_output_dir_that_is_a_file_or_foreign(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me\n")
    assert run_main([*TINY, "--output-dir", str(f)]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert f.read_text() == "keep me\n"
    assert run_main([*TINY, "--output-dir", str(f / "sub")]) == 2
    one_line_error(capsys, "is a file, not a directory")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "runs.csv").write_text("date,price\n2024-01-01,3\n")
    for flag in ([], ["--append"], ["--resume"]):
        assert run_main([*TINY, *flag, "--output-dir", str(foreign)]) == 2
        one_line_error(capsys, "columns this harness does not write")
    assert snapshot(foreign) == {"runs.csv": b"date,price\n2024-01-01,3\n"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run_main([*TINY, "--output-dir", str(ro / "o")]) == 2
        one_line_error(capsys, "is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_exit_3_when_nothing_is_measured(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_main([*TINY, "--variants", "fp16+graph", "--output-dir", str(out)]) == 3
    assert "nothing measured" in capsys.readouterr().err
    assert [r["status"] for r in read_rows(out / "runs.csv")] == ["skipped"]
    assert [s["status"] for s in read_rows(out / "summary.csv")] == ["skipped"]


class _Broken(WeightsPart):
    name, description = "brokentest", "test part: its weights fail to load"

    def key(self, options):
        return (self.name,)

    def load(self, *a, **k):
        raise KeyError("no such tensor: lm_head.weight")  # not one of the errors a part usually raises


@pytest.fixture
def broken():
    part = variants.register(_Broken())
    yield part
    variants.unregister(part.name)


def test_exit_1_when_one_variant_fails_and_another_is_measured(broken, tmp_path):
    out = tmp_path / "o"
    assert run_main([*TINY, "--variants", "brokentest,fp16", "--output-dir", str(out)]) == 1
    rows = read_rows(out / "runs.csv")
    assert rows[0]["variant"] == "brokentest" and rows[0]["status"] == "failed"
    assert rows[0]["error"].startswith("KeyError:")
    assert [r["status"] for r in rows[1:]] == ["ok", "ok"]


def test_memory_error_in_one_point_leaves_the_next_point_its_rows(tmp_path):
    out = tmp_path / "o"
    real = engine_mod.HFEngine.run_batch
    calls = {"n": 0}

    def host_oom(self, requests, new_tokens, *a, **k):
        calls["n"] += 1
        if new_tokens == 2 and calls["n"] == 2:
            raise MemoryError("cannot allocate 64 GiB")
        return real(self, requests, new_tokens, *a, **k)

    import unittest.mock as mock

    with mock.patch.object(engine_mod.HFEngine, "run_batch", host_oom):
        rc = run_main([*TINY, "--new-tokens", "2,4", "--output-dir", str(out)])
    assert rc == 1
    rows = read_rows(out / "runs.csv")
    n2 = [r for r in rows if r["new_tokens"] == "2"]
    assert [r["status"] for r in n2] == ["ok", "failed"] and n2[1]["error"] == "MemoryError: cannot allocate 64 GiB"
    n4 = [r for r in rows if r["new_tokens"] == "4"]
    assert [r["status"] for r in n4] == ["ok", "ok"]
    summary = read_rows(out / "summary.csv")
    assert any(s["new_tokens"] == "4" and s["metric"] == "ttft_ms" and s["n"] == "2" for s in summary)
    assert any(s["new_tokens"] == "2" and s["status"] == "failed" for s in summary)


def test_exit_codes_are_in_help():
    from bench.run.config import build_parser

    text = build_parser().format_help()
    assert "exit codes:" in text and "130" in text and "nothing measured" in text and "no space left" in text


def test_rows_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    w = CsvWriter(tmp_path / "x.csv", ["a", "b"])
    n = len(synced)
    w.write({"a": 1, "b": 2})
    assert len(synced) == n + 1
    w.close()


def test_default_output_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # within one second the second run gets its own directory
        assert run_main(TINY) == 0
    dirs = sorted((tmp_path / "results" / "local").iterdir())
    assert len(dirs) == 2 and all((d / "summary.csv").is_file() for d in dirs)


def test_memory_error_while_summarising_keeps_the_previous_summary(finished, tmp_path, monkeypatch, capsys):
    from bench.run import runner

    out = copy_of(finished, tmp_path)
    before = (out / "summary.csv").read_bytes()

    def no_memory(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(runner, "summarize_runs", no_memory)
    assert run_main([*TINY, "--append", "--output-dir", str(out)]) == 0  # the rows were measured
    assert (out / "summary.csv").read_bytes() == before  # never half-written, never 0 bytes
    assert "python -m bench summarize" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_NAME]
    assert len({r["run_id"] for r in read_rows(out / "runs.csv")}) == 2


def test_append_after_a_row_cut_off_keeps_every_run_apart(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    runs = out / "runs.csv"
    whole = runs.read_bytes()
    runs.write_bytes(whole[:-25])  # a run killed while writing its last row
    assert run_main([*TINY, "--append", "--output-dir", str(out)]) == 0
    assert "its last row was cut off" in capsys.readouterr().err
    rows = read_rows(runs)
    old, new = [r for r in rows if r["run_id"] == rows[0]["run_id"]], [r for r in rows if r["run_id"] != rows[0]["run_id"]]
    assert len(old) == 1 and len(new) == 2  # the cut row dropped, the new run's rows whole, none glued onto it
    assert all(r["status"] == "ok" and r["ttft_ms"] for r in new)


def test_summarize_report_and_compare_leave_out_a_row_cut_off_as_resume_does(finished, tmp_path, capsys):
    """What a run killed mid-row leaves: its whole rows are read, the cut one left out with a
    warning (it was refused as a corrupt file, though --resume and --append take it)."""
    out = copy_of(finished, tmp_path)
    runs = out / "runs.csv"
    runs.write_bytes(runs.read_bytes()[:-25])
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    assert "from 1 measured runs" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "its last row was cut off" in capsys.readouterr().err
    assert main(["compare", str(finished), str(out), "--min-samples", "1"]) in (0, 2)  # 1 run: inconclusive
    said = capsys.readouterr()
    assert "its last row was cut off" in said.err and "2/1 runs" in said.out, said


def test_a_runs_csv_a_spreadsheet_saved_with_a_byte_order_mark_is_read_by_resume_as_by_summarize(
        finished, tmp_path):
    out = copy_of(finished, tmp_path)
    runs = out / "runs.csv"
    runs.write_bytes(b"\xef\xbb\xbf" + runs.read_bytes())
    before = runs.read_bytes()
    assert main(["summarize", str(out)]) == 0
    assert run_main([*TINY, "--resume", "--output-dir", str(out)]) == 0  # finished already: nothing to run
    assert runs.read_bytes() == before  # every result was there: no row added, none lost


def _first_row(text: bytes, change) -> bytes:
    """runs.csv's bytes with its first row changed by change(header, row) (a list, in place)."""
    rows = list(csv.reader(io.StringIO(text.decode(), newline="")))
    change(rows[0], rows[1])
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def _cell(text: bytes, column: str, value: str) -> bytes:
    return _first_row(text, lambda head, row: row.__setitem__(head.index(column), value))


@pytest.mark.parametrize("name,data,mode,needle", [
    ("env.json", "[1, 2]", "--append", "not an env.json this harness writes"),
    ("env.json", '{"config": "fp16", "run_id": "x"}', "--resume", "not an env.json this harness writes"),
    ("env.json", "{}", "--append", "not an env.json this harness writes"),
    # its rows' run could not be continued under its own id
    ("env.json", lambda t: t.replace(b'"run_id"', b'"run_id_"', 1), "--resume", "records no run_id"),
    ("env.json", '{"config": ' + "[" * 100000, "--resume", "is not readable JSON (RecursionError)"),
    # rows of binary under the harness's own header
    ("runs.csv", lambda t: t[: t.index(b"\n") + 1] + b"\xff\xfe\x00 binary\n", "--resume", "is a binary file"),
    ("runs.csv", lambda t: t[: t.index(b"\n") + 1] + b"\xff\xfe binary\n", "--resume", "is not UTF-8 text"),
    # a whole row (its line end written) with a field too many, then more rows
    ("runs.csv", lambda t: _first_row(t, lambda head, row: row.append("extra")), "--resume", "line 2 has"),
    ("runs.csv", lambda t: _cell(t, "batch_size", "abc"), "--append", "column batch_size: 'abc' is not a whole number"),
    ("runs.csv", lambda t: _cell(t, "ttft_ms", "fast"), "--resume", "column ttft_ms: 'fast' is not a finite number"),
    ("runs.csv", lambda t: _cell(t, "ttft_ms", "inf"), "--append", "column ttft_ms: 'inf' is not a finite number"),
    ("runs.csv", lambda t: _cell(t, "tpot_ms", "1_000"), "--resume", "column tpot_ms: '1_000' is not a finite number"),
    ("runs.csv", lambda t: _cell(t, "ttft_ms", "-3.5"), "--append", "column ttft_ms: '-3.5' is below 0"),
    ("runs.csv", lambda t: _cell(t, "question_tokens", "-1"), "--resume", "column question_tokens: '-1' is below 0"),
    ("runs.csv", lambda t: _cell(t, "ttft_ms", "1e308"), "--resume", "column ttft_ms: '1e308' is above 1e+15"),
    # --resume counts the attempts made from the run indexes
    ("runs.csv", lambda t: _cell(t, "run_index", "x"), "--resume", "column run_index: 'x' is not a whole number"),
    ("runs.csv", lambda t: _cell(t, "run_index", "-2"), "--resume", "column run_index: '-2' is not a whole number"),
    # a row copied by hand would count twice in every summary
    ("runs.csv", lambda t: t + t[t.index(b"\n") + 1:], "--append", "repeats the run of line 2"),
    ("summary.csv", "a directory", "--append", "summary.csv: a directory, not a file; remove it"),
])
def test_append_or_resume_onto_damaged_files(finished, tmp_path, capsys, name, data, mode, needle):
    """Refused with one line naming the file and what is wrong, nothing written."""
    out = copy_of(finished, tmp_path)
    if data == "a directory":
        (out / name).unlink()
        (out / name).mkdir()
    else:
        if callable(data):
            data = data((out / name).read_bytes())
        (out / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    before = snapshot(out)
    capsys.readouterr()
    assert run_main([*TINY, mode, "--output-dir", str(out)]) == 2
    one_line_error(capsys, needle)
    assert snapshot(out) == before


def _signalled_at_the_second_batch(signal_it, tmp_path, monkeypatch, capsys) -> list[dict]:
    """A 5-run tiny run whose second batch first calls signal_it(): it ends with exit 130 and
    "interrupted", keeping 1 to 4 rows, all ok; those rows."""
    out = tmp_path / "o"
    on_run_batch_call(monkeypatch, {2: signal_it})
    assert run_main([*TINY, "--num-runs", "5", "--output-dir", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    rows = read_rows(out / "runs.csv")
    assert 1 <= len(rows) < 5 and all(r["status"] == "ok" for r in rows)
    return rows


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """A CI job's timeout or `kill`: exit 130, finished rows and their summary kept, lock released."""
    import signal

    _signalled_at_the_second_batch(lambda: os.kill(os.getpid(), signal.SIGTERM), tmp_path, monkeypatch, capsys)
    out = tmp_path / "o"
    assert (out / "summary.csv").is_file() and not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, as meant
def test_a_stop_signal_handled_inside_a_finalizer_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """Python runs a handler wherever the main thread is, a `__del__` included, where the
    KeyboardInterrupt it raises is printed and dropped: the run still stops before its next timed
    run, exit 130, finished rows kept."""
    import signal

    class SignalledWhileFinalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer

    # finalized at once: its KeyboardInterrupt is dropped, the run goes on to its next timed run
    _signalled_at_the_second_batch(SignalledWhileFinalized, tmp_path, monkeypatch, capsys)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_files_written_whole_get_the_mode_an_ordinary_new_file_gets(tmp_path):
    """summary.csv and env.json go through a temporary file; they end up readable as runs.csv is
    (the umask's mode), not mkstemp's owner-only 0600."""
    import stat

    from bench.measure.results import write_json

    (tmp_path / "plain").write_text("x")
    write_json(tmp_path / "env.json", {"a": 1})
    mode = stat.S_IMODE((tmp_path / "env.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_text_cells_escape_control_characters_and_keep_every_other_character():
    """What breaks a one-line cell or a terminal (NUL, escapes, line ends, lone surrogates) is
    escaped; text of any script, non-breaking spaces and joiners are kept as written."""
    from bench.measure.results import printable

    kept = "Qu'est-ce que c'est\u00a0? \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \U0001F469\u200d\U0001F4BB soft\u00adhyphen 日本"
    assert printable(kept) == kept
    assert printable("a\x00b\x1b[31m\nc\u2028\ud800") == "a\\x00b\\x1b[31m\\nc\\u2028\\ud800"


_UNPRIVILEGED = r"""
import contextlib, io, json, sys
from bench.cli import main, run_main
d = json.loads(sys.argv[1])
said = {}
for name, call, args in (("summarize read-only dir", main, ["summarize", d["ro"]]),
                         ("summarize unreadable runs.csv", main, ["summarize", d["hidden"]]),
                         ("append onto read-only runs.csv", run_main, d["append"]),
                         ("report into a read-only README", main, ["report", d["ok"], "--out", d["out"],
                                                                   "--readme", d["readme"]])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = call(args)
        except SystemExit as e:
            rc = e.code
    said[name] = [rc, err.getvalue()]
print(json.dumps(said))
"""


def test_results_files_this_user_cannot_read_or_write_are_one_line_errors(finished, tmp_path):
    """summarize into a read-only directory, a runs.csv this user cannot read, --append onto one it
    cannot write, report --readme onto a read-only README: one line, exit 2, nothing written.
    (Run as an unprivileged user: root reads and writes past file modes.)"""
    import shutil
    import stat
    import subprocess
    import sys
    import tempfile

    from bench.analysis.report import END, START
    from tests.conftest import ROOT

    user = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop privileges")
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="vlm-perm-"))  # outside pytest's root-only folder
    try:
        base.chmod(0o755)
        dirs = {k: base / k for k in ("ro", "hidden", "append", "ok")}
        for d in dirs.values():
            shutil.copytree(finished, d)
            d.chmod(0o777)
        dirs["ro"].chmod(0o555)
        (dirs["hidden"] / "runs.csv").chmod(0)
        for f in dirs["append"].iterdir():
            f.chmod(0o444 if f.name == "runs.csv" else 0o666)
        readme = base / "README.md"
        readme.write_text(f"# r\n\n{START}\n{END}\n")
        readme.chmod(0o444)
        base.chmod(0o777)
        spec = {**{k: str(v) for k, v in dirs.items()}, "out": str(base / "report"), "readme": str(readme),
                "append": [*TINY, "--append", "--output-dir", str(dirs["append"])]}
        def files():  # what the commands may not change (the user's home is theirs)
            return {p: p.read_bytes() if p.stat().st_mode & stat.S_IRUSR else None
                    for p in base.rglob("*") if p.is_file() and "home" not in p.relative_to(base).parts}

        before = files()
        probe = subprocess.run([*user, sys.executable, "-c", "import bench.cli"], cwd=ROOT, capture_output=True)
        if probe.returncode:
            pytest.skip("the unprivileged user cannot read this checkout")
        home = base / "home"  # the int4 cache's default folder is under it
        home.mkdir()
        home.chmod(0o777)
        done = subprocess.run([*user, sys.executable, "-c", _UNPRIVILEGED, json.dumps(spec)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(home)})
        assert done.returncode == 0, done.stderr[-3000:]
        said = json.loads(done.stdout.strip().splitlines()[-1])
        for name, (rc, err) in said.items():
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, rc, err[-1500:])
        assert "not writable" in said["summarize read-only dir"][1]
        assert "cannot be read" in said["summarize unreadable runs.csv"][1]
        assert "not readable and writable" in said["append onto read-only runs.csv"][1]
        assert "is not writable" in said["report into a read-only README"][1]
        assert not (base / "report").exists()
        assert files() == before  # nothing written, nothing changed
    finally:
        for p in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o777)
        shutil.rmtree(base, ignore_errors=True)


def test_two_rows_of_one_attempt_written_at_different_times_are_read(finished, tmp_path, capsys):
    """What a resume before attempts were numbered past the runs left out could write (two ok rows
    of one run_index, at different times) is read; a copied row (the same time too) is refused."""
    out = copy_of(finished, tmp_path)
    runs = out / "runs.csv"
    text = runs.read_text()
    last = text.splitlines()[-1]
    stamp = last.split(",")[0]
    runs.write_text(text + last.replace(stamp, "2026-01-01T00:00:00+00:00", 1) + "\n")
    assert main(["summarize", str(out)]) == 0
    runs.write_text(text + last + "\n")
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 2
    one_line_error(capsys, "repeats the run of line")


def test_a_runs_csv_naming_a_column_twice_is_refused_by_every_reader(finished, tmp_path, capsys):
    """A reader by name keeps one of two columns of one name and loses the other unseen: summarize,
    compare and report refuse the file with one line naming the column."""
    out = copy_of(finished, tmp_path)
    runs = out / "runs.csv"
    runs.write_bytes(_first_row(runs.read_bytes(),
                                lambda head, row: head.__setitem__(head.index("tpot_ms"), "ttft_ms")))
    before = snapshot(out)
    for args in (["summarize", str(out)], ["compare", str(finished), str(out)],
                 ["report", str(out), "--out", str(tmp_path / "report")]):
        capsys.readouterr()
        assert main(args) == 2, args
        one_line_error(capsys, "the header names 'ttft_ms' more than once")
    assert snapshot(out) == before and not (tmp_path / "report").exists()


def test_a_checkpoints_digest_leaves_out_hidden_files(tmp_path):
    """--resume compares the checkpoint's file names, sizes and config.json; what an editor, git or
    a download tool leaves in hidden folders is not the model."""
    from bench.run.config import RunConfig
    from bench.run.runner import input_digests

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    cfg = RunConfig(model_path=str(model))
    first = input_digests(cfg, b"img", ["q"])["model"]
    (model / ".ipynb_checkpoints").mkdir()
    (model / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    (model / ".DS_Store").write_bytes(b"1")
    assert input_digests(cfg, b"img", ["q"])["model"] == first
    (model / "model.safetensors").write_bytes(b"x" * 11)
    assert input_digests(cfg, b"img", ["q"])["model"] != first


def test_a_disk_that_fills_is_one_line_and_its_own_exit_code(tmp_path, monkeypatch, capsys):
    """No space left while a run writes its rows (or any command its files): one line naming the
    file and what to do, exit code 4 (NO_ROOM), not an 85-line chained traceback and exit 1 (which
    says some variant failed); the rows written before stay, and --resume continues once there is
    room. The entry script (no `main` around it) says the same."""
    import errno

    from bench.cli import NO_ROOM, entry

    write, written = CsvWriter.write, []

    def filling(self, row):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        written.append(row)
        return write(self, row)

    monkeypatch.setattr(CsvWriter, "write", filling)
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["run", *TINY, "--variants", "fp16,prefix", "--output-dir", str(out)]) == NO_ROOM == 4
    err = capsys.readouterr().err.strip()  # (the run's status lines, then the error)
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: no space left on the device writing") \
        and "runs.csv" in last, err
    assert len(read_rows(out / "runs.csv")) == 3
    monkeypatch.setattr(CsvWriter, "write", write)  # room again
    assert main(["run", *TINY, "--variants", "fp16,prefix", "--output-dir", str(out), "--resume"]) == 0
    assert len(read_rows(out / "runs.csv")) == 6  # the 3 kept and the 3 not written before

    def full():
        try:
            raise ValueError("while writing")  # a library's own error, raised while handling ENOSPC
        finally:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(SystemExit) as stop:
        entry(full)
    assert stop.value.code == NO_ROOM and "no space left on the device (Disk quota exceeded)" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # anything else keeps its traceback
        entry(lambda: 1 / 0)


ENDPOINT_KEPT = "; the run's finished rows are in its runs.csv (`summarize` builds their summary once there is room)"


@pytest.mark.parametrize("argv,kept", [
    (["run", "--endpoint", "http://h/v1"], ENDPOINT_KEPT),
    (["--endpoint=http://h/v1"], ENDPOINT_KEPT),  # (no --resume there)
    (["--num-runs", "3"], "; a run's finished rows are in its runs.csv (--resume continues it once there is room)"),
    (["summarize", "d"], ""),
])
def test_a_full_disk_line_says_what_each_command_kept(argv, kept, capsys):
    import errno

    from bench.cli import NO_ROOM, _runs, _said_no_room

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "d/runs.csv")
    assert _said_no_room(full, argv, _runs(argv)) == NO_ROOM
    assert capsys.readouterr().err == f"error: no space left on the device writing d/runs.csv ({full.strerror}){kept}\n"


class FullFile(io.StringIO):
    """A text file on a full disk: every write fails with ENOSPC naming no file, as a real
    write's or flush's does."""

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk(monkeypatch, when=lambda: True) -> None:
    """Files written atomically (env.json, summary.csv, docs) land on a full disk while `when()`
    holds: their temporary files' writes fail (FullFile). No device is opened."""
    import tempfile

    from bench.measure import results

    mkstemp, fdopen, ours = tempfile.mkstemp, os.fdopen, set()

    def mkstemp_full(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        if when():
            ours.add(fd)
        return fd, name

    def fdopen_full(fd, *args, **kwargs):
        if fd in ours:
            ours.discard(fd)
            os.close(fd)
            return FullFile()
        return fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(results.tempfile, "mkstemp", mkstemp_full)
    monkeypatch.setattr(results.os, "fdopen", fdopen_full)


def disk_full_at_rows(monkeypatch, env_too: bool = False) -> None:
    """From the first row a run writes on, runs.csv is on a full disk (FullFile); with `env_too`,
    from then on every file written atomically (env.json, summary.csv) too."""
    write, full = CsvWriter.write, []

    def onto_full(self, row):
        if not full:
            full.append(True)
            self._f.close()
            self._f = FullFile()
            self._w = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="raise")
        return write(self, row)

    monkeypatch.setattr(CsvWriter, "write", onto_full)
    if env_too:
        full_disk(monkeypatch, when=lambda: bool(full))


def test_a_disk_full_before_any_row_leaves_nothing_and_names_the_file(tmp_path, monkeypatch, capsys):
    """A disk with no room for the run's first file (env.json, written before any model loads)
    or its first row: exit 4, one line naming the file (a write's or flush's OSError names none;
    the file is named all the same) and saying nothing was written, and no directory left (one
    holding runs.csv and summary.csv without env.json, which --resume, a rerun and summarize
    refuse). An --append whose env.json the full disk keeps from being put back is not said to
    have written nothing. `docs` leaves no part of its file."""
    import errno

    from bench.cli import NO_ROOM

    no_space = os.strerror(errno.ENOSPC)
    with monkeypatch.context() as m:
        full_disk(m)
        out = tmp_path / "new" / "o"
        capsys.readouterr()
        assert main(["run", *TINY, "--variants", "fp16", "--output-dir", str(out)]) == NO_ROOM
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == (f"error: no space left on the device writing {out / 'env.json'} ({no_space}); nothing was "
                        "written")
        assert not (tmp_path / "new").exists()
        assert main(["docs", str(tmp_path / "README.md")]) == NO_ROOM
        said = capsys.readouterr().err.strip()
        assert said == f"error: no space left on the device writing {tmp_path / 'README.md'} ({no_space})"
        assert not (tmp_path / "README.md").exists()  # atomically: no part of the file
    with monkeypatch.context() as m:
        disk_full_at_rows(m)
        assert main(["run", *TINY, "--variants", "fp16", "--output-dir", str(out)]) == NO_ROOM
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == (f"error: no space left on the device writing {out / 'runs.csv'} "
                                                f"({no_space}); nothing was written") and "summary.csv" not in err, err
        assert not (tmp_path / "new").exists()
    assert main(["run", *TINY, "--variants", "fp16", "--output-dir", str(out)]) == 0  # room again
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with monkeypatch.context() as m:
        disk_full_at_rows(m, env_too=True)  # env.json names the appended run: not put back
        assert main(["run", *TINY, "--variants", "fp16", "--output-dir", str(out), "--append"]) == NO_ROOM
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "writing" in last and "nothing was written" not in last and "--resume" in last, last
    assert (out / "runs.csv").read_bytes() == kept["runs.csv"]
