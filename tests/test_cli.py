"""The command line as users run it: seed flags, outputs, and every error a user can act on."""
import csv
import subprocess
import sys
import time

import pytest
import torch

from bench.cli import main, run_main
from bench.measure.metrics import phases_total_ms
from bench.measure.schema import RUN_COLUMNS, SUMMARY_COLUMNS
from tests.conftest import DEMO, ROOT, interrupt, on_run_batch_call
from variants.base import WeightsPart


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def floats(row):
    return {k: float(v) if v not in ("", None) and k.endswith(("_ms", "_s", "_mb")) else v for k, v in row.items()}


def test_seed_command_line(tiny_vila_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_main(["--num-runs", "3", "--model-path", str(tiny_vila_dir), "--image-path", str(DEMO),
                   "--text-prompt", "What is in the picture?", "--conv-mode", "vicuna_v1",
                   "--max-new-tokens", "12", "--min-seconds", "0", "--output-dir", str(out)])
    assert rc == 0
    printed, err = capsys.readouterr()
    assert "weights=random" in printed and "runs.csv" in printed
    assert "fp16: fidelity probe, then measured runs" in err
    with open(out / "runs.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == list(RUN_COLUMNS)
    rows = read_rows(out / "runs.csv")
    measured = [r for r in rows if r["kind"] == "measured"]
    assert len(measured) == 3 and all(r["question"] == "What is in the picture?" for r in measured)
    assert all(r["question"] != "What is in the picture?" for r in rows if r["kind"] == "warmup")
    gaps = []
    for r in rows:
        r = floats(r)
        assert r["status"] == "ok" and r["weights"] == "random" and r["new_tokens"] == "12"
        # the phases never overlap (counted twice); what they leave out is a request's untimed host
        # code, which a preemption on a busy machine can lengthen in one request, not in all
        assert phases_total_ms(r) <= 1.02 * r["e2e_ms"], r
        gaps.append((r["e2e_ms"] - phases_total_ms(r)) / r["e2e_ms"])
        assert int(r["prompt_tokens"]) > int(r["prefix_tokens"]) > 9 and r["cached_tokens"] == "0"
        assert r["cache_state"] == "none" and r["cache_hit"] == "false"
    assert min(gaps) <= 0.02, gaps  # a phase left untimed would be missing from every request
    summary = read_rows(out / "summary.csv")
    assert list(summary[0]) == list(SUMMARY_COLUMNS)
    ttft = [s for s in summary if s["metric"] == "ttft_ms"]
    assert len(ttft) == 1 and ttft[0]["n"] == "3" and ttft[0]["cache_state"] == "none"
    assert float(ttft[0]["ci_low"]) <= float(ttft[0]["median"]) <= float(ttft[0]["ci_high"])
    import json

    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["config"]["num_runs"] == 3
    assert env["command"].startswith("vila_prefix_benchmark.py --num-runs 3 --model-path")
    assert {"transformers", "bitsandbytes", "cpu", "git_sha", "python"} <= set(env)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    assert env["git_dirty"] is bool(changed)  # uncommitted changes to the code: git_sha is not all that ran


def test_git_dirty_says_whether_tracked_files_changed(tmp_path, monkeypatch):
    """env.json's git_dirty: a tracked file changed since the commit is dirty, an untracked file
    is not (results directories, caches), and a directory outside a checkout has no answer."""
    from bench.run.envinfo import _git_dirty

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "code.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (repo / "runs.csv").write_text("untracked\n")
    assert _git_dirty(repo) is False
    (repo / "code.py").write_text("x = 2\n")
    assert _git_dirty(repo) is True
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no checkout above tmp_path counts
    assert _git_dirty(outside) is None


def test_stop_rule_needs_runs_and_seconds(tmp_path):
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-llava", "--num-runs", "2", "--min-seconds", "0.5", "--max-new-tokens", "4",
                     "--max-runs", "10000", "--warmup", "0", "--output-dir", str(out)]) == 0
    measured = [r for r in read_rows(out / "runs.csv") if r["kind"] == "measured"]
    assert len(measured) >= 2
    assert sum(float(r["e2e_ms"]) for r in measured) >= 500
    assert sum(float(r["e2e_ms"]) for r in measured[:-1]) < 500 or len(measured) == 2


def test_max_runs_caps_the_stop_rule(tmp_path):
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-llava", "--num-runs", "2", "--min-seconds", "1000", "--max-new-tokens", "2",
                     "--max-runs", "3", "--warmup", "0", "--output-dir", str(out)]) == 0
    assert len([r for r in read_rows(out / "runs.csv") if r["kind"] == "measured"]) == 3
    assert all(s["valid"] == "false" for s in read_rows(out / "summary.csv"))


def _default_run(tmp_path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "vila_prefix_benchmark.py"), "--num-runs", "10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "weights=random" in proc.stdout and "fp16" in proc.stdout
    runs = list((tmp_path / "results" / "local").glob("*tiny-vila/runs.csv"))
    assert len(runs) == 1
    return elapsed


