"""Every bad input is one line on stderr naming the input, exit code 2, nothing written, and it
is refused before any model loads. Fixtures are built here, small; runs go in-process."""
import contextlib
import json
import os
import shlex
import struct
import zlib

import pytest
import torch
from PIL import Image

from bench.cli import main, run_main
from tests.conftest import ROOT

RUN = ["--preset", "tiny-vila", "--device", "cpu", "--num-runs", "1", "--warmup", "0", "--no-fidelity",
       "--max-new-tokens", "4"]
TRIED: list[str] = []  # every bad input the module tries (counted in the report)


def png_header(path, width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb, a few bytes long)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def small_png(path, size=(8, 8)):
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def assert_one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def exit_code(command, args) -> int:
    """The exit code of an in-process command (argparse exits instead of returning)."""
    try:
        return command([str(a) for a in args])
    except SystemExit as e:
        return e.code


def bad_run(tmp_path, capsys, args, *needles):
    out = tmp_path / "results"
    TRIED.append(" ".join(str(a) for a in args))
    rc = exit_code(run_main, [*RUN, "--output-dir", str(out), *args])
    err = assert_one_line(capsys, rc, *needles)
    assert not out.exists(), "a refused run must write nothing"
    return err


# ---------------------------------------------------------------------------------------- images
def test_image_bomb(tmp_path, capsys):
    bomb = png_header(tmp_path / "bomb.png", 100_000, 100_000)
    err = bad_run(tmp_path, capsys, ["--image-path", str(bomb)], "--image-path", "bomb.png", "too large")
    # its size and the one limit (PIL's error threshold, twice it, is not named beside it)
    assert f"(10,000,000,000 pixels); give a smaller image (at most {Image.MAX_IMAGE_PIXELS:,} pixels)" in err, err
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in err.replace(",", ""), err


