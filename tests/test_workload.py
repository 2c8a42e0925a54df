"""Video frames (PyAV, frame folders), uniform sampling, the prefetching loader, and the sweep
axes (batch, question length, new tokens, images per prompt) run as one command."""
import csv
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.cli import run_main
from bench.run.media import FrameLoader, FrameSource, sample_indices
from bench.models.loader import build_preset
from bench.run.workload import derived_images, question_of_length, workload_points

CPU = torch.device("cpu")


def colour(i: int) -> tuple[int, int, int]:
    return (i * 8 % 256, 255 - i * 8 % 256, (i * 40) % 256)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    for i in range(30):
        Image.new("RGB", (64, 48), colour(i)).save(d / f"frame_{i:03d}.png")
    (d / "notes.txt").write_text("not a frame")
    return d


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)  # lossless: decoded colours are exact
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        for i in range(30):
            img = np.zeros((48, 64, 3), dtype=np.uint8)
            img[:] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_uniform_sampling_takes_segment_middles():
    # InternVL's get_index: seg = (last - first) / n, index = first + seg / 2 + round(seg * i)
    assert sample_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than asked: all of them
    assert sample_indices(10, 0) == list(range(10))
    for total, n in ((1000, 80), (1000, 128), (37, 7)):
        idx = sample_indices(total, n)
        assert len(idx) == n and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < total


def closest(frame: Image.Image) -> int:
    px = frame.getpixel((32, 24))
    return min(range(30), key=lambda i: sum(abs(a - b) for a, b in zip(px, colour(i))))


def test_frames_dir_and_video_give_the_sampled_frames(frames_dir, video_path):
    want = sample_indices(30, 6)
    folder = FrameSource(frames_dir=str(frames_dir), num_frames=6)
    assert folder.total == 30 and [closest(f) for f in folder] == want
    video = FrameSource(video_path=str(video_path), num_frames=6)
    assert video.total == 30 and [closest(f) for f in video] == want
    clip = video.clip()
    assert clip.video and len(clip) == 6


def test_prefetch_hides_frame_reading_behind_the_consumer(frames_dir):
    source = FrameSource(frames_dir=str(frames_dir), num_frames=10)

    def slow_preprocess(v):  # stands in for decode + the image processor
        time.sleep(0.03)
        return torch.zeros(1)

    waits = {}
    for prefetch in (False, True):
        loader = FrameLoader(source, batch=2, prefetch=prefetch, preprocess=slow_preprocess)
        seen, w = [], []
        for _ in range(8):  # 16 frames: the 10 sampled ones, then around again
            frames, waited = loader.next()
            seen += [closest(f.images[0]) for f in frames]
            w.append(waited)
            time.sleep(0.1)  # the GPU's work on this batch
        loader.close()
        assert seen == (source.indices * 2)[:16]  # same frames, same order
        assert all(f.pixel_values is not None for f in frames)
        files = sorted(p for p in frames_dir.iterdir() if p.suffix == ".png")
        assert [f.encoded for f in frames] == [(files[i].read_bytes(),) for i in (source.indices * 2)[14:16]]
        waits[prefetch] = statistics.median(w[1:])
    assert waits[False] >= 0.05  # two frames read while the GPU waits
    assert waits[True] < 0.02  # ready before asked for


def test_question_of_length_is_exact():
    a = build_preset("tiny-llava", None, CPU, torch.float32)
    tail = len(a.prepare_text("").suffix_ids)
    count = lambda q: len(a.prepare_text(q).suffix_ids) - tail  # noqa: E731
    for n in (3, 16, 40, 100):
        q = question_of_length(count, "Describe every object in this image.", n)
        assert count(q) == n, (n, q)


def test_derived_images_are_distinct_and_same_size(demo_image):
    ims = derived_images(demo_image, 8)
    assert len({im.tobytes() for im in ims}) == 8 and {im.size for im in ims} == {demo_image.size}