def test_default_run_no_arguments(tmp_path):
    _default_run(tmp_path)


@pytest.mark.timing
def test_default_run_no_arguments_is_fast(tmp_path):
    elapsed = _default_run(tmp_path)
    assert elapsed < 20, f"default run took {elapsed:.1f}s"


@pytest.mark.parametrize("args,needle", [
    (["--image-path", "/nonexistent/cat.jpg"], "no such file"),
    (["--conv-mode", "chatml"], "unknown --conv-mode 'chatml'; choose one of: vicuna_v1"),
    (["--preset", "llava-99b"], "unknown --preset 'llava-99b'; choose one of: llava-1.5-7b"),
    (["--variants", "fp16,turbo"], "unknown variant part 'turbo'"),
    (["--model-path", "/nonexistent/model"], "is not a directory"),
    (["--num-runs", "0"], "--num-runs must be at least 1"),
    (["--questions", "/nonexistent/q.txt"], "--questions /nonexistent/q.txt: no such file"),
])
def test_usage_errors_exit_2_with_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["--image-path", str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [
    (None, "no config.json"),
    ('{"model_type": "bert"}', "is not a checkpoint of a supported model (model_type='bert')"),
    ("{not json", "config.json is not valid JSON"),
    ('{"model_type": "llava"}', "no *.safetensors"),
])
def test_bad_model_dir(tmp_path, content, needle, capsys):
    d = tmp_path / "model"
    d.mkdir()
    if content is not None:
        (d / "config.json").write_text(content)
    assert main(["--model-path", str(d)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_entry_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "vila_prefix_benchmark.py"), "--image-path", "nope.png"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --image-path nope.png") and "Traceback" not in proc.stderr


class _OOMWeights(WeightsPart):
    name, description = "oomtest", "raises out-of-memory when loaded"

    def key(self, options):
        return ("oomtest",)

    def load(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

class _NeedsGpu(_OOMWeights):
    name = "gpuonly"

    def unavailable_reason(self, device):
        return "gpuonly needs a CUDA device" if device.type != "cuda" else None


@pytest.mark.parametrize("preset,tiles", [("tiny-llava", False), ("tiny-vila", False), ("tiny-internvl", True),
                                          ("tiny-internvideo", False), ("tiny-vita", True)])
def test_max_tiles_set_for_a_model_that_takes_images_whole_is_a_warning(preset, tiles, tmp_path):
    """--max-tiles changes nothing for LLaVA, VILA and InternVideo2.5 merging frames' tokens (its
    presets), which take each image whole: set to other than its default it says so in one warning
    line; the default says nothing. A checkpoint written from the preset reads the same."""
    from bench.models.loader import build_preset, save_checkpoint
    from bench.models.source import ModelSource

    save_checkpoint(build_preset(preset, None, torch.device("cpu"), torch.float32), tmp_path / preset)
    for path, name in ((None, preset), (str(tmp_path / preset), None)):
        assert ModelSource(path, name, None).max_tiles_warning() is None  # the default
        warning = ModelSource(path, name, None, max_tiles=4).max_tiles_warning()
        if tiles:
            assert warning is None
        else:
            assert warning.startswith("warning: --max-tiles 4 changes nothing for the model") and "\n" not in warning
            assert warning.endswith(": it takes each image whole")


def test_max_tiles_warning_is_said_once_by_a_run(tmp_path, capsys):
    args = ["--preset", "tiny-llava", "--num-runs", "1", "--min-seconds", "0", "--max-new-tokens", "2",
            "--warmup", "0", "--no-fidelity", "--max-tiles", "6"]
    assert run_main([*args, "--output-dir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --max-tiles 6 changes nothing for the model tiny-llava: it takes each image whole") == 1
    assert run_main([*args[:-2], "--output-dir", str(tmp_path / "d")]) == 0
    assert "--max-tiles" not in capsys.readouterr().err
    # said once the run has started: a usage error on the way there (the directory's lock) is one line
    (tmp_path / "locked" / ".lock").mkdir(parents=True)
    assert run_main([*args, "--output-dir", str(tmp_path / "locked")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "lock" in err, err


def test_failed_variant_is_a_row_and_sweep_goes_on(tmp_path, monkeypatch):
    import variants

    real = variants.registry
    monkeypatch.setattr(variants, "registry", lambda: {**real(), "oomtest": _OOMWeights(), "gpuonly": _NeedsGpu()})
    out = tmp_path / "o"
    rc = run_main(["--preset", "tiny-llava", "--variants", "oomtest,gpuonly,fp16", "--num-runs", "2", "--device", "cpu",
                   "--min-seconds", "0", "--max-new-tokens", "4", "--warmup", "0", "--output-dir", str(out)])
    assert rc == 1  # one variant failed, another measured
    rows = read_rows(out / "runs.csv")
    assert rows[0]["variant"] == "oomtest" and rows[0]["status"] == "failed"
    assert "OutOfMemoryError" in rows[0]["error"]
    assert rows[1]["variant"] == "gpuonly" and rows[1]["status"] == "skipped" and "CUDA" in rows[1]["error"]
    assert [r["status"] for r in rows[2:]] == ["ok", "ok"]
    statuses = {(s["variant"], s["status"]) for s in read_rows(out / "summary.csv")}
    assert {("oomtest", "failed"), ("gpuonly", "skipped"), ("fp16", "ok")} <= statuses


def test_ctrl_c_keeps_finished_rows(tmp_path, monkeypatch, capsys):
    on_run_batch_call(monkeypatch, {4: interrupt})
    out = tmp_path / "o"
    rc = run_main(["--preset", "tiny-vila", "--num-runs", "5", "--max-new-tokens", "4", "--warmup", "1", "--no-fidelity",
                   "--output-dir", str(out)])
    assert rc == 130
    rows = read_rows(out / "runs.csv")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    err = capsys.readouterr().err
    assert "interrupted" in err and "measured runs" in err and "fidelity" not in err  # --no-fidelity


def test_results_readme_is_generated_from_metrics():
    from bench.analysis.docs import render

    assert (ROOT / "results" / "README.md").read_text() == render(), "run: python -m bench docs"


def test_attention_kernels_choice_is_applied_and_recorded(tmp_path):
    """--attention-kernels deterministic (the default) keeps cuDNN attention from calls of few
    queries only (inside `few_queries`), says so in env.json; auto leaves torch's choice
    everywhere; anything else is a usage error."""
    import json

    import torch

    from bench.engines import attention_kernels

    cudnn = torch.backends.cuda.cudnn_sdp_enabled
    before = cudnn()
    try:
        assert main(["--num-runs", "1", "--warmup", "0", "--min-seconds", "0", "--max-new-tokens", "2",
                     "--no-fidelity", "--output-dir", str(tmp_path / "det")]) == 0
        env = json.loads((tmp_path / "det" / "env.json").read_text())
        assert env["config"]["attention_kernels"] == "deterministic"
        policy = env["config"]["attention_kernels"]
        assert env["attention_kernels"] == attention_kernels.describe(policy)
        assert "deterministic" in env["attention_kernels"]
        assert env["engines"]["fp16"]["engine"] == "hf"
        assert env["engines"]["fp16"]["attention"] == policy  # the spec each engine was made with
        torch.backends.cuda.enable_cudnn_sdp(True)
        with attention_kernels.few_queries(policy, 1):
            assert not cudnn()  # a decode step
        with attention_kernels.few_queries(policy, attention_kernels.FEW_QUERIES - 1):
            assert not cudnn()
        assert cudnn()  # restored
        with attention_kernels.few_queries(policy, attention_kernels.FEW_QUERIES):
            assert cudnn()  # a prompt: torch's choice
        with attention_kernels.few_queries("auto", 1):
            assert cudnn()
        assert "auto" in attention_kernels.describe("auto")
        assert attention_kernels.note(torch.device("cpu"), "auto") == ""
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert main(["--num-runs", "1", "--warmup", "0", "--min-seconds", "0", "--max-new-tokens", "2", "--engine", "static",
                 "--attention-kernels", "auto", "--output-dir", str(tmp_path / "auto")]) == 0
    env = json.loads((tmp_path / "auto" / "env.json").read_text())  # the static engine and the fidelity reference
    assert {name: (spec["engine"], spec["attention"]) for name, spec in env["engines"].items()} == {
        "fp16+static": ("static", "auto"), "fidelity reference": ("hf", "auto")}
    assert main(["--attention-kernels", "fastest"]) == 2


def test_a_reader_that_leaves_before_the_tables_ends_nothing_but_the_output():
    """stdout closed by its reader (`| head -1`): the rest of the tables is dropped and the exit
    code is the command's own (rich ends the process with 1, the code of a failed variant)."""
    base = str(ROOT / "results" / "ci-baseline")  # compare prints its verdicts as a table
    proc = subprocess.Popen([sys.executable, "-m", "bench", "compare", base, base], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # no reader left: every write to stdout breaks the pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err[-2000:]


def test_ctrl_c_while_the_command_starts_ends_it_with_130_and_no_traceback(tmp_path):
    """SIGINT during the imports (before the run's own handling): one line, exit 130, nothing written."""
    import signal

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "vila_prefix_benchmark.py", "--preset", "tiny-vila", "--output-dir",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err[-2000:]


def test_a_sweep_worker_process_ends_quietly_on_ctrl_c(monkeypatch):
    """The whole process group gets Ctrl-C: a worker process's entry ends without a traceback (the
    sweep reports the interrupt once) and closes its pipe."""
    import pickle

    from bench.run import spawned, worker

    def interrupted(job, send):
        raise KeyboardInterrupt

    class Pipe:
        closed = False

        def send(self, message):
            raise AssertionError("nothing to send")

        def close(self):
            self.closed = True

    monkeypatch.setattr(worker, "measure_job", interrupted)
    pipe = Pipe()
    spawned.process_main(pickle.dumps({"name": "local:1"}), pipe)
    assert pipe.closed
