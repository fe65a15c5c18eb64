"""Video pipeline on real encoded clips made here with PyAV: accounting, timestamps,
corrupt packets, real-time drops, sources, audio, interrupts; and `segfast run`."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import segfast
from segfast import InputError, models
from segfast.kernels.preprocess import preprocess_reference
from segfast.runtime import postprocess, video
from segfast.runtime.sources import decode_image
from segfast.runtime.video import SourceEndedWarning, StreamStats, encode_png

av = pytest.importorskip("av")

W, H, N = 64, 48, 20  # clip size and frame count


def _frame(i: int) -> np.ndarray:
    """A BGR test frame: a moving bar and a square (content for the model to vary on)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : (i * 3) % W] = 200
    img[10:30, 8 + i : 28 + i, 1] = 60 + 8 * i
    return img


def make_clip(path: Path, *, frames: int = N, audio: bool = False, fps: int = 25) -> Path:
    """Encode ``frames`` frames (H.264, GOP 5, no B-frames) and optionally AAC audio."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "ultrafast", "g": "5", "bf": "0"}
        a = None
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(_frame(i), format="bgr24")
            f.pts, f.time_base = i, Fraction(1, fps)
            for p in s.encode(f):
                out.mux(p)
        if a is not None:
            n = 16000 * frames // fps
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)
            for k in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(
                    tone[None, k : k + 1024], format="fltp", layout="mono"
                )
                af.sample_rate, af.pts, af.time_base = 16000, k, Fraction(1, 16000)
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def packets(path: Path, kind: str = "video") -> list:
    with av.open(str(path)) as c:
        st = c.streams.video[0] if kind == "video" else c.streams.audio[0]
        return [(p.pos, p.size) for p in c.demux(st) if p.size]


def read_back(path: Path) -> tuple[list[float], list[np.ndarray], list[str]]:
    """(frame times in seconds, BGR frames, stream types) of a written video."""
    with av.open(str(path)) as c:
        kinds = [s.type for s in c.streams]
        times, imgs = [], []
        for f in c.decode(video=0):
            times.append(float(f.pts * f.time_base))
            imgs.append(f.to_ndarray(format="bgr24"))
    return times, imgs, kinds


class SlowEngine:
    """Wraps an engine: sleeps before each call; optionally raises on call ``fail_at``."""

    def __init__(self, engine, delay: float, fail_at: int | None = None, exc=KeyboardInterrupt):
        self.engine, self.delay, self.fail_at, self.exc = engine, delay, fail_at, exc
        self.info, self.device = engine.info, engine.device
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            time.sleep(0.2)  # let the earlier frames reach the writer
            raise self.exc()
        time.sleep(self.delay)
        return self.engine(x)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()


@pytest.fixture(scope="module")
def engine(net):
    # 32×32 static: every 48×64 frame is resized in and the mask resized back out.
    return segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", output="mask")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


@pytest.fixture(scope="module")
def clip_audio(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip_audio.mp4", audio=True)


def _assert_accounted(s: StreamStats) -> None:
    assert s.frames_in == s.frames_out + s.dropped + s.skipped, s.report()
    assert s.unfinished == 0


def test_clip_roundtrip_counts_and_timestamps(engine, clip, tmp_path):
    out = tmp_path / "out.mp4"
    results = []
    stats = video.run_video(engine, clip, out, on_result=results.append)
    _assert_accounted(stats)
    assert stats.frames_in == len(packets(clip)) == N
    assert (stats.frames_out, stats.dropped, stats.skipped) == (N, 0, 0)
    times, imgs, _ = read_back(out)
    assert len(times) == N
    assert times == pytest.approx([i / 25 for i in range(N)])
    assert [r.time for r in results] == pytest.approx(times)
    assert [r.index for r in results] == list(range(N))
    # The written frames are the overlays (up to H.264's loss).
    for r, img in zip(results, imgs, strict=True):
        assert r.overlay.shape == (H, W, 3)
        assert r.mask.shape == (H, W)
        assert np.abs(img.astype(int) - r.overlay).mean() < 8
    # Stage statistics are there for every frame, with percentiles.
    summ = stats.summary()
    for stage in ("decode", "preprocess", "infer", "overlay", "encode", "end-to-end"):
        assert summ[stage].n == N
        assert summ[stage].p99_ms >= summ[stage].p50_ms > 0
    assert stats.fps > 0
    d = stats.as_dict()
    assert d["frames_in"] == N
    assert d["latency_ms"]["end-to-end"]["n"] == N
    assert "p99" in stats.report()
    assert "dropped 0" in stats.report()


def test_mask_matches_the_engine_on_each_frame(engine, clip):
    """The pipeline's mask = engine(preprocess(frame)) resized back by nearest neighbour."""
    with video.stream(engine, clip, output=None) as s:
        results = list(s)
    assert len(results) == N
    for r in results[:: N // 4]:
        x = preprocess_reference(torch.from_numpy(r.image), (32, 32), mean=(0,) * 3, std=(1,) * 3)
        m = engine(x)[0].numpy()  # 32×32
        iy = np.minimum(((np.arange(H) + 0.5) * 32 / H).astype(int), 31)
        ix = np.minimum(((np.arange(W) + 0.5) * 32 / W).astype(int), 31)
        np.testing.assert_array_equal(r.mask, m[np.ix_(iy, ix)])
        assert r.overlay is None
    assert len({r.mask.tobytes() for r in results}) > 1  # the frames differ


def test_corrupt_packet_is_skipped_and_counted(engine, clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    data = bytearray(clip.read_bytes())
    pos, size = packets(clip)[7]  # a P-frame
    data[pos : pos + size] = bytes(size)
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    stats = video.run_video(engine, bad, out)
    _assert_accounted(stats)
    assert stats.frames_in == N
    assert stats.skipped >= 1
    assert "packet 7" in stats.skip_reasons[0]
    times, _, _ = read_back(out)
    assert len(times) == stats.frames_out == N - stats.skipped


def test_realtime_drops_oldest_frames_under_a_slow_engine(engine, clip, tmp_path):
    slow = SlowEngine(engine, delay=0.12)  # 3× a 25 fps frame interval
    out = tmp_path / "rt.mp4"
    results = []
    stats = video.run_video(slow, clip, out, realtime=True, queue_size=1, on_result=results.append)
    _assert_accounted(stats)
    assert stats.frames_in == N
    assert stats.dropped > 0
    assert stats.frames_out == slow.calls < N
    assert f"dropped {stats.dropped}" in stats.report()
    # What was written kept its own timestamps (gaps where frames were dropped).
    times, _, _ = read_back(out)
    assert len(times) == stats.frames_out
    assert times == pytest.approx([r.time for r in results])
    assert max(np.diff(times)) > 1.5 / 25
    # Dropping the oldest frame keeps the newest: the last frame is always processed.
    assert results[-1].index == N - 1


def test_not_realtime_waits_instead_of_dropping(engine, clip, capsys):
    slow = SlowEngine(engine, delay=0.01)
    with video.stream(slow, clip, output=None, queue_size=1, progress=True) as s:
        n = sum(1 for _ in s)
    assert f"{N}/{N}" in capsys.readouterr().err  # the live progress bar
    assert n == N
    assert s.stats.dropped == 0
    _assert_accounted(s.stats)


def test_audio_is_copied(engine, clip_audio, tmp_path):
    out = tmp_path / "audio.mp4"
    stats = video.run_video(engine, clip_audio, out)
    _assert_accounted(stats)
    times, _, kinds = read_back(out)
    assert kinds == ["video", "audio"]
    assert len(times) == N
    assert packets(out, "audio")
    assert len(packets(out, "audio")) == len(packets(clip_audio, "audio"))
    # .avi can't hold AAC as copied packets: no audio, and a note saying so.
    stats = video.run_video(engine, clip_audio, tmp_path / "audio.avi")
    assert any("audio (aac) not copied" in n for n in stats.notes)
    assert read_back(tmp_path / "audio.avi")[2] == ["video"]


def test_image_directory_and_single_image(engine, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        (src / f"im{i}.png").write_bytes(video.encode_png(_frame(4 * i)[..., ::-1].copy(), "rgb24"))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "notes.txt").write_text("ignored: not an image")
    results = []
    stats = video.run_video(
        engine, src, tmp_path / "masks", output="mask", on_result=results.append
    )
    _assert_accounted(stats)
    assert (stats.frames_in, stats.frames_out, stats.skipped) == (4, 3, 1)
    assert "broken.png" in stats.skip_reasons[0]
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert written == ["im0.png", "im1.png", "im2.png"]
    for r in results:
        # The mask PNG holds the class ids exactly; the frame was decoded exactly (PNG).
        np.testing.assert_array_equal(r.image, _frame(4 * int(r.name[2])))
        back = decode_image(tmp_path / "masks" / r.name, "gray")
        np.testing.assert_array_equal(back, r.mask)

    one = tmp_path / "single.png"
    stats = video.run_video(engine, src / "im1.png", one)
    assert stats.frames_out == 1
    assert one.exists()
    assert decode_image(one, "bgr24").shape == (H, W, 3)


def test_source_failing_midway_ends_cleanly(engine, tmp_path):
    def camera():
        for i in range(6):
            yield _frame(i)
        raise ConnectionResetError("camera unplugged")

    out = tmp_path / "cam.mp4"
    with pytest.warns(SourceEndedWarning, match="camera unplugged"):
        stats = video.run_video(engine, camera(), out, fps=10)
    _assert_accounted(stats)
    assert stats.frames_out == 6
    assert "ConnectionResetError" in stats.end_reason
    times, _, _ = read_back(out)
    assert times == pytest.approx([i / 10 for i in range(6)])


_LIVE_SERVER = """
import sys, time
import av, numpy as np
url, n = sys.argv[1], int(sys.argv[2])
out = av.open(url + "?listen=1", "w", format="mpegts")  # waits for the client
s = out.add_stream("libx264", rate=25)
s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
s.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "5", "bf": "0"}
for i in range(n):
    f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="bgr24")
    f.pts = i
    for p in s.encode(f):
        out.mux(p)
    time.sleep(0.02)
out.close()  # the server goes away; the client sees the connection end
"""


def test_live_network_source_that_disconnects(engine, tmp_path):
    """A live MPEG-TS stream over TCP (the same PyAV path as rtsp://) from another
    process, which stops sending: the stream ends cleanly, says so, and the file plays."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    server = subprocess.Popen([sys.executable, "-c", _LIVE_SERVER, url, "12"])
    try:
        for _ in range(200):  # until the server listens
            try:
                s = video.stream(engine, url, writer=tmp_path / "live.mp4", realtime=True)
                break
            except InputError:
                time.sleep(0.05)
        else:
            raise AssertionError("the test server never accepted a connection")
        assert s.source.info.kind == "live"
        with pytest.warns(SourceEndedWarning, match="live source"), s:
            n = sum(1 for _ in s)
    finally:
        server.wait(timeout=30)
    assert n == s.stats.frames_out > 0, s.stats.report()
    assert s.stats.frames_in == s.stats.frames_out + s.stats.dropped + s.stats.skipped
    assert len(read_back(tmp_path / "live.mp4")[0]) == n


def test_truncated_file_ends_cleanly(engine, clip, tmp_path):
    mkv = tmp_path / "full.mkv"
    with av.open(str(clip)) as src, av.open(str(mkv), "w") as dst:  # remux to a streamable file
        o = dst.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.size:
                p.stream = o
                dst.mux(p)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    stats = video.run_video(engine, cut, tmp_path / "cut_out.mp4")
    assert stats.frames_in == stats.frames_out + stats.skipped
    assert 0 < stats.frames_out < N
    assert len(read_back(tmp_path / "cut_out.mp4")[0]) == stats.frames_out


@pytest.mark.parametrize("where", ["engine", "consumer"])
def test_interrupt_still_leaves_a_playable_file(engine, clip, tmp_path, where):
    out = tmp_path / f"interrupted_{where}.mp4"
    stats = StreamStats()
    eng = SlowEngine(engine, 0.0, fail_at=10) if where == "engine" else engine

    def on_result(r):
        if where == "consumer" and r.index == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        video.run_video(eng, clip, out, stats=stats, on_result=on_result)
    assert stats.frames_out > 0
    assert stats.frames_in == stats.frames_out + stats.dropped + stats.skipped + stats.unfinished
    times, _, _ = read_back(out)
    assert len(times) == stats.frames_out
    assert times == pytest.approx([i / 25 for i in range(stats.frames_out)])
    assert not list(tmp_path.glob(".*partial*"))  # the temporary file was moved into place


def test_sigint_to_a_running_process_finalises_the_file(clip, tmp_path):
    """A real Ctrl-C (SIGINT) to a process writing a video: the file still plays."""
    out = tmp_path / "sigint.mp4"
    script = textwrap.dedent(
        f"""
        import signal, sys, time, torch, segfast
        # a terminal's process: Python's Ctrl-C handler, even where the test runner
        # started us with SIGINT ignored (an ignored signal stays ignored across exec)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from segfast import models
        from segfast.runtime import postprocess, video
        net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
        eng = segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", output="mask")
        told = []
        class Slow:
            info, device = eng.info, eng.device
            def __call__(self, x):
                # after "running", slow enough that the signal lands mid-run on a
                # loaded machine (it interrupts the sleep: the test waits no longer)
                time.sleep(0.5 if told else 0.05)
                return eng(x)
        def tell(r):
            if r.index == 3:
                told.append(True)
                print("running", flush=True)
        try:
            video.run_video(Slow(), {str(clip)!r}, {str(out)!r}, on_result=tell)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout
    times, _, _ = read_back(out)
    assert 4 <= len(times) < N


def test_breaking_out_of_the_iterator_finalises_the_file(engine, clip, tmp_path):
    out = tmp_path / "early.mp4"
    with video.stream(engine, clip, writer=out) as s:
        for r in s:
            if r.index == 4:
                break
    assert len(read_back(out)[0]) == s.stats.frames_out >= 5


def test_a_loop_left_with_break_and_no_close_still_stops_and_finalises(engine, tmp_path):
    """No ``with``, no ``close()``: the stream the loop held is dropped at ``break``. Its
    threads used to run on for good, the camera generator stayed open and the video was
    left unfinalised (no file at its name)."""
    import gc
    import threading

    closed = []

    def camera():
        try:
            for i in range(1000):
                yield _frame(i % N)
        finally:
            closed.append(True)

    out = tmp_path / "dropped.mp4"

    def watch() -> None:
        for r in video.stream(engine, camera(), writer=out):
            if r.index == 6:
                break

    watch()
    gc.collect()
    assert closed == [True]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("segfast-")]
    assert len(read_back(out)[0]) >= 7


def test_a_bad_frame_from_a_frame_iterable_is_skipped(engine, tmp_path):
    """A later frame that is not H×W×3 uint8 (a camera SDK's RGBA, a float frame) is
    skipped and counted; the frames before it were lost with it (the stream aborted)."""

    def camera():
        for i in range(12):
            yield _frame(i)
        yield np.zeros((H, W, 4), np.uint8)
        yield _frame(0).astype(np.float32)
        for i in range(5):
            yield _frame(i)

    out = tmp_path / "skips.mp4"
    with video.stream(engine, camera(), writer=out) as s:
        indices = [r.index for r in s]
    assert indices == [*range(12), *range(14, 19)]
    assert (s.stats.frames_in, s.stats.frames_out, s.stats.skipped) == (19, 17, 2)
    assert "frame 12 must be H×W×3" in s.stats.skip_reasons[0]
    assert "frame 13 must be a uint8" in s.stats.skip_reasons[1]
    assert len(read_back(out)[0]) == 17


def test_flipped_frames_are_taken(engine):
    """``bgr[..., ::-1]`` and ``img[:, ::-1]`` are numpy views with negative strides,
    which torch.from_numpy refuses: they failed in the inference thread."""
    img = _frame(3)
    want = [r.mask for r in video.stream(engine, [np.ascontiguousarray(img[:, ::-1])])]
    got = [r.mask for r in video.stream(engine, [img[:, ::-1]])]
    np.testing.assert_array_equal(got[0], want[0])
    assert len(list(video.stream(engine, img[..., ::-1]))) == 1


def test_a_decode_stage_failure_comes_after_the_frames_before_it(engine, monkeypatch):
    from segfast.runtime import sources

    check = sources.check_frame

    def failing(img, i):
        if i == 7:
            raise RuntimeError("decoder bug")
        return check(img, i)

    monkeypatch.setattr(sources, "check_frame", failing)
    got: list[int] = []

    def consume() -> None:
        got.extend(r.index for r in video.stream(engine, (_frame(i) for i in range(20))))

    with pytest.raises(RuntimeError, match="decoder bug"):
        consume()
    assert got == list(range(7))


def test_dynamic_engine_runs_at_the_frame_size(net, clip):
    eng = segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", dynamic=True,
                          output="logits")  # fmt: skip
    with video.stream(eng, clip, output="overlay", realtime=False) as s:
        r = next(iter(s))
    x = preprocess_reference(torch.from_numpy(r.image), mean=(0,) * 3, std=(1,) * 3)
    np.testing.assert_array_equal(r.mask, net(x).argmax(1)[0].numpy().astype(np.uint8))