def test_image_bomb_warning_range(tmp_path, capsys, monkeypatch):
    # between MAX_IMAGE_PIXELS and twice it PIL only warns: still refused
    img = small_png(tmp_path / "big.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bad_run(tmp_path, capsys, ["--image-path", str(img)], "big.png", "too large")


def test_frames_dir_bomb_and_garbage(tmp_path, capsys):
    d = tmp_path / "frames"
    d.mkdir()
    small_png(d / "000.png")
    png_header(d / "001.png", 80_000, 80_000)
    bad_run(tmp_path, capsys, ["--frames-dir", str(d)], "--frames-dir", "001.png", "too large")
    (d / "001.png").write_bytes(b"garbage, not a png")
    bad_run(tmp_path, capsys, ["--frames-dir", str(d)], "--frames-dir", "001.png", "not a readable image")
    truncated = (tmp_path / "t.png")
    small_png(truncated, (64, 64))
    (d / "001.png").write_bytes(truncated.read_bytes()[:60])
    bad_run(tmp_path, capsys, ["--frames-dir", str(d)], "001.png")


@pytest.mark.parametrize("content", ["bomb", "garbage", "no images"])
def test_awq_calib_dir_bad_files(tmp_path, capsys, content):
    d = tmp_path / "calib"
    d.mkdir()
    if content == "no images":
        (d / "notes.txt").write_text("no image here")
        bad_run(tmp_path, capsys, ["--variants", "awq4", "--awq-calib-dir", str(d)], "--awq-calib-dir", "no image")
        return
    small_png(d / "a.png")
    if content == "bomb":
        png_header(d / "b.png", 90_000, 90_000)
    else:
        (d / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad_run(tmp_path, capsys, ["--variants", "awq4", "--awq-calib-dir", str(d)], "--awq-calib-dir", "b.")


def ffv1_video(path, side=256, frames=2):
    """A small lossless video of side x side frames (ffv1 in Matroska: the frame size is the
    container's, stored as two-byte EBML elements for sides of 256..65535)."""
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_video_bomb_refused_before_a_frame_is_decoded(tmp_path, capsys):
    # a 1 KB video whose header declares 12000x12000 frames (past PIL's limit, as for images)
    video = ffv1_video(tmp_path / "v.mkv")
    data = video.read_bytes()
    side = (256).to_bytes(2, "big")
    assert data.count(b"\xb0\x82" + side) == 1 and data.count(b"\xba\x82" + side) == 1  # PixelWidth, PixelHeight
    huge = (12000).to_bytes(2, "big")
    video.write_bytes(data.replace(b"\xb0\x82" + side, b"\xb0\x82" + huge).replace(b"\xba\x82" + side, b"\xba\x82" + huge))
    bad_run(tmp_path, capsys, ["--video-path", str(video)], "--video-path", "v.mkv", "12000x12000", "too large")


def test_video_frames_held_to_the_image_limit(tmp_path, capsys, monkeypatch):
    video = ffv1_video(tmp_path / "v.mkv")  # a real, decodable video, past a lowered limit
    image = small_png(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for mode in ("clip", "frames"):
        bad_run(tmp_path, capsys, ["--image-path", str(image), "--video-path", str(video), "--video-mode", mode],
                "--video-path", "256x256", "too large")


def test_video_without_video_or_frames(tmp_path, capsys):
    av = pytest.importorskip("av")
    import numpy as np

    audio = tmp_path / "a.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    bad_run(tmp_path, capsys, ["--video-path", str(audio)], "--video-path", "no video stream")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(ffv1_video(tmp_path / "v.mkv").read_bytes()[:600])  # header only: no frame
    bad_run(tmp_path, capsys, ["--video-path", str(cut)], "--video-path", "cut.mkv")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    bad_run(tmp_path, capsys, ["--video-path", str(text)], "--video-path", "not a readable video")


# ------------------------------------------------------------------------------------------ text
def test_text_prompt_not_utf8(tmp_path, capsys):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Linux hands over a latin-1 argv
    bad_run(tmp_path, capsys, ["--text-prompt", prompt], "--text-prompt", "UTF-8")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_text_prompt_empty(tmp_path, capsys, prompt):
    bad_run(tmp_path, capsys, ["--text-prompt", prompt], "--text-prompt", "empty")


def test_questions_file_of_invisible_lines(tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_text("\ufeff\n\u200b\u200b\n \t\n", encoding="utf-8")
    bad_run(tmp_path, capsys, ["--questions", q], "--questions", "no questions")


@pytest.mark.parametrize("preset,question", [("tiny-llava", "<image> What is it?"),
                                             ("tiny-internvl", "What is <IMG_CONTEXT> here?"),
                                             ("tiny-vila", "<image> What is it?"),
                                             ("tiny-vita", "What is <image> here?")])
def test_question_holding_the_image_placeholder(tmp_path, capsys, preset, question):
    """The model would look for one image more than the request shows: a usage error naming the
    flag (known once the tokenizer is loaded), never a failed row."""
    out = tmp_path / "new" / "results"
    TRIED.append(f"{preset} question with its image placeholder")
    rc = run_main([*RUN, "--preset", preset, "--output-dir", str(out), "--text-prompt", question])
    refused_after_load(capsys, rc, "--text-prompt", "image placeholder")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("data", [b"Qu'est-ce que c'est ? caf\xe9\n", b"\x00\x01\x02\xff\xfe binary\x00",
                                  b"valid utf-8 but \x00 binary\n"])
def test_questions_not_utf8_text(tmp_path, capsys, data):
    q = tmp_path / "q.txt"
    q.write_bytes(data)
    bad_run(tmp_path, capsys, ["--questions", str(q)], "--questions", "q.txt", "UTF-8")


def test_prompt_longer_than_context(tmp_path, capsys):
    q = tmp_path / "long.txt"
    q.write_text("word " * 60_000 + "\n")
    bad_run(tmp_path, capsys, ["--questions", str(q)], "--questions", "4,096", "give shorter questions in it")
    bad_run(tmp_path, capsys, ["--text-prompt", "why " * 5000], "--text-prompt", "4,096", "give a shorter question")
    # one 3 MB word: refused from its length before it is tokenized (which took minutes)
    q.write_text("x" * 3_000_000 + "\n")
    bad_run(tmp_path, capsys, ["--questions", str(q)], "--questions", "at least 11,")


def test_context_limit_from_checkpoint_config(tiny_vila_dir, tmp_path, capsys):
    # a checkpoint: the limit comes from its config.json before the weights load
    from bench.run.limits import model_dims

    dims = model_dims(str(tiny_vila_dir), None)
    assert dims.max_pos == 4096 and dims.layers == 2
    out = tmp_path / "results"
    TRIED.append("checkpoint --max-new-tokens 5000")
    rc = run_main(["--model-path", str(tiny_vila_dir), "--device", "cpu", "--num-runs", "1", "--warmup", "0",
                   "--no-fidelity", "--max-new-tokens", "5000", "--output-dir", str(out)])
    assert_one_line(capsys, rc, "--max-new-tokens", "4,096")
    assert not out.exists()


# ----------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("args,needle", [
    (["--batch-size", str(10**9)], "--batch-size 1000000000"),
    (["--max-new-tokens", "100000"], "--max-new-tokens"),
    (["--new-tokens", "4,100000"], "--new-tokens"),
    (["--prompt-lengths", str(10**7)], "--prompt-lengths"),
    (["--max-tiles", str(10**6)], "--max-tiles"),
    (["--frames-dir", "f", "--num-frames", str(10**8)], "--num-frames 100000000: at most 4096"),
    (["--max-cv", "-0.5"], "--max-cv"),
    (["--max-cv", "0"], "--max-cv"),
    (["--max-cv", "nan"], "--max-cv"),
    (["--decode-attention", "flash"], "--decode-attention 'flash'"),
    (["--pdl", "on"], "--pdl 'on'"),
    (["--variants", "prefix", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["--variants", "prefix", "--prefix-cache-mb", "0"], "--prefix-cache-mb"),
    (["--device", "mps"], "--device 'mps'"),
    (["--device", "meta"], "--device 'meta'"),
    (["--device", "xpu"], "--device 'xpu'"),
    (["--device", "cpu:3"], "--device 'cpu:3'"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--batch-size", ""], "--batch-size"),
    (["--new-tokens", ","], "--new-tokens"),
    (["--seed", "abc"], "--seed"),
    (["--awq-calib", "many"], "--awq-calib"),
    (["--no-such-flag", "1"], "--no-such-flag"),
    (["--variants", "bnb8", "--bnb-int8-threshold", "-1"], "--bnb-int8-threshold"),
    (["--bnb-int8-threshold", "nan"], "--bnb-int8-threshold"),
    (["--workers", "1", "--worker-timeout", "nan"], "--worker-timeout"),
    (["--executor", "serial", "--workers", "2"], "--workers"),  # would be ignored
    (["--gpus", ""], "--gpus is empty"),  # would run serially
    (["--executor", "ray", "--ray-address", ""], "--ray-address ''"),
    (["--executor", "ray", "--ray-address", "garbage"], "--ray-address 'garbage'"),
    (["--executor", "ray", "--ray-address", "10.0.0.1:99999"], "HOST:PORT"),
    (["--executor", "ray", "--ray-address", "10.0.0.1:6379", "--workers", "2"], "--ray-address"),
    # an empty path or name is a mistake, never the default
    (["--image-path", ""], "--image-path is empty"),
    (["--frames-dir", ""], "--frames-dir is empty"),
    (["--preset", ""], "--preset is empty"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--variants", "awq4", "--awq-calib-dir", ""], "--awq-calib-dir is empty"),
    # contradictory or out of range
    (["--text-prompt", "What is it?", "--questions", "q.txt"], "--text-prompt or --questions, not both"),
    (["--text-prompt", "\ufeff\u200b"], "--text-prompt is empty"),  # invisible characters only
    (["--num-runs", "5", "--max-runs", "2"], "--max-runs 2"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed -1: give a whole number from 0"),
    # a line break (or a name that is not UTF-8) in what the message quotes: shown escaped, one line
    (["--image-path", "/no/such\ncat.png"], "--image-path /no/such\\ncat.png: no such file"),
    (["--image-path", "/no/such\udcffcat.png"], "/no/such\\udcffcat.png"),
    (["--variants", "awq4", "--awq-calib", "100000"], "--awq-calib 100000"),
    (["--variants", "+"], "--variants '+'"),
    (["--variants", "fp16+"], "an empty part"),  # a part left out, not the default
    (["--variants", "+prefix"], "an empty part"),
    (["--engine", ""], "--engine is empty"),  # not hf, as no --engine would be
    (["--variants", "fp16,nocache"], "given twice"),  # one variant under two names
    (["--variants", "prefix + static,static+prefix"], "'prefix+static' is the same variant"),
    (["--engine", "hf,hf"], "given twice"),
    # a flag that would be ignored
    (["--loader", "serial"], "--loader applies to --video-mode frames"),  # image requests read no frames
    (["--video-mode", "clip"], "--video-mode applies to video input"),  # recorded, then an image run
    (["--num-frames", "16"], "--num-frames applies to video input"),  # image requests show their images
    (["--num-frames", "8"], "--num-frames applies to video input"),  # the default, but given for nothing
    (["--video-path", "", "--num-frames", "4"], "--video-path is empty"),
    (["--video-mode", ""], "--video-mode is empty"),
    (["--frames-dir", "f", "--video-mode", "clip", "--loader", "serial"], "a clip request reads all its frames"),
    (["--loader", ""], "--loader is empty"),
    # past what could run (each would hang or exhaust memory before a row is written)
    (["--warmup", str(10**20)], "--warmup 100000000000000000000: at most"),
    (["--executor", "local", "--workers", str(10**20)], "--workers must be between 0 and"),
    (["--variants", "rtn4", "--int4-dense-rows", str(10**9)], "--int4-dense-rows must be between 0 and"),
    (["--variants", "rtn4", "--int4-dense-rows", "-1"], "--int4-dense-rows must be between 0 and"),
    (["--variants", "rtn4", "--int4-cache-dir", " "], "--int4-cache-dir is blank"),  # not a folder named ' '
    (["--max-tiles", "0"], "--max-tiles must be at least 1"),
])
def test_flags_that_can_never_run(tmp_path, capsys, args, needle):
    bad_run(tmp_path, capsys, args, needle)


def test_missing_gpu_index_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    bad_run(tmp_path, capsys, ["--device", "cuda:7"], "--device cuda:7", "2 CUDA device")


def test_ray_cluster_that_cannot_be_reached(tmp_path, capsys):
    # refused at once (Ray itself retries for minutes), the results directory left as it was
    pytest.importorskip("ray")
    bad_run(tmp_path, capsys, ["--executor", "ray", "--ray-address", f"127.0.0.1:{_closed_port()}"],
            "--ray-address", "cannot reach the Ray cluster")


@pytest.mark.parametrize("flag", ["--int4-cache-dir", "--output-dir"])
@pytest.mark.parametrize("under", [False, True])
def test_directory_flags_that_are_files(tmp_path, capsys, flag, under):
    f = tmp_path / "file"
    f.write_text("x")
    bad_run(tmp_path, capsys, [flag, str(f / "sub" if under else f)], flag, "is a file")
    assert f.read_text() == "x"


def _path_of_kind(tmp_path, kind):
    """A path that is not a readable regular file: a directory, a FIFO (reading it would block), a
    broken symbolic link or a symbolic link loop."""
    import os

    p = tmp_path / f"{kind}.png"
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "broken link":
        p.symlink_to(tmp_path / "gone.png")
    else:
        p.symlink_to(p)
    return p


@pytest.mark.parametrize("flag", ["--image-path", "--questions", "--video-path"])
@pytest.mark.parametrize("kind,needle", [("directory", "a directory, not a file"),
                                         ("fifo", "not a regular file"),
                                         ("broken link", "broken symbolic link"),
                                         ("loop", "symbolic link loop")])
def test_input_path_that_is_not_a_file_is_named(tmp_path, capsys, flag, kind, needle):
    bad_run(tmp_path, capsys, [flag, _path_of_kind(tmp_path, kind)], flag, needle)


def test_directory_flags_given_a_file(tmp_path, capsys):
    f = small_png(tmp_path / "a.png")
    bad_run(tmp_path, capsys, ["--frames-dir", f], "--frames-dir", "a file, not a directory")
    bad_run(tmp_path, capsys, ["--variants", "awq4", "--awq-calib-dir", f], "--awq-calib-dir", "a file, not a directory")
    link = tmp_path / "results-link"
    link.symlink_to(tmp_path / "gone")
    TRIED.append("--output-dir a broken symbolic link")
    rc = exit_code(run_main, [*RUN, "--output-dir", str(link)])
    assert_one_line(capsys, rc, "--output-dir", "broken symbolic link")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_exif_orientation_turns_the_image_upright(tmp_path):
    from bench.models.visual import load_image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned by 90 degrees
    Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").size == (48, 64)


def test_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    TRIED.append("--output-dir FILE")
    rc = run_main([*RUN, "--output-dir", str(f)])
    assert_one_line(capsys, rc, "--output-dir", "is a file")
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------------- subcommands
@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert run_main([*RUN, "--min-seconds", "0", "--output-dir", str(out)]) == 0
    return out


def corrupted(results_dir, tmp_path, name, data):
    """A copy of the good results directory with `name` replaced by `data` (bytes or text)."""
    import shutil

    d = tmp_path / f"bad-{name.replace('.', '-')}"
    shutil.copytree(results_dir, d)
    if isinstance(data, str):
        (d / name).write_text(data, encoding="utf-8")
    else:
        (d / name).write_bytes(data)
    return d


def runs_text(results_dir):
    return (results_dir / "runs.csv").read_text()


def _metric_cell(text, value, column="ttft_ms"):
    """runs.csv text with the first measured row's `column` cell replaced by `value`."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    col = rows[0].index(column)
    row = next(r for r in rows[1:] if r[rows[0].index("kind")] == "measured")
    row[col] = value
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


BAD_RUNS = {
    "empty": lambda good: b"",
    "binary": lambda good: bytes(range(256)) * 4,
    "latin-1": lambda good: good.replace("tiny-vila", "tiny-vil\xe9").encode("latin-1", "replace"),
    "foreign-header": lambda good: "date,open,high,low,close\n2024-01-01,1,2,0.5,1.5\n",
    # a row short of fields, line end and all (a cut-off last row without its line end is what a
    # killed run leaves: left out with a warning, tests/test_results_dir.py)
    "truncated": lambda good: good[: good.index("\n", good.index("measured")) - 40] + "\n",
    "nan-cell": lambda good: _metric_cell(good, "nan"),
    "inf-cell": lambda good: _metric_cell(good, "inf"),
    "unknown-status": lambda good: _metric_cell(good, "weird", "status"),
    "unknown-kind": lambda good: _metric_cell(good, "final", "kind"),
    "underscored-number": lambda good: _metric_cell(good, "1_000"),
    "negative-cell": lambda good: _metric_cell(good, "-12.5"),  # compare called it inconclusive
    # every row twice: each run would count as two samples
    "duplicated-rows": lambda good: good + good[good.index("\n") + 1:],
    "text-cell": lambda good: _metric_cell(good, "fast"),
    "count-not-whole": lambda good: _metric_cell(good, "1.5", "batch_size"),  # an identity column
    "header-only": lambda good: good[: good.index("\n") + 1],
}


def bad_sub(capsys, args, *needles, out=None):
    TRIED.append(" ".join(str(a) for a in args))
    rc = exit_code(main, args)
    err = assert_one_line(capsys, rc, *needles)
    if out is not None:
        assert not out.exists(), "a refused command must write nothing"
    return err


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_compare_bad_runs_csv(results_dir, tmp_path, capsys, case):
    bad = corrupted(results_dir, tmp_path, "runs.csv", BAD_RUNS[case](runs_text(results_dir)))
    js = tmp_path / "verdict.json"
    bad_sub(capsys, ["compare", results_dir, bad, "--json", js], "runs.csv", out=js)
    bad_sub(capsys, ["compare", bad / "runs.csv", results_dir], "runs.csv")


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_report_bad_runs_csv(results_dir, tmp_path, capsys, case):
    bad = corrupted(results_dir, tmp_path, "runs.csv", BAD_RUNS[case](runs_text(results_dir)))
    out = tmp_path / "report"
    bad_sub(capsys, ["report", results_dir, bad, "--out", out], "runs.csv", out=out)


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_summarize_bad_runs_csv(results_dir, tmp_path, capsys, case):
    bad = corrupted(results_dir, tmp_path, "runs.csv", BAD_RUNS[case](runs_text(results_dir)))
    before = (bad / "summary.csv").read_bytes()
    bad_sub(capsys, ["summarize", bad], "runs.csv")
    assert (bad / "summary.csv").read_bytes() == before


@pytest.mark.parametrize("case,data", [("empty", b""), ("foreign", "a,b\n1,2\n"),
                                       ("text-cell", None)])
def test_report_bad_summary_csv(results_dir, tmp_path, capsys, case, data):
    if data is None:
        text = (results_dir / "summary.csv").read_text().splitlines()
        head = text[0].split(",")
        row = text[1].split(",")
        row[head.index("median")] = "slow"
        data = "\n".join([text[0], ",".join(row), *text[2:]]) + "\n"
    bad = corrupted(results_dir, tmp_path, "summary.csv", data)
    out = tmp_path / "report"
    bad_sub(capsys, ["report", bad, "--out", out], "summary.csv", out=out)


@pytest.mark.parametrize("data,needle", [(b"", "empty"), ("{not json", "not valid JSON"),
                                         ('{"python": "3.12"}', "no run config"), ("[1, 2]", "no run config"),
                                         ('{"config": {"max_cv": -1}}', "not valid here"),
                                         ('{"config": ' + "[" * 100000, "nested too deep")])
def test_summarize_bad_env_json(results_dir, tmp_path, capsys, data, needle):
    bad = corrupted(results_dir, tmp_path, "env.json", data)
    bad_sub(capsys, ["summarize", bad], "env.json", needle)


def test_report_same_dir_twice_and_out_a_file(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    bad_sub(capsys, ["report", results_dir, results_dir, "--out", out], "given twice", out=out)
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    bad_sub(capsys, ["report", results_dir, "--out", f], "--out", "existing file")
    assert f.read_text() == "keep me"
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", readme], "--readme", out=out)
    readme.write_bytes(b"\x00\x01binary")
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", readme], "README.md", "binary", out=out)
    elsewhere = tmp_path / "docs" / "README.md"
    elsewhere.parent.mkdir()
    from bench.analysis.report import END, START
    elsewhere.write_text(f"{START}\n{END}\n")
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", elsewhere], "--out", out=out)
    readme.write_text(f"{END}\n{START}\n")  # the markers the wrong way round
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", readme], "in that order", out=out)
    readme.write_text(f"{START}\nkept?\n{START}\n{END}\n")  # a pair's block would drop the line between
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", readme], "keep one of each", ": 2,", out=out)
    assert readme.read_text() == f"{START}\nkept?\n{START}\n{END}\n"
    readme.write_text(f"{START}\n{END}\n{START}\n{END}\n")
    bad_sub(capsys, ["report", results_dir, "--out", out, "--readme", readme], "keep one of each", out=out)
    other = tmp_path / "notes"  # another program's folder: the report's files never mix into it
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    bad_sub(capsys, ["report", results_dir, "--out", other], "--out", "not a report's")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_compare_of_a_directory_a_run_is_writing_says_so(results_dir, tmp_path, capsys):
    """Its rows so far are part of a sweep: a result not yet run read as missing, and passed under
    --allow-missing."""
    import shutil

    from bench.measure.results import DirLock

    live = tmp_path / "live"
    shutil.copytree(results_dir, live)
    lock = DirLock(live)
    try:
        js = tmp_path / "verdict.json"
        bad_sub(capsys, ["compare", results_dir, live, "--allow-missing", "--min-samples", "1", "--json", js],
                "being written by a run (PID", out=js)
        bad_sub(capsys, ["compare", live / "runs.csv", results_dir], "being written by a run (PID")
    finally:
        lock.release()
    assert main(["compare", str(results_dir), str(live), "--min-samples", "1"]) in (0, 2)  # ended: compared


def test_compare_same_dir_twice_is_a_comparison(results_dir, capsys):
    # compare A A is allowed: every result is compared with itself (too few runs here: inconclusive)
    rc = main(["compare", str(results_dir), str(results_dir), "--min-samples", "1"])
    out = capsys.readouterr()
    assert rc in (0, 2) and "Traceback" not in out.err and "verdict" in out.out


def test_compare_json_of_an_inconclusive_verdict_is_strict_json(results_dir, tmp_path, capsys):
    # one run a side: no ratio or p-value, written as null (NaN is no JSON; jq and browsers refuse it)
    js = tmp_path / "verdict.json"
    assert main(["compare", str(results_dir), str(results_dir), "--json", str(js)]) == 2
    capsys.readouterr()

    def refuse(name):
        raise AssertionError(f"{name} in {js}")

    data = json.loads(js.read_text(), parse_constant=refuse)
    assert data["verdict"] == "inconclusive" and data["comparisons"][0]["ratio"] is None


def test_compare_bad_flags(results_dir, tmp_path, capsys):
    bad_sub(capsys, ["compare", results_dir, results_dir, "--json", tmp_path], "--json", "directory")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--alpha", "2"], "--alpha")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--metrics", "model,ttft_ms"], "--metrics model", "not numbers")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--metrics", ","], "--metrics is empty")
    # a numeric identity column is what pairs the results, not a measurement of them
    bad_sub(capsys, ["compare", results_dir, results_dir, "--metrics", "new_tokens"], "--metrics new_tokens",
            "not numbers")
    bad_sub(capsys, ["compare", results_dir], "CANDIDATE")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--min-samples", "few"], "--min-samples")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--factor", "inf"], "--factor")  # nothing could regress
    bad_sub(capsys, ["compare", results_dir, results_dir, "--json", ""], "--json is empty")
    before = (results_dir / "runs.csv").read_bytes()
    for over in ("runs.csv", "summary.csv"):  # the verdict written over what was compared
        bad_sub(capsys, ["compare", results_dir, tmp_path, "--json", results_dir / over], "would overwrite the results")
    assert (results_dir / "runs.csv").read_bytes() == before
    other = tmp_path / "other"  # another results directory's files, or anything else, are no verdicts
    other.mkdir()
    for name, text in (("runs.csv", runs_text(results_dir)), ("notes.txt", "keep me"), ("v.json", '{"a": 1}')):
        (other / name).write_text(text)
        bad_sub(capsys, ["compare", results_dir, results_dir, "--json", other / name], "exists and is no verdicts file")
        assert (other / name).read_text() == text
    fifo = other / "fifo"  # not a regular file: refused unopened (a FIFO would block the read)
    os.mkfifo(fifo)
    bad_sub(capsys, ["compare", results_dir, results_dir, "--json", fifo], "exists and is no verdicts file")
    empty = other / "empty.json"  # as mktemp makes it: replaced
    empty.write_bytes(b"")
    exit_code(main, ["compare", results_dir, results_dir, "--json", empty])
    assert json.loads(empty.read_text())["verdict"]
    js = other / "verdict.json"  # an earlier --json is replaced
    exit_code(main, ["compare", results_dir, results_dir, "--json", js])
    first = js.read_text()
    js.write_text(first.replace('"alpha"', '"alpha" ', 1))
    exit_code(main, ["compare", results_dir, results_dir, "--json", js])
    capsys.readouterr()
    assert js.read_text() == first


def test_compare_metric_named_twice_is_one_verdict(results_dir, tmp_path, capsys):
    js = tmp_path / "verdict.json"
    exit_code(main, ["compare", results_dir, results_dir, "--metrics", "ttft_ms,ttft_ms", "--json", js])
    capsys.readouterr()
    verdict = json.loads(js.read_text())  # one result (fp16, one point): one verdict, counted once
    assert [r["metric"] for r in verdict["comparisons"]] == ["ttft_ms"]
    assert sum(verdict["counts"].values()) == 1


def test_link_loops_given_to_compare_and_report(results_dir, tmp_path, capsys):
    loop = tmp_path / "loop1"
    loop.symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    bad_sub(capsys, ["compare", results_dir, results_dir, "--json", loop], "--json", "symbolic link loop")
    assert loop.is_symlink()  # the link is left as it was, not replaced by a verdict
    looped = tmp_path / "looped"  # a results directory whose runs.csv links to itself
    looped.mkdir()
    (looped / "runs.csv").symlink_to("runs.csv")
    js = tmp_path / "verdict.json"
    bad_sub(capsys, ["compare", results_dir, looped, "--json", js], "looped", out=js)
    report = tmp_path / "report"
    bad_sub(capsys, ["report", loop, "--out", report], "loop1", out=report)


def test_empty_output_paths_of_subcommands(results_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path is never taken for the current folder
    bad_sub(capsys, ["report", results_dir, "--out", ""], "--out is empty")
    bad_sub(capsys, ["report", results_dir, "--out", tmp_path / "r", "--readme", tmp_path / "none.md"],
            "--readme", "no such file", out=tmp_path / "r")
    bad_sub(capsys, ["ci-bench", ""], "OUTPUT_DIR is empty")
    assert list(tmp_path.iterdir()) == []


def test_ci_bench_refuses_a_directory_another_command_wrote(results_dir, tmp_path, capsys):
    from bench.cli.ci_bench import BASELINE_DIR, CI_BENCH_ARGS, is_ci_bench, other_commands

    before = {p.name: p.read_bytes() for p in results_dir.iterdir()}
    err = bad_sub(capsys, ["ci-bench", results_dir], "ci-bench did not make", "vila_prefix_benchmark.py")
    command = " ".join(other_commands(results_dir)[0].split())  # shown whole, or cut with an ellipsis
    assert (f"({command}):" if len(command) <= 120 else f"({command[:119]}…):") in err, err
    assert {p.name: p.read_bytes() for p in results_dir.iterdir()} == before
    ours = shlex.join(["vlm-bench", "run", *CI_BENCH_ARGS, "--append", "--output-dir", "/x y"])
    assert is_ci_bench(ours) and not is_ci_bench(ours.replace("--num-runs 12", "--num-runs 3"))
    assert not is_ci_bench(ours + " --num-runs 3")  # a later flag wins: another benchmark
    assert not is_ci_bench(None) and not is_ci_bench("run 'unclosed")
    assert other_commands(ROOT / BASELINE_DIR) == []  # what ci-bench wrote (twice) it appends to


def test_summarize_and_report_refuse_a_results_file_that_is_a_directory(results_dir, tmp_path, capsys):
    bad = corrupted(results_dir, tmp_path, "runs.csv", runs_text(results_dir))
    (bad / "summary.csv").unlink()
    (bad / "summary.csv").mkdir()
    bad_sub(capsys, ["summarize", bad], "summary.csv: a directory, not a file; remove it")
    bad_sub(capsys, ["report", bad, "--out", tmp_path / "r"], "its summary.csv is a directory, not a file",
            out=tmp_path / "r")  # (not "no summary.csv")
    (bad / "env.json").unlink()
    (bad / "env.json").mkdir()
    bad_sub(capsys, ["summarize", bad], "its env.json is a directory, not a file")  # (not "no env.json")


def test_summarize_refuses_a_directory_a_run_is_writing(results_dir, tmp_path, capsys):
    import fcntl
    import os

    from bench.measure.results import LOCK_NAME

    d = corrupted(results_dir, tmp_path, LOCK_NAME, f"{os.getpid()}\n")
    before = (d / "summary.csv").read_bytes()
    with open(d / LOCK_NAME) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        bad_sub(capsys, ["summarize", d], "being written by a run", f"PID {os.getpid()}")
    assert (d / "summary.csv").read_bytes() == before


# --------------------------------------------------------------------- int4 kernel choice
@pytest.mark.parametrize("value,variant", [("", "rtn4"), ("TINYGEMM", "rtn4"), ("gemlite", "awq4"), ("nope", "fp16")])
def test_int4_kernels_bad_value(tmp_path, capsys, value, variant):
    # refused before any model loads, with an fp16 variant too (as every awq4/rtn4 flag's bad value)
    bad_run(tmp_path, capsys, ["--variants", variant, "--int4-kernels", value], "--int4-kernels must be one of")


@pytest.mark.parametrize("args,needle", [
    (["--int4-prefill-kernel", "fbgemm"], "--int4-prefill-kernel must be one of"),
    (["--int4-prefill-kernel", ""], "--int4-prefill-kernel must be one of"),
    (["--int4-prefill-kernel", "tinygemm", "--int4-prefill-copy"], "--int4-prefill-copy"),
    (["--int4-kernels", "measured", "--int4-kernel-candidates", " , "], "--int4-kernel-candidates"),
    (["--int4-kernels", "measured", "--int4-kernel-candidates", "tinygemm;dense"], "unknown tinygemm;dense"),
    (["--int4-kernel-candidates", "tinygemm"], "does not go with --int4-kernels tinygemm"),
])
def test_int4_prefill_kernel_and_candidates_bad_values(tmp_path, capsys, args, needle):
    bad_run(tmp_path, capsys, ["--variants", "rtn4", *args], needle)


def _kernel_measurements(path, **entry) -> None:
    """A kernels.json of one measured plan, written as a run writes it; `entry` overrides its fields."""
    from bench.quant.w4a16.measurements import PlanCache, ShapePlan, cache_key

    key = cache_key(torch.device("cpu"), torch.float32, (32, 256, 64), (1,), ["tinygemm"])
    PlanCache(path).put(key, ShapePlan((32, 256, 64), ((1, "tinygemm"),), {"tinygemm": {1: 2.0}},
                                       {"tinygemm": {1: 1e-6}}))
    if entry:
        data = json.loads(path.read_text())
        data["entries"] = {key: {**data["entries"][key], **entry}}
        path.write_text(json.dumps(data))


def _kernel_key_fields(path, **fields) -> None:
    """A kernels.json of one measured plan whose key's `fields` are overridden."""
    _kernel_measurements(path)
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    data["entries"] = {json.dumps({**json.loads(key), **fields}, sort_keys=True): entry}
    path.write_text(json.dumps(data))


BAD_KERNEL_FILES = {
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe{}"),
    "not JSON": lambda p: p.write_text("{\"version\": 1, "),
    "a list": lambda p: p.write_text("[]"),
    "another version": lambda p: p.write_text('{"version": 9, "entries": {}}'),
    "a version of true": lambda p: p.write_text('{"version": true, "entries": {}}'),
    "candidates not names": lambda p: p.write_text(json.dumps({"version": 1, "entries": {json.dumps(
        {"device": "cpu", "versions": {}, "dtype": "torch.float32", "shape": [32, 256, 64], "points": [1],
         "candidates": [1]}): {"plan": [[1, "tinygemm"]], "us": {"tinygemm": {"1": 2.0}},
                               "err": {"tinygemm": {"1": 0.0}}, "left_out": {}}}})),
    "entries a list": lambda p: p.write_text('{"version": 1, "entries": []}'),
    "key not JSON": lambda p: p.write_text('{"version": 1, "entries": {"k": {}}}'),
    "key without fields": lambda p: p.write_text('{"version": 1, "entries": {"{\\"shape\\": [1, 2, 3]}": {}}}'),
    "plan not pairs": lambda p: _kernel_measurements(p, plan=[[1]]),
    "plan descending": lambda p: _kernel_measurements(p, plan=[[4, "tinygemm"], [2, "dense"]]),
    "errors for other rows": lambda p: _kernel_measurements(p, err={"tinygemm": {"2": 0.0}}),
    "a time not a number": lambda p: _kernel_measurements(p, us={"tinygemm": {"1": "fast"}}),
    "a time of zero": lambda p: _kernel_measurements(p, us={"tinygemm": {"1": 0}}),
    "a time below a nanosecond": lambda p: _kernel_measurements(p, us={"tinygemm": {"1": 5e-324}}),
    "an error that is not a number": lambda p: _kernel_measurements(p, err={"tinygemm": {"1": "small"}}),
    # a plan's bound decides how many row counts are tuned before a run: one never timed could be any
    "a plan bound never timed": lambda p: _kernel_measurements(p, plan=[[4, "tinygemm"]]),
    "a plan bound past any count": lambda p: _kernel_measurements(p, plan=[[10**30, "tinygemm"]]),
    "a shape past any size": lambda p: p.write_text(json.dumps({"version": 1, "entries": {json.dumps(
        {"device": "cpu", "versions": {}, "dtype": "torch.float32", "shape": [10**400, 256, 64], "points": [1],
         "candidates": ["tinygemm"]}): {"plan": [[1, "tinygemm"]], "us": {"tinygemm": {"1": 2.0}},
                                        "err": {"tinygemm": {"1": 0.0}}, "left_out": {}}}})),
    "nested too deep": lambda p: p.write_text("[" * 100000 + "]" * 100000),
    # the listing would show them as they are, and a run would never match them
    "dense_copy a number": lambda p: _kernel_key_fields(p, dense_copy=5),
    "graph a string": lambda p: _kernel_key_fields(p, graph="yes"),
    "pdl null": lambda p: _kernel_key_fields(p, pdl=None),
    "pdl_prefetch past four quarters": lambda p: _kernel_key_fields(p, pdl=True, pdl_prefetch=8),
    "pdl_prefetch true": lambda p: _kernel_key_fields(p, pdl=True, pdl_prefetch=True),
    "pdl_preload a number": lambda p: _kernel_key_fields(p, pdl=True, pdl_prefetch=0, pdl_preload=1),
    "pdl_late a string": lambda p: _kernel_key_fields(p, pdl=True, pdl_prefetch=0, pdl_late="yes"),
    "a version not a string": lambda p: _kernel_key_fields(p, versions={"torch": 2.11}),
    "kernel_settings a list": lambda p: _kernel_key_fields(p, kernel_settings=[["1", "3"]]),
    "a kernel's settings a string": lambda p: _kernel_key_fields(p, kernel_settings={"triton-f16x2": "1,3"}),
}


@pytest.mark.parametrize("case", list(BAD_KERNEL_FILES))
def test_int4_kernels_command_bad_file(tmp_path, capsys, case):
    f = tmp_path / "kernels.json"
    BAD_KERNEL_FILES[case](f)
    out = tmp_path / "table.csv"
    bad_sub(capsys, ["int4-kernels", f], "kernels.json", "not an int4 kernel measurements file")
    bad_sub(capsys, ["int4-kernels", f, "--out", out], "kernels.json", out=out)


def test_one_malformed_kernel_measurement_spoils_no_other(tmp_path, capsys):
    """A kernels.json holding a well-formed entry and a malformed one (a negative time, an entry that
    is no object, a plan that is a string): `int4-kernels` lists and writes the good entry with one
    warning line naming the other (a run drops it: test_int4_kernels)."""
    import csv

    from bench.quant.w4a16 import measurements
    from bench.quant.w4a16.measurements import cache_key

    f = tmp_path / "kernels.json"
    _kernel_measurements(f)
    (key, entry), = json.loads(f.read_text())["entries"].items()
    other = cache_key(torch.device("cpu"), torch.float32, (64, 256, 64), (1,), ["tinygemm"])
    for bad in ({**entry, "us": {"tinygemm": {"1": -1.0}}}, None, {**entry, "plan": "tinygemm"}):
        f.write_text(json.dumps({"version": measurements.CACHE_VERSION, "entries": {other: bad, key: entry}}))
        capsys.readouterr()
        assert main(["int4-kernels", str(f)]) == 0
        out, err = capsys.readouterr()
        assert "32x256, g64" in out and "64x256" not in out, out
        assert err.count("\n") == 1 and "1 of 2 entries malformed and left out" in err, err
        table = tmp_path / f"t{len(list(tmp_path.glob('t*.csv')))}.csv"
        assert main(["int4-kernels", str(f), "--out", str(table)]) == 0
        assert {(r["out_features"], r["kernel"]) for r in csv.DictReader(open(table))} == {("32", "tinygemm")}


def test_int4_kernels_command_bad_paths(tmp_path, capsys):
    good = tmp_path / "kernels.json"
    _kernel_measurements(good)
    bad_sub(capsys, ["int4-kernels", tmp_path], "is a directory")
    bad_sub(capsys, ["int4-kernels", tmp_path / "none.json"], "no such file")
    import os

    os.mkfifo(tmp_path / "fifo.json")  # reading it would block for ever
    bad_sub(capsys, ["int4-kernels", tmp_path / "fifo.json"], "not a regular file")
    bad_sub(capsys, ["int4-kernels", good, "--out", tmp_path / "missing" / "t.csv"], "--out", "existing directory",
            out=tmp_path / "missing")
    bad_sub(capsys, ["int4-kernels", good, "--out", tmp_path], "--out", "existing directory")
    kept = tmp_path / "kept.csv"
    kept.write_text("keep me")
    bad_sub(capsys, ["int4-kernels", good, "--out", kept], "--out", "exists")
    assert kept.read_text() == "keep me"
    (tmp_path / "empty.json").write_text('{"version": 1, "entries": {}}')
    bad_sub(capsys, ["int4-kernels", tmp_path / "empty.json", "--out", tmp_path / "t.csv"], "no measurements",
            out=tmp_path / "t.csv")


def test_serve_int4_kernel_the_device_cannot_run():
    # known only once the model is loaded: still a usage error (exit 2), never a traceback
    from bench.errors import UsageError
    from bench.quant.w4a16.registry import KERNELS
    from bench.run.config import config_class
    from bench.serve.loading import load_engine, model_source

    pytest.importorskip("torchao")
    name = next(n for n, k in KERNELS.items() if k.unavailable(torch.device("cpu"), torch.float32))
    TRIED.append(f"serve --int4-kernels {name}")
    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1, variants="rtn4+static",
                         int4_kernels=name, int4_cache_dir="", int4_group_size=32)
    with pytest.raises(UsageError, match=f"rtn4\\+static cannot run here: --int4-kernels {name}"):
        load_engine(cfg, model_source(cfg))
    TRIED.append(f"serve --int4-prefill-kernel {name}")
    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1, variants="rtn4+static",
                         int4_prefill_kernel=name, int4_cache_dir="", int4_group_size=32)
    with pytest.raises(UsageError, match=f"rtn4\\+static cannot run here: --int4-prefill-kernel {name}"):
        load_engine(cfg, model_source(cfg))


def test_serve_default_max_tokens_past_the_positions_with_the_template():
    """Past the lower bounds checked before loading (no template, 4 image tokens), the warm-up
    request as the loaded model tokenizes it: a usage error before any warm-up runs."""
    from bench.errors import UsageError
    from bench.run.config import config_class
    from bench.serve.loading import check_default_request, check_loaded_default_request, load_engine, model_source

    TRIED.append("serve --max-new-tokens 4090 (fits the lower bound, not the template)")
    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1, max_new_tokens=4090)
    source = model_source(cfg)
    check_default_request(cfg, source)  # the lower bound fits
    engine = load_engine(cfg, source)[0]
    with pytest.raises(UsageError, match=r"^--max-new-tokens: the request needs 4,\d+ positions .* has 4,096"):
        check_loaded_default_request(engine, cfg, source, 1)
    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1, max_new_tokens=8)
    check_loaded_default_request(engine, cfg, source, 4)
    with pytest.raises(UsageError, match=r"^--max-batch 1000000000000: the KV cache alone .* lower --max-batch$"):
        check_loaded_default_request(engine, cfg, source, 10**12)


def test_report_out_under_a_file(results_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    bad_sub(capsys, ["report", results_dir, "--out", f / "report"], "--out", "is a file")
    bad_sub(capsys, ["report", results_dir], "--out")


def test_docs_bad_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a flag is never taken for the file to write
    bad_sub(capsys, ["docs", "--no-such-flag"], "--no-such-flag")
    bad_sub(capsys, ["docs", tmp_path], "is a directory")
    f = tmp_path / "file"
    f.write_text("x")
    bad_sub(capsys, ["docs", f / "README.md"], "no directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_docs_replaces_only_a_file_it_wrote(tmp_path, capsys):
    for name, text in (("runs.csv", "model,variant\nm,fp16\n"), ("config.json", '{"model_type": "llava"}\n'),
                       ("notes.md", "# Results\n\nwritten by hand\n")):
        f = tmp_path / name
        f.write_text(text)
        bad_sub(capsys, ["docs", f], name, "did not write")
        assert f.read_text() == text
    readme = tmp_path / "README.md"
    assert main(["docs", str(readme)]) == 0 and main(["docs", str(readme)]) == 0  # new, then regenerated
    capsys.readouterr()


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "--preset 'nope'"),
    (["--preset", "tiny-vila", "--dtype", "float8"], "--dtype 'float8'"),
    (["--preset", "tiny-vila", "--device", "mps"], "--device 'mps'"),
    (["--preset", "tiny-vila", "--seed", str(2**80)], "--seed"),  # past what torch.manual_seed takes
])
def test_make_checkpoint_bad_flags(tmp_path, capsys, args, needle):
    out = tmp_path / "ckpt"
    bad_sub(capsys, ["make-checkpoint", *args, "--out", out], needle, out=out)


def test_make_checkpoint_into_existing(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    bad_sub(capsys, ["make-checkpoint", "--preset", "tiny-vila", "--out", d], "non-empty directory")
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    bad_sub(capsys, ["make-checkpoint", "--preset", "tiny-vila", "--out", f], "existing file")
    bad_sub(capsys, ["make-checkpoint", "--preset", "tiny-vila", "--out", ""], "--out is empty")
    bad_sub(capsys, ["make-checkpoint", "--preset", "tiny-vila", "--out", f / "ckpt"], "--out", "is a file")
    bad_sub(capsys, ["make-checkpoint", "--out", tmp_path / "new"], "--preset", out=tmp_path / "new")
    bad_sub(capsys, ["make-checkpoint", "--preset", "tiny-vila", "--out", tmp_path / "new", "--seed", "x"], "--seed",
            out=tmp_path / "new")


@pytest.mark.parametrize("existed", [False, True])
def test_make_checkpoint_interrupted_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch, existed):
    # Ctrl-C once the weights are on disk but before the checkpoint is whole (its tokenizer files)
    import bench.models.loader as loader

    real = loader.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "ckpt"
    if existed:
        out.mkdir()
    TRIED.append("make-checkpoint interrupted")
    rc = exit_code(main, ["make-checkpoint", "--preset", "tiny-llava", "--out", out, "--dtype", "float32"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130 and len(lines) == 1 and lines[0].startswith("interrupted: ") and "Traceback" not in err, err
    assert (list(out.iterdir()) == []) if existed else not out.exists()


def test_make_checkpoint_that_fills_the_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    # safetensors reports a full disk as its own error, not an OSError: a traceback and a half
    # checkpoint (config files, no weights) before
    from safetensors import SafetensorError

    import bench.models.loader as loader

    real = loader.save_checkpoint

    def save_then_fill(adapter, out, *args, **kwargs):
        real(adapter, out, *args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(loader, "save_checkpoint", save_then_fill)
    out = tmp_path / "ckpt"
    TRIED.append("make-checkpoint disk full")
    rc = exit_code(main, ["make-checkpoint", "--preset", "tiny-llava", "--out", out, "--dtype", "float32"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "could not be written" in lines[0] and "No space left" in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("out_exists", [False, True])
def test_context_limit_when_config_is_silent(tiny_vila_dir, tmp_path, capsys, out_exists):
    """No max_position_embeddings in config.json: the positions are the config class's default,
    as loading reads them (transformers' Llama: 2,048), known before anything loads or is written."""
    import shutil

    from bench.run.limits import model_dims

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_vila_dir, ckpt)
    for cfg_file in ckpt.rglob("config.json"):
        cfg = json.loads(cfg_file.read_text())
        for c in (cfg, cfg.get("text_config") or {}, cfg.get("llm_config") or {}):
            c.pop("max_position_embeddings", None)
        cfg_file.write_text(json.dumps(cfg))
    assert model_dims(str(ckpt), None).max_pos == 2048
    out = tmp_path / "results"
    if out_exists:
        out.mkdir()
    TRIED.append("checkpoint without max positions, --max-new-tokens 3000")
    rc = run_main(["--model-path", str(ckpt), "--device", "cpu", "--num-runs", "1", "--warmup", "0",
                   "--no-fidelity", "--max-new-tokens", "3000", "--output-dir", str(out)])
    assert_one_line(capsys, rc, "--max-new-tokens", "2,048")
    assert (out.exists() and not any(out.iterdir())) if out_exists else not out.exists()


def refused_after_load(capsys, rc, *needles):
    """A usage error only the loaded tokenizer shows: progress lines, then one error line."""
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if not ln.startswith("[")]  # "[12:00:00] loading ..." lines
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    for n in needles:
        assert n in errors[0], err


@pytest.mark.parametrize("args,needle", [
    (["--text-prompt", "x" * 4100], "--text-prompt"),  # one word: the lower bound is 1 token, it is 4,100
    (["--prompt-lengths", "16,4070"], "--prompt-lengths"),  # the template and image tokens come on top
    (["--max-new-tokens", "4060"], "--max-new-tokens"),  # the fidelity probe generates --max-new-tokens
])
def test_prompt_longer_than_context_once_tokenized(tmp_path, capsys, args, needle):
    out = tmp_path / "new" / "results"
    TRIED.append(" ".join(args)[:60])
    run = [a for a in RUN if a != "--no-fidelity"] if needle == "--max-new-tokens" else RUN
    extra = ["--new-tokens", "4"] if needle == "--max-new-tokens" else []
    rc = run_main([*run, *extra, "--output-dir", str(out), *args])
    refused_after_load(capsys, rc, needle, "positions", "4,096")
    assert not (tmp_path / "new").exists(), "a refused run must leave nothing behind"


def test_prompt_refused_after_load_leaves_an_appended_dir_as_it_was(results_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(results_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    TRIED.append("--append with a prompt too long once tokenized")
    rc = run_main([*RUN, "--output-dir", str(d), "--append", "--text-prompt", "y" * 4100])
    refused_after_load(capsys, rc, "--text-prompt", "4,096")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_a_refused_append_puts_back_a_cut_off_last_row(results_dir, tmp_path, capsys):
    """runs.csv ending in a row cut off (a killed run): the appending run drops it before writing;
    refused after the model loaded, it puts those bytes back, the directory as it was."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(results_dir, d)
    with (d / "runs.csv").open("ab") as f:
        f.write(b"2026-12-06T00:00:00+00:00,cut-off-ro")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    TRIED.append("--append onto a cut-off row, refused after load")
    rc = run_main([*RUN, "--output-dir", str(d), "--append", "--text-prompt", "y" * 4100])
    refused_after_load(capsys, rc, "--text-prompt", "4,096")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_resume_of_a_served_run_says_what_it_holds(results_dir, tmp_path, capsys):
    """A directory `run --endpoint` wrote: no in-process settings match it, so the refusal says so
    instead of listing every setting as changed."""
    env = json.loads((results_dir / "env.json").read_text())
    env["config"] = {"endpoint": "http://127.0.0.1:8000/v1", "model": "m", "num_prompts": "2"}
    d = corrupted(results_dir, tmp_path, "env.json", json.dumps(env))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    TRIED.append("--resume of a directory run --endpoint wrote")
    rc = run_main([*RUN, "--output-dir", str(d), "--resume"])
    err = assert_one_line(capsys, rc, "--resume", "run --endpoint", "--append")
    assert "another configuration" not in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_count_of_bad_inputs(capsys):
    """How many bad inputs this module tried (every one above was handled): run in one process
    (no -n), it runs last and counts them all; under pytest-xdist, its worker's share, not shown."""
    with capsys.disabled():
        print(f"\nbad inputs tried: {len(TRIED)}")



# ------------------------------------------------------------------------------- endpoint mode
class _FakeServer:
    """An HTTP server on 127.0.0.1 in a thread: GET answers `models` (a JSON body, bytes as they
    are, or a 404 when None), POST streams `chunks` as Server-Sent Events, then [DONE] unless the
    last chunk is None. `hold`: POSTs wait for `release`; `hold_after` N: those after the first N."""

    def __init__(self, models=None, chunks=(), hold=False, hold_after=None):
        import http.server
        import threading

        fake = self
        self.posted, self.release, self.held = threading.Event(), threading.Event(), threading.Event()
        self.lock, self.count = threading.Lock(), 0  # POSTs so far

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, kind: str):
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if fake.models is None:
                    self._send(404, b"<html>not here</html>", "text/html")
                else:  # bytes: sent as they are
                    body = fake.models if isinstance(fake.models, bytes) else json.dumps(fake.models).encode()
                    self._send(200, body, "application/json")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                fake.posted.set()
                with fake.lock:
                    fake.count += 1
                    held = hold or (hold_after is not None and fake.count > hold_after)
                if held:
                    fake.held.set()
                    fake.release.wait(60)
                done = [] if fake.chunks[-1:] == [None] else ["[DONE]"]  # a last None: the stream stops short
                events = "".join(f"data: {c}\n\n" for c in [*(c for c in fake.chunks if c is not None), *done])
                self._send(200, events.encode(), "text/event-stream")

        self.models, self.chunks = models, list(chunks)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # the server and its thread end with the test
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def bad_endpoint(tmp_path, capsys, url, args, *needles, model="m"):
    out = tmp_path / "endpoint"
    TRIED.append(f"--endpoint {url} {' '.join(args)}")
    rc = exit_code(main, ["run", "--endpoint", url, "--model", model, "--num-prompts", "1", "--warmup", "0",
                          "--output-dir", out, *args])
    err = assert_one_line(capsys, rc, *needles)
    assert not out.exists(), "a refused run must write nothing"
    return err


@pytest.mark.parametrize("args,needle", [
    (["--num-prompts", "x"], "--num-prompts"),
    (["--append"], "--append"),  # in-process flags are not endpoint mode's
    (["--timeout", "0"], "--timeout"),
    (["--seed", "-1"], "--seed -1: give a whole number from 0"),  # as an in-process run's
    (["--seed", str(2**64)], "--seed 18446744073709551616"),
    (["--timeout", "nan"], "--timeout"),
    (["--duration", "inf"], "--duration"),  # would send requests for ever
    (["--duration", "5"], "not both"),  # with --num-prompts: which one would stop the point?
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: no such directory"),  # before any request
    (["--max-cv", "nan"], "--max-cv"),
    (["--max-cv", "0"], "--max-cv"),
    (["--num-prompts", str(10**20)], "--num-prompts must be between 1 and"),  # every body is made up front
    (["--warmup", str(10**20)], "--warmup must be between 0 and"),
])
def test_endpoint_flags_that_can_never_run(tmp_path, capsys, args, needle):
    bad_endpoint(tmp_path, capsys, f"http://127.0.0.1:{_closed_port()}/v1", args, needle)


def test_endpoint_model_name_empty(tmp_path, capsys):
    bad_endpoint(tmp_path, capsys, f"http://127.0.0.1:{_closed_port()}/v1", [], "--model is empty", model="")


@pytest.mark.parametrize("flag", ["--image-path", "--questions", "--output-dir"])
@pytest.mark.parametrize("value", ["", "  "])
def test_endpoint_empty_path_flag_is_not_the_default(tmp_path, capsys, monkeypatch, flag, value):
    # an empty --image-path is a mistake, not the demo image; an empty --output-dir not results/local
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    TRIED.append(f"--endpoint URL {flag} {value!r}")
    rc = exit_code(main, ["run", "--endpoint", url, "--model", "m", "--num-prompts", "1", flag, value])
    assert_one_line(capsys, rc, f"{flag} is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://", "127.0.0.1:8000/v1", "ftp://host/v1",
                                 "http://[::1/v1"])
def test_endpoint_url_that_is_not_one(tmp_path, capsys, url):
    bad_endpoint(tmp_path, capsys, url, [], "--endpoint", "URL")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1?key=1", "http://127.0.0.1:8000/v1#models",
                                 "http://127.0.0.1:8000/v1 ", " http://127.0.0.1:8000/v1"])
def test_endpoint_url_that_is_more_than_a_base_url(tmp_path, capsys, url):
    """The client appends /models and /chat/completions to it: a query or fragment would swallow them."""
    bad_endpoint(tmp_path, capsys, url, [], "--endpoint", "base URL alone")


@pytest.mark.parametrize("url", ["http://user:secret@127.0.0.1:8000/v1", "http://secret@127.0.0.1:8000/v1",
                                 "http://:secret@127.0.0.1:8000/v1"])
def test_endpoint_url_with_credentials_is_refused_before_results_keep_them(tmp_path, capsys, url):
    err = bad_endpoint(tmp_path, capsys, url, [], "--endpoint", "OPENAI_API_KEY")
    assert "secret" not in err


@contextlib.contextmanager
def _not_http(redirect: bool = False):
    """A port on 127.0.0.1 whose listener answers every connection with a line that is not HTTP
    (`redirect`: with an HTTP redirect to the same URL)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):  # (a client gone: the next connection is answered)
                asked = conn.recv(65536).split(b" ")
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + asked[1] + b"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n" if redirect and len(asked) > 1 else b"garbage\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_endpoint_server_not_there_or_not_openai(tmp_path, capsys):
    """Refused before anything is written: nothing listens, a plain web server, a model it does
    not serve."""
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    bad_endpoint(tmp_path, capsys, url, [], "--endpoint", "cannot reach")
    with _not_http() as port:  # reached, but what answers is no HTTP server
        bad_endpoint(tmp_path, capsys, f"http://127.0.0.1:{port}/v1", [], "not an HTTP response")
    with _not_http(redirect=True) as port:  # reached, an HTTP server sending it round in a loop
        bad_endpoint(tmp_path, capsys, f"http://127.0.0.1:{port}/v1", [], "redirect again and again")
    with _FakeServer(models=None) as plain:
        bad_endpoint(tmp_path, capsys, plain.url, [], "not an OpenAI API", "HTTP 404")
    with _FakeServer(models={"object": "list", "data": [{"id": "served-one"}]}) as other:
        bad_endpoint(tmp_path, capsys, other.url, [], "--model 'm'", "it serves: served-one", model="m")
    with _FakeServer(models={"object": "list", "data": [{"object": "model"}]}) as nameless:
        bad_endpoint(tmp_path, capsys, nameless.url, [], "--model 'm'", "it serves no model by name", model="m")
    with _FakeServer(models=b"[" * 100000) as deep:  # JSON nested past Python's recursion limit
        bad_endpoint(tmp_path, capsys, deep.url, [], "not an OpenAI API")


def test_a_point_stops_sending_once_the_server_refuses_connections():
    """A server gone away mid-point (nothing listens): at rate inf every refusal frees its slot at
    once, so without a stop a --duration point would write a failed row per refusal, thousands a
    second. It stops at the first: a row per slot at most."""
    import math

    from bench.serve import client as cl

    async def point():
        async with cl.Api(f"http://127.0.0.1:{_closed_port()}/v1", {}, 5.0) as api:
            return await cl.run_point(api, lambda i: {"model": "m", "messages": []}, cl.Point(2, math.inf), 0,
                                      None, 2.0)

    rows = cl.run_async(point())
    assert 1 <= len(rows) <= 2 and all(r["error"].startswith("ClientConnectorError") for r in rows), rows


def test_endpoint_api_key_with_a_line_break(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a\nb")
    bad_endpoint(tmp_path, capsys, f"http://127.0.0.1:{_closed_port()}/v1", [], "OPENAI_API_KEY holds control")


def test_endpoint_output_dir_the_system_will_not_make(tmp_path, capsys):
    """A place no one can make a directory in (/proc; root passes the access check): one line, not
    a traceback."""
    with _FakeServer(models={"object": "list", "data": [{"id": "m"}]}) as server:
        bad_endpoint(tmp_path, capsys, server.url, ["--output-dir", "/proc/vlm-bench/x"], "--output-dir /proc/")


@pytest.mark.parametrize("chunks,reason", [
    (["[1]"], "not an object"),
    (['{"choices": "abc"}'], "not OpenAI's"),
    (['{"choices": [{"delta": {"content": "a"}}], "usage": "many"}'], "not OpenAI's"),
    (['{"error": "boom"}'], "boom"),
    (["{{{"], "JSONDecodeError"),
    (["[" * 50000], "nested too deep"),
    (['{"choices": [{"delta": {"content": "a"}}]}', None], "ended before data: [DONE]"),  # cut short
    # a count past what was asked for: TPOT and tok/s would be made up
    (['{"choices": [{"delta": {"content": "a"}}], "usage": {"completion_tokens": 100000}}'], "more than the"),
])
def test_endpoint_stream_not_openai_is_a_failed_row(tmp_path, capsys, chunks, reason):
    """A server that answers /models but streams something else: every request a failed row with
    the reason, the run goes on, exit code 3 (nothing measured)."""
    TRIED.append(f"endpoint stream {chunks[0]}")
    rows = _two_streamed_requests(tmp_path, capsys, chunks, 3)  # nothing measured
    assert all(r["status"] == "failed" and reason in r["error"] for r in rows), rows


def _two_streamed_requests(tmp_path, capsys, chunks: list[str], rc: int) -> list[dict]:
    """The measured rows of an endpoint run of two requests against a server streaming `chunks`
    to each; the run's exit code is `rc`, with no traceback."""
    import csv

    out = tmp_path / "endpoint"
    with _FakeServer(models={"data": [{"id": "m"}]}, chunks=chunks) as fake:
        code = exit_code(main, ["run", "--endpoint", fake.url, "--model", "m", "--num-prompts", "2", "--warmup", "0",
                                "--output-dir", out])
    err = capsys.readouterr().err
    assert code == rc and "Traceback" not in err, err
    with open(out / "runs.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "measured"]
    assert len(rows) == 2, rows
    if rc == 3:  # nothing measured: said on stderr as an in-process run says it, with the first error
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: nothing measured: every request failed (the first: ") \
            and rows[0]["error"] in last and str(out / "runs.csv") in last, err
    return rows


def test_endpoint_run_killed_part_way_leaves_rows_summarize_reads(tmp_path):
    """SIGKILL (no handler runs) while the second point waits on the server, the first point's
    rows written: env.json, written before any row and saying the run did not finish, lets
    `summarize` rebuild those rows' summary."""
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "killed"
    with _FakeServer(models={"data": [{"id": "m"}]}, chunks=STREAM_OK, hold_after=3) as fake:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--endpoint", fake.url, "--model", "m",
                                 "--concurrency", "1,2", "--num-prompts", "3", "--warmup", "0", "--output-dir",
                                 str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert fake.held.wait(120), "the second point never began"
        finally:
            proc.kill()
        assert proc.wait(timeout=60) == -9
    assert json.loads((out / "env.json").read_text())["interrupted"] is True and not (out / "summary.csv").exists()
    assert main(["summarize", str(out)]) == 0
    ttft = pd.read_csv(out / "summary.csv").query("metric == 'ttft_ms'")
    assert ttft["variant"].tolist() == ["c1 rinf"] and ttft["n"].tolist() == [3]


def test_endpoint_run_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """No room for the first row: exit 4, one line naming runs.csv, and the directory as it was
    (no env.json and header saying the run is there); a run that measured nothing because every
    request failed says so in one line, whatever the server's error holds (a proxy's HTML page)."""
    import errno

    from tests.test_results_dir import disk_full_at_rows

    out = tmp_path / "new" / "endpoint"
    with _FakeServer(models={"data": [{"id": "m"}]}, chunks=STREAM_OK) as fake, monkeypatch.context() as m:
        disk_full_at_rows(m)
        code = exit_code(main, ["run", "--endpoint", fake.url, "--model", "m", "--num-prompts", "2", "--warmup", "0",
                                "--output-dir", out])
    err = capsys.readouterr().err.strip()
    assert code == 4 and err.splitlines()[-1] == (f"error: no space left on the device writing {out / 'runs.csv'} "
                                                  f"({os.strerror(errno.ENOSPC)}); nothing was written"), err
    assert not (tmp_path / "new").exists()
    page = '{"error": "<html>\\n<body>\\n502 Bad Gateway\\n</body>\\n</html>"}'
    rows = _two_streamed_requests(tmp_path, capsys, [page], 3)  # (its stderr: one line, the error as runs.csv has it)
    assert "502 Bad Gateway\\n" in rows[0]["error"]  # (the line breaks as runs.csv escapes them)


STREAM_OK = ['{"choices": [{"delta": {"content": "a"}}]}',
             '{"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]}']


def test_endpoint_text_of_control_bytes_keeps_runs_csv_readable(tmp_path, capsys):
    """A random-weights model served streams NUL and other control characters: the row's
    output_text holds their escapes, so summarize, report and compare read the directory."""
    chunks = ['{"choices": [{"delta": {"content": "a\\u0000\\u0007b"}}]}',
              '{"choices": [{"delta": {"content": "\\u001bc"}, "finish_reason": "length"}]}']
    rows = _two_streamed_requests(tmp_path, capsys, chunks, 0)
    assert [r["output_text"] for r in rows] == ["a\\x00\\x07b\\x1bc"] * 2, rows
    out = tmp_path / "endpoint"
    assert b"\0" not in (out / "runs.csv").read_bytes()
    assert main(["summarize", str(out)]) == 0
    assert main(["compare", str(out), str(out), "--metrics", "ttft_ms"]) in (0, 2)
    assert "not a runs.csv" not in capsys.readouterr().err


_HUGE = "1" + "0" * 400  # a JSON int past float's range


@pytest.mark.parametrize("timings,details,completion,want", [
    # llama.cpp's server: a timings object with other keys; vLLM: prompt_tokens_details null
    ('{"prompt_n": 9, "prompt_ms": 12.5, "predicted_ms": 30.1, "cache_n": 4}', "null", "2",
     {"server_ttft_ms": "", "prefill_ms": "", "cached_tokens": "", "cache_hit": "", "output_tokens": "2"}),
    ('"fast"', '{"cached_tokens": 16}', "2", {"server_ttft_ms": "", "cached_tokens": "16", "cache_hit": "true"}),
    # ours, with an image-embedding hit: no cached prompt tokens, yet cached work reused
    ('{"ttft_ms": 5.5, "prefill_ms": 2, "cache_hit": true}', '{"cached_tokens": 0}', "2",
     {"server_ttft_ms": "5.5", "prefill_ms": "2", "cached_tokens": "0", "cache_hit": "true"}),
    # numbers no count or time can be: ignored, never a crash
    (f'{{"ttft_ms": {_HUGE}, "vision_ms": -1, "prefill_ms": true, "cache_hit": 1}}',
     f'{{"cached_tokens": {_HUGE}}}', _HUGE,
     {"server_ttft_ms": "", "vision_ms": "", "prefill_ms": "", "cached_tokens": "", "cache_hit": "",
      "output_tokens": "2"}),
])
def test_endpoint_usage_and_timings_of_other_shapes_are_filed_or_left_out(tmp_path, capsys, timings, details,
                                                                          completion, want):
    """Other servers' `timings` and usage details (llama.cpp's, vLLM's null), and values out of any
    range: each request an ok row with what could be read, the rest left empty."""
    chunks = ['{"choices": [{"delta": {"content": "a"}}]}',
              f'{{"choices": [{{"delta": {{"content": "b"}}, "finish_reason": "length"}}], "timings": {timings}}}',
              f'{{"choices": [], "usage": {{"prompt_tokens": 9, "completion_tokens": {completion}, '
              f'"prompt_tokens_details": {details}}}}}']
    rows = _two_streamed_requests(tmp_path, capsys, chunks, 0)
    assert all(r["status"] == "ok" for r in rows), rows
    assert [{k: r[k] for k in want} for r in rows] == [want, want]


# ----------------------------------------------------------------------------------------- serve
@pytest.fixture
def taken_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


SERVE = ["serve", "--preset", "tiny-vila", "--device", "cpu", "--max-new-tokens", "4"]


@pytest.mark.parametrize("args,needle", [
    ([], "cannot listen there"),  # the port is taken: refused before the model loads
    (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid'"),
    (["--batch-window-ms", "nan"], "--batch-window-ms"),
    (["--batch-window-ms", "inf", "--max-batch", "2"], "--batch-window-ms"),  # the batcher would wait for ever
    (["--max-request-mb", "0"], "--max-request-mb"),  # every request with a body would be refused
    (["--max-request-mb", "-1"], "--max-request-mb"),
    (["--max-request-mb", "nan"], "--max-request-mb"),
    (["--image-cache-mb", "-1"], "--image-cache-mb"),
    (["--image-cache-mb", "inf"], "--image-cache-mb"),
    (["--workers", "2"], "unrecognized arguments: --workers"),  # a server runs no sweep
    (["--output-dir", "somewhere"], "unrecognized arguments: --output-dir"),
    (["--num-runs", "3"], "unrecognized arguments: --num-runs"),  # nor measures
    (["--max-new-tokens", "5000"], "--max-tokens-limit"),  # every request without max_tokens would be refused
    (["--max-new-tokens", "4096", "--max-tokens-limit", "8000"], "4,096"),  # past the model's positions
    (["--num-runs", "4"], "unrecognized arguments: --num-runs"),  # measurement flags are run's, not serve's
    (["--questions", "q.txt"], "unrecognized arguments: --questions"),
    (["--served-model-name", ""], "--served-model-name is empty"),
    (["--served-model-name", "tiny\nvila"], "--served-model-name 'tiny\\nvila' holds control characters"),
    (["--host", ""], "--host is empty"),
    (["--image-path", "/nonexistent/cat.png"], "--image-path /nonexistent/cat.png: no such file"),
    (["--variants", "fp16+graph"], "cannot run here"),  # checked before the port is taken
    (["--variants", "fp16,prefix"], "serve runs one variant"),
])
def test_serve_flags_that_can_never_serve(capsys, taken_port, args, needle):
    # every case names the taken port: a check that let its case through fails on the port, never serves
    bad_sub(capsys, [*SERVE, "--port", taken_port, *args], needle)


@pytest.fixture(scope="module")
def served():
    """vlm-bench serve's application over tiny-vila, in this process (fastapi's TestClient)."""
    from fastapi.testclient import TestClient

    from bench.run.config import config_class
    from bench.serve.app import create_app
    from bench.serve.loading import load_engine, model_source

    cfg = config_class()(preset="tiny-vila", device="cpu", cpu_threads=1)
    engine, _, name = load_engine(cfg, model_source(cfg))
    with TestClient(create_app(engine, name, 4, max_batch=2)) as client:
        yield client


def _chat(image: bytes | None = None, question="What is it?", **extra) -> dict:
    import base64

    from bench.run.config import DEMO_IMAGE

    url = "data:image/png;base64," + base64.b64encode(image or DEMO_IMAGE.read_bytes()).decode()
    return {"model": "tiny-vila", "max_tokens": 2, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}


@pytest.mark.parametrize("body,param,needle", [
    (_chat(stream=True, stream_options="usage"), "stream_options", "object"),
    (_chat(stream=True, stream_options=[1]), "stream_options", "object"),
    (_chat(temperature=-1), "temperature", "greedy"),
    (json.dumps(_chat()).replace('"max_tokens": 2', '"max_tokens": 2, "temperature": NaN'), "temperature", "greedy"),
    (_chat(question="word " * 5000), "messages", "positions"),  # past the model's 4,096
    (_chat(question="word " * 5000, stream=True), "messages", "positions"),  # streamed: a status too
    (_chat(max_tokens=4096), "messages", "positions"),  # the prompt comes on top
])
def test_serve_bad_request_is_a_4xx_and_the_server_serves_on(served, body, param, needle):
    TRIED.append(f"serve request {param}")
    r = served.post("/v1/chat/completions", **({"content": body} if isinstance(body, str) else {"json": body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]
    ok = served.post("/v1/chat/completions", json=_chat())
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # what the test sends
def test_serve_image_past_the_pixel_limit(served, tmp_path, monkeypatch):
    # between PIL's limit and twice it PIL only warns: refused as image files are
    TRIED.append("serve image past the pixel limit")
    image = small_png(tmp_path / "big.png", (40, 40)).read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    r = served.post("/v1/chat/completions", json=_chat(image))
    assert r.status_code == 400 and "too large" in r.json()["error"]["message"], r.text
    # past twice the limit PIL refuses it at open: the same words, with its size (not "cannot be decoded")
    r = served.post("/v1/chat/completions", json=_chat(png_header(tmp_path / "bomb.png", 5000, 5000).read_bytes()))
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "the image (25,000,000 pixels) is too large to decode safely; send at most 1,000 pixels"), r.text


def test_endpoint_output_dir_not_empty_names_what_endpoint_mode_takes(tmp_path, capsys):
    # endpoint mode has no --append or --resume: the refusal must not suggest them
    out = tmp_path / "endpoint"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    TRIED.append("--endpoint URL --output-dir NON-EMPTY")
    rc = exit_code(main, ["run", "--endpoint", f"http://127.0.0.1:{_closed_port()}/v1", "--model", "m",
                          "--output-dir", out])
    err = assert_one_line(capsys, rc, "--output-dir", "not empty", "give a new or empty --output-dir")
    assert "--append" not in err and "--resume" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_endpoint_run_interrupted_is_one_line_exit_130(tmp_path):
    """Ctrl-C while a request is in flight: no traceback, exit code 130, one line naming where
    the rows written so far are (none here), with their summary and env.json (as an interrupted
    in-process run), so the directory is an ordinary results directory."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "endpoint"
    TRIED.append("--endpoint URL interrupted")
    with _FakeServer(models={"data": [{"id": "m"}]}, hold=True) as fake:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--endpoint", fake.url, "--model", "m",
                                 "--num-prompts", "1", "--warmup", "0", "--output-dir", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert fake.posted.wait(60), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and str(out) in lines[0], err
    assert "no request had finished" in lines[0], err  # the one request was still in flight
    assert {p.name for p in out.iterdir()} >= {"runs.csv", "summary.csv", "env.json"}
    assert json.loads((out / "env.json").read_text())["interrupted"] is True