def test_a_single_image_request_is_keyed_by_its_file(demo_image, tmp_path):
    """The prefix key hashes the bytes a request carried (no pixel copy); the same pixels in
    another file are another key, a different file another key; without a file, the pixels."""
    from bench.models.visual import VisualInput
    from bench.run.workload import RequestSource, WorkloadPoint

    png = (Path(__file__).parents[1] / "bench" / "assets" / "demo.png").read_bytes()
    demo_image.save(tmp_path / "same.bmp")
    bmp = (tmp_path / "same.bmp").read_bytes()
    point = WorkloadPoint()
    visual = RequestSource(point, demo_image, image_file=png).visual
    assert visual.encoded == (png,)
    assert visual.content_digest() == VisualInput((demo_image.copy(),), encoded=(png,)).content_digest()
    assert visual.content_digest() != VisualInput((demo_image,), encoded=(bmp,)).content_digest()
    assert VisualInput((demo_image,)).content_digest() == VisualInput((demo_image.copy(),)).content_digest()
    assert VisualInput((demo_image,)).content_digest() != visual.content_digest()
    from bench.models.visual import png_bytes

    two = RequestSource(WorkloadPoint(num_images=2), demo_image, image_file=png).visual
    assert two.encoded == (png, png_bytes(derived_images(demo_image, 2)[1]))  # a derived image as PNG
    assert RequestSource(WorkloadPoint(num_images=2), demo_image).visual.encoded is None  # no file: pixels
    with pytest.raises(ValueError):
        VisualInput((demo_image, demo_image), encoded=(png,))


def test_fixed_prompt_text_is_tokenized_once(demo_image):
    """A warm request tokenizes only what changes: the template text before the (last) image is
    memoized, one tokenizer call covers the rest, and the prepared prompt is the same as
    without the memo."""
    for preset in ("tiny-llava", "tiny-vila", "tiny-internvl"):
        adapter = build_preset(preset, None, torch.device("cpu"), torch.float32)
        first = adapter.prepare_text("What is shown?", demo_image)
        calls = []
        encode = adapter._encode
        adapter._encode = lambda text: calls.append(text) or encode(text)
        again = adapter.prepare_text("What is shown?", demo_image)
        assert (again.text_segments, again.suffix_ids) == (first.text_segments, first.suffix_ids)
        assert len(calls) == 1, (preset, calls)
        assert "What is shown?" in calls[0] and adapter.template.system not in calls[0], (preset, calls)
        fresh = build_preset(preset, None, torch.device("cpu"), torch.float32)
        other = fresh.prepare_text("Something else entirely?", demo_image)
        memo = adapter.prepare_text("Something else entirely?", demo_image)
        assert (memo.text_segments, memo.suffix_ids) == (other.text_segments, other.suffix_ids)


def test_points_are_the_cross_product():
    pts = workload_points([1, 4], [16], [8, 32], [1], [])
    assert [(p.batch_size, p.new_tokens) for p in pts] == [(1, 8), (1, 32), (4, 8), (4, 32)]
    assert all(p.question_tokens == 16 and p.loader == "" for p in pts)


def test_sweep_runs_every_point_into_one_directory(tmp_path):
    out = tmp_path / "sweep"
    rc = run_main(["--preset", "tiny-internvl", "--variants", "fp16,prefix", "--batch-size", "1,3",
                   "--new-tokens", "3,5", "--prompt-lengths", "12", "--num-images", "1,2", "--max-tiles", "2",
                   "--num-runs", "2", "--min-seconds", "0", "--warmup", "1", "--no-fidelity",
                   "--output-dir", str(out)])
    assert rc == 0
    measured = [r for r in rows(out / "runs.csv") if r["kind"] == "measured"]
    points = {(r["variant"], r["batch_size"], r["new_tokens"], r["num_images"], r["cache_state"]) for r in measured}
    assert len(points) == 2 * 2 * 2 * 2 + 2 * 2 * 2  # prefix also has cold runs
    assert all(r["status"] == "ok" and r["question_tokens"] == "12" for r in measured)
    adapter = build_preset("tiny-internvl", None, CPU, torch.float32)
    assert {adapter.count_tokens(r["question"]) for r in measured} == {12}  # the question alone, as endpoint mode
    two = [r for r in measured if r["num_images"] == "2" and r["batch_size"] == "3"]
    one = [r for r in measured if r["num_images"] == "1" and r["batch_size"] == "3"]
    assert int(two[0]["prompt_tokens"]) > int(one[0]["prompt_tokens"])
    assert all(float(r["requests_per_s"]) > 0 and float(r["output_tok_s"]) > 0 for r in measured)
    warm3 = [r for r in measured if r["variant"] == "prefix" and r["cache_state"] == "warm" and r["batch_size"] == "3"]
    assert warm3 and all(r["cache_hit"] == "true" for r in warm3)
    summary = rows(out / "summary.csv")
    ttft = [r for r in summary if r["metric"] == "ttft_ms" and r["variant"] == "fp16"]
    assert {(r["batch_size"], r["new_tokens"], r["num_images"]) for r in ttft} == {
        (b, n, i) for b in ("1", "3") for n in ("3", "5") for i in ("1", "2")}