def test_bad_arguments_are_refused(engine, clip, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        video.stream(engine, tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="no images"):
        video.stream(engine, tmp_path)
    with pytest.raises(InputError, match="must end in one of"):
        video.VideoWriter(tmp_path / "x.gif")
    with pytest.raises(InputError, match="output must be"):
        video.stream(engine, clip, output="probs")
    with pytest.raises(InputError, match="static engine"):
        video.stream(engine, clip, size=(48, 64))
    with pytest.raises(InputError, match="has many frames"):
        video.stream(engine, clip, writer=tmp_path / "one.png")
    with pytest.raises(InputError, match="uint8"), video.stream(engine, [np.zeros((4, 4, 3))]) as s:
        list(s)
    fixed = segfast.compile(
        models.create("unet", tiny=True, in_channels=3, num_classes=3),
        input_shape=(2, 3, 32, 32), backend="eager", output="mask",
    )  # fmt: skip
    with pytest.raises(InputError, match="batch is fixed at 2"):
        video.stream(fixed, clip)


def test_postprocess_runs_on_the_full_size_mask(engine, clip):
    seen = []

    def post(m):
        seen.append(m.shape)
        return (m > 0).astype(np.uint8)

    with video.stream(engine, clip, postprocess=post) as s:
        results = list(s)
    assert seen == [(H, W)] * N
    assert all(set(np.unique(r.mask)) <= {0, 1} for r in results)


def test_foreground_postprocessing_gets_probabilities(clip):
    """postprocess_input='foreground': Otsu on the binary model's P(class 1) at frame size."""
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=2).eval()
    eng = segfast.compile(net, input_shape=(1, 3, 48, 64), backend="eager", output="probs")
    seen = []

    def otsu(p):
        seen.append(p)
        return postprocess.apply(p, ["otsu"])

    with video.stream(eng, clip, postprocess=otsu, postprocess_input="foreground") as s:
        results = list(s)
    assert len(results) == N
    for r, p in zip(results[:3], seen[:3], strict=True):
        x = preprocess_reference(torch.from_numpy(r.image), mean=(0,) * 3, std=(1,) * 3)
        np.testing.assert_allclose(p, torch.softmax(net(x), 1)[0, 1].detach().numpy(), atol=1e-5)
        np.testing.assert_array_equal(r.mask, postprocess.otsu_threshold(p)[1])
    mask_engine = segfast.compile(net, input_shape=(1, 3, 48, 64), backend="eager", output="mask")
    with pytest.raises(InputError, match="foreground probability of a binary model"):
        video.stream(mask_engine, clip, postprocess=otsu, postprocess_input="foreground")


