"""Every bad input is one line on stderr naming the input, exit code 2, nothing written, and it
is refused before any model loads. Fixtures are built here, small; runs go in-process."""
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from bench.cli import main, run_main
from tests.conftest import DEMO

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


def bad_run(tmp_path, capsys, args, *needles):
    out = tmp_path / "results"
    TRIED.append(" ".join(str(a) for a in args))
    rc = run_main([*RUN, "--output-dir", str(out), *args])
    assert_one_line(capsys, rc, *needles)
    assert not out.exists(), "a refused run must write nothing"


# ---------------------------------------------------------------------------------------- images
def test_image_bomb(tmp_path, capsys):
    bomb = png_header(tmp_path / "bomb.png", 100_000, 100_000)
    bad_run(tmp_path, capsys, ["--image-path", str(bomb)], "--image-path", "bomb.png", "too large")


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


@pytest.mark.parametrize("content", ["bomb", "garbage"])
def test_awq_calib_dir_bad_files(tmp_path, capsys, content):
    d = tmp_path / "calib"
    d.mkdir()
    small_png(d / "a.png")
    if content == "bomb":
        png_header(d / "b.png", 90_000, 90_000)
    else:
        (d / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad_run(tmp_path, capsys, ["--variants", "awq4", "--awq-calib-dir", str(d)], "--awq-calib-dir", "b.")


# ------------------------------------------------------------------------------------------ text
def test_text_prompt_not_utf8(tmp_path, capsys):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Linux hands over a latin-1 argv
    bad_run(tmp_path, capsys, ["--text-prompt", prompt], "--text-prompt", "UTF-8")


@pytest.mark.parametrize("data", [b"Qu'est-ce que c'est ? caf\xe9\n", b"\x00\x01\x02\xff\xfe binary\x00",
                                  b"valid utf-8 but \x00 binary\n"])
def test_questions_not_utf8_text(tmp_path, capsys, data):
    q = tmp_path / "q.txt"
    q.write_bytes(data)
    bad_run(tmp_path, capsys, ["--questions", str(q)], "--questions", "q.txt", "UTF-8")


def test_prompt_longer_than_context(tmp_path, capsys):
    q = tmp_path / "long.txt"
    q.write_text("word " * 60_000 + "\n")
    bad_run(tmp_path, capsys, ["--questions", str(q)], "--questions", "4,096")
    bad_run(tmp_path, capsys, ["--text-prompt", "why " * 5000], "--text-prompt", "4,096")


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
    (["--num-frames", str(10**8)], "--num-frames"),
    (["--max-cv", "-0.5"], "--max-cv"),
    (["--max-cv", "0"], "--max-cv"),
    (["--max-cv", "nan"], "--max-cv"),
    (["--variants", "prefix", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["--variants", "prefix", "--prefix-cache-mb", "0"], "--prefix-cache-mb"),
    (["--device", "mps"], "--device 'mps'"),
    (["--device", "meta"], "--device 'meta'"),
    (["--device", "xpu"], "--device 'xpu'"),
    (["--device", "cpu:3"], "--device 'cpu:3'"),
    (["--batch-size", "abc"], "--batch-size"),
])
def test_flags_that_can_never_run(tmp_path, capsys, args, needle):
    bad_run(tmp_path, capsys, args, needle)


def test_missing_gpu_index_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    bad_run(tmp_path, capsys, ["--device", "cuda:7"], "--device cuda:7", "2 CUDA device")


def test_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    TRIED.append("--output-dir FILE")
    rc = run_main([*RUN, "--output-dir", str(f)])
    assert_one_line(capsys, rc, "--output-dir", "is a file")
    assert f.read_text() == "x"