def test_video_frames_with_and_without_prefetch(tmp_path, video_path):
    out = tmp_path / "video"
    rc = run_main(["--preset", "tiny-internvl", "--video-path", str(video_path), "--num-frames", "6",
                   "--loader", "serial,prefetch", "--batch-size", "2", "--max-new-tokens", "3", "--num-runs", "4",
                   "--min-seconds", "0", "--warmup", "1", "--no-fidelity", "--output-dir", str(out)])
    assert rc == 0
    measured = [r for r in rows(out / "runs.csv") if r["kind"] == "measured"]
    assert {r["loader"] for r in measured} == {"serial", "prefetch"}
    one_frame = build_preset("tiny-internvl", None, CPU, torch.float32).prepare_text(
        "q", Image.new("RGB", (64, 48))).prefix_tokens  # each request: one frame, as a still image
    for r in measured:
        assert float(r["stream_ms"]) >= float(r["e2e_ms"]) and r["load_ms"] != ""
        assert int(r["prefix_tokens"]) == one_frame
    serial = [r for r in measured if r["loader"] == "serial"]
    prefetch = [r for r in measured if r["loader"] == "prefetch"]
    # the serial loader runs the processor inside the request; the prefetcher did it ahead
    assert statistics.median(float(r["preprocess_ms"]) for r in prefetch) < \
        statistics.median(float(r["preprocess_ms"]) for r in serial)


def test_a_cache_in_frames_mode_measures_its_cold_runs_and_says_why_no_warm_ones(tmp_path, frames_dir):
    """Each request shows its own frame: no request can reuse another's prefix or embeddings, so
    the cold rows stand and the warm group is a skipped row saying why (it was "warm" rows of
    requests that all missed)."""
    out = tmp_path / "frames"
    assert run_main(["--preset", "tiny-vila", "--frames-dir", str(frames_dir), "--num-frames", "6",
                     "--variants", "fp16,prefix,embedcache", "--max-new-tokens", "3", "--num-runs", "2",
                     "--min-seconds", "0", "--warmup", "1", "--no-fidelity", "--output-dir", str(out)]) == 0
    got = rows(out / "runs.csv")
    for variant in ("prefix", "embedcache"):
        mine = [r for r in got if r["variant"] == variant]
        assert {r["cache_state"] for r in mine if r["kind"] == "measured"} == {"cold"}
        skipped = [r for r in mine if r["status"] == "skipped"]
        assert len(skipped) == 1 and "--video-mode frames shows each request its own frame" in skipped[0]["error"]
    assert all(r["status"] == "ok" for r in got if r["variant"] == "fp16")


def test_video_clip_mode_shows_every_frame(tmp_path, frames_dir):
    out = tmp_path / "clip"
    rc = run_main(["--preset", "tiny-internvl", "--frames-dir", str(frames_dir), "--num-frames", "5",
                   "--video-mode", "clip", "--variants", "prefix", "--max-new-tokens", "3", "--num-runs", "2",
                   "--min-seconds", "0", "--warmup", "1", "--output-dir", str(out)])
    assert rc == 0
    measured = [r for r in rows(out / "runs.csv") if r["kind"] == "measured"]
    tiny = build_preset("tiny-internvl", None, CPU, torch.float32)
    assert all(int(r["prefix_tokens"]) > 5 * tiny.tokens_per_tile for r in measured)
    assert any(r["cache_hit"] == "true" for r in measured if r["cache_state"] == "warm")
    assert all(r["token_agree"] != "" for r in measured)  # fidelity on the clip


@pytest.mark.parametrize("args,needle", [
    (["--video-path", "missing.mp4"], "--video-path missing.mp4: no such file"),
    (["--frames-dir", "nowhere"], "--frames-dir nowhere: no such directory"),
    (["--batch-size", "0"], "--batch-size: every value must be at least 1"),
    (["--new-tokens", "a,b"], "--new-tokens takes comma-separated whole numbers"),
    (["--loader", "threads"], "--loader: choose from serial, prefetch"),
    (["--video-mode", "reel"], "unknown --video-mode 'reel'"),
])
def test_workload_usage_errors(args, needle, capsys):
    assert run_main(["--preset", "tiny-internvl", *args]) == 2
    assert needle in capsys.readouterr().err


def test_num_images_with_video_is_a_usage_error(frames_dir, capsys):
    assert run_main(["--frames-dir", str(frames_dir), "--num-images", "2"]) == 2
    assert "--num-images applies to image input" in capsys.readouterr().err