@pytest.mark.gpu
def test_cuda_pipeline_matches_the_cpu_pipeline(net, clip):
    """Triton preprocess + overlay on CUDA vs the PyTorch references on the CPU."""
    cpu = segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", output="mask")
    gpu = segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", output="mask",
                          device="cuda")  # fmt: skip
    with video.stream(cpu, clip) as a, video.stream(gpu, clip) as b:
        ra, rb = list(a), list(b)
    assert len(ra) == len(rb) == N
    agree = np.mean([np.mean(x.mask == y.mask) for x, y in zip(ra, rb, strict=True)])
    assert agree > 0.995
    same = [x for x, y in zip(ra, rb, strict=True) if np.array_equal(x.mask, y.mask)]
    assert same, "no frame had identical masks"
    for x, y in zip(ra, rb, strict=True):
        if np.array_equal(x.mask, y.mask):
            np.testing.assert_array_equal(x.overlay, y.overlay)


# -- segfast run -------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    from segfast.commands import run as run_cmd

    parser = argparse.ArgumentParser(prog="segfast")
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd.register(sub)
    args = parser.parse_args(["run", *argv])
    args.debug = True
    return args.func(args)


@pytest.fixture(scope="module")
def engine_file(net, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engines") / "unet.segfast"
    segfast.compile(net, input_shape=(1, 3, 32, 32), backend="torch", output="mask").save(path)
    return path


def test_run_command_on_a_video_and_an_engine_file(engine_file, clip, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    rc = _run_cli(
        ["unet", "--tiny", "--classes", "3", "--in-channels", "3", "--backend", "eager",
         "--size", "32x32", "--input", str(clip), "--output", str(out), "--mask"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert f"frames: in {N}, out {N}, dropped 0, skipped 0" in text
    assert "end-to-end" in text
    assert len(read_back(out)[0]) == N

    rc = _run_cli([str(engine_file), "--input", str(clip), "--output", str(tmp_path / "frames")])
    assert rc == 0
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == N


def test_run_command_postprocessing_options(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(2):
        (src / f"im{i}.png").write_bytes(encode_png(_frame(5 * i)[..., ::-1].copy(), "rgb24"))
    rc = _run_cli(
        ["unet", "--tiny", "--classes", "2", "--in-channels", "3", "--backend", "eager",
         "--input", str(src), "--output", str(tmp_path / "masks"), "--mask", "--otsu",
         "--min-size", "4", "--fill-holes", "--keep-largest", "1",
         "--stats-json", str(tmp_path / "stats.json")]
    )  # fmt: skip
    assert rc == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["frames_in"], stats["frames_out"]) == (2, 2)
    for i in range(2):
        m = decode_image(tmp_path / "masks" / f"im{i}.png", "gray")
        assert set(np.unique(m)) <= {0, 1}
        # keep-largest 1 after Otsu: at most one foreground object.
        assert postprocess.connected_components(m)[1] <= 1
    assert "frames: in 2, out 2" in capsys.readouterr().out


def test_run_command_refuses_model_options_with_an_engine_file(engine_file, clip, tmp_path):
    with pytest.raises(InputError, match="engine file, built already: --tiny, --size"):
        _run_cli(
            [str(engine_file), "--tiny", "--size", "8x8", "--input", str(clip),
             "--output", str(tmp_path / "o")]
        )  # fmt: skip
    with pytest.raises(InputError, match="does not exist"):
        _run_cli([str(tmp_path / "missing.segfast"), "--input", str(clip), "--output", "o"])