def test_summary_rebuilds_from_runs_csv(tmp_path):
    """`python -m bench summarize DIR` gives the summary the run wrote (to CSV precision)."""
    import pandas as pd

    from bench.cli.summarize import main as summarize_main

    out = tmp_path / "s"
    assert run_main(["--preset", "tiny-llava", "--batch-size", "1,2", "--max-new-tokens", "3", "--num-runs", "3",
                     "--min-seconds", "0", "--warmup", "0", "--no-fidelity", "--output-dir", str(out)]) == 0
    before = pd.read_csv(out / "summary.csv")
    (out / "summary.csv").unlink()
    env = json.loads((out / "env.json").read_text())
    env["config"]["option_of_another_version"] = True  # results written by an older or newer harness
    (out / "env.json").write_text(json.dumps(env))
    assert summarize_main([str(out)]) == 0
    after = pd.read_csv(out / "summary.csv")
    assert len(after) == len(before) and list(after["metric"]) == list(before["metric"])
    pd.testing.assert_series_equal(after["median"], before["median"], rtol=1e-5)
    assert list(after["batch_size"]) == list(before["batch_size"]) and list(after["valid"]) == list(before["valid"])


def test_a_clip_is_keyed_by_the_files_its_frames_came_from(frames_dir, video_path, monkeypatch):
    """A clip's prefix key hashes the frame files, or the video file and how many frames were
    sampled from it, never the decoded frames' pixels (80 frames' pixels took most of a warm
    TTFT); a changed frame file or another frame count is another key."""
    import shutil

    from PIL import Image

    from bench.run.media import FrameSource

    from_dir = FrameSource(frames_dir=str(frames_dir), num_frames=4).clip()
    files = sorted(p for p in frames_dir.iterdir() if p.suffix == ".png")
    assert from_dir.encoded is not None and len(from_dir.encoded) == 4
    assert set(from_dir.encoded) <= {p.read_bytes() for p in files}
    from_video = FrameSource(video_path=str(video_path), num_frames=4).clip()
    assert from_video.container == video_path.read_bytes()
    monkeypatch.setattr("bench.run.media.CONTAINER_KEY_BYTES", video_path.stat().st_size - 1)
    assert FrameSource(video_path=str(video_path), num_frames=4).clip().container is None  # too large: pixels
    monkeypatch.undo()

    monkeypatch.setattr(Image.Image, "tobytes", lambda *a, **k: pytest.fail("a frame's pixels were copied"))
    keys = {from_dir.content_digest(), from_video.content_digest(),
            FrameSource(video_path=str(video_path), num_frames=8).clip().content_digest()}
    assert len(keys) == 3
    assert FrameSource(frames_dir=str(frames_dir), num_frames=4).clip().content_digest() == from_dir.content_digest()
    assert FrameSource(video_path=str(video_path), num_frames=4).clip().content_digest() == \
        from_video.content_digest()
    monkeypatch.undo()

    changed = frames_dir.parent / "changed"
    shutil.copytree(frames_dir, changed)
    first = sorted(p for p in changed.iterdir() if p.suffix == ".png")[FrameSource(
        frames_dir=str(changed), num_frames=4).indices[0]]
    with Image.open(first) as im:
        im = im.copy()
    im.putpixel((0, 0), (1, 2, 3))
    im.save(first)
    assert FrameSource(frames_dir=str(changed), num_frames=4).clip().content_digest() != from_dir.content_digest()


def test_a_questions_file_is_split_at_line_ends_only(tmp_path):
    """\n, \r\n and \r end a question; a form feed or U+2028 inside one (str.splitlines() would
    split there) stays in it."""
    from bench.run.questions import load_questions

    p = tmp_path / "q.txt"
    p.write_bytes("\ufeffWhat is\u2028this?\r\nSecond\x0cquestion\rThird\u0085one\n\n  \nlast".encode())
    assert load_questions(str(p), None) == ["What is\u2028this?", "Second\x0cquestion", "Third\u0085one", "last"]


def test_hidden_files_in_a_frames_folder_are_no_frames(frames, tmp_path):
    """macOS's ._NAME.png copies (resource forks, not images) and other hidden files are skipped."""
    import shutil

    folder = tmp_path / "frames"
    shutil.copytree(frames, folder)
    (folder / "._frame_000.png").write_bytes(b"\x00\x05\x16\x07 not a png")
    (folder / ".thumb.png").write_bytes(b"")
    source = FrameSource(frames_dir=str(folder), num_frames=0)
    assert source.total == 12 and all(not p.name.startswith(".") for p in source.files)
