"""`segfast serve` for real: the command started in a subprocess on a local Ray instance
(2 CPUs), real HTTP requests from concurrent clients, masks equal to the engine's,
batching under concurrency, bad requests answered with 4xx while the service goes on,
and a bounded load test with nothing lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from fractions import Fraction

import numpy as np
import pytest
import torch

import segfast
from segfast import models
from segfast.bench.http_load import http_load, post
from segfast.runtime import serving, video

pytest.importorskip("ray.serve")
av = pytest.importorskip("av")

pytestmark = pytest.mark.slow


def _encode_png(img: np.ndarray) -> bytes:
    fmt = "gray" if img.ndim == 2 else {3: "rgb24", 4: "rgba"}[img.shape[2]]
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = img.shape[1], img.shape[0], fmt, Fraction(1)
    f = av.VideoFrame.from_ndarray(img, format=fmt)
    return b"".join(bytes(p) for p in [*cc.encode(f), *cc.encode(None)])


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 3] = (200, 30, 30)
    img[h // 3 :, w // 2 :] = (20, 180, 60)
    return np.clip(img + g.integers(0, 60, img.shape), 0, 255).astype(np.uint8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# Session scope: pytest-xdist tears module fixtures down whenever a worker runs out of
# queued tests (the service was started up to twice per worker).
@pytest.fixture(scope="session")
def engine_file(tmp_path_factory):
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
    path = tmp_path_factory.mktemp("serve") / "unet.segfast"
    segfast.compile(net, input_shape=(1, 3, 48, 48), backend="torch", output="mask",
                    dynamic=("batch",)).save(path)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def service(engine_file, tmp_path_factory, at_module_end):
    """The service: `segfast serve` in its own process group (Ray's processes with it),
    stopped as soon as this module's last test is done (idle, it keeps ~0.3 of a core
    busy)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "segfast.cli", "serve", str(engine_file), "--port", str(port),
           "--num-cpus", "2", "--max-batch-size", "4", "--batch-wait-ms", "30",
           "--max-pixels", "20000"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    stopped = []

    def stop() -> None:
        if stopped:
            return
        stopped.append(True)
        proc.send_signal(signal.SIGINT)  # the command shuts Serve and Ray down
        with contextlib.suppress(subprocess.TimeoutExpired):
            # Serve shuts down in ~4 s on a quiet machine, a minute or more on 2 busy
            # cores: not waited for (it was 20 s of CI's time at the end of a worker).
            # Serve's actors run in process groups of their own; with Ray's daemons gone
            # they exit by themselves within seconds.
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of Ray's still there

    at_module_end(__file__, stop)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"segfast serve exited:\n{log.read_text()[-4000:]}")
            try:
                status, _body = _get(f"{url}/healthz")
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"segfast serve did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1.0)
        yield url
    finally:
        stop()


@pytest.fixture(scope="module")
def reference(engine_file):
    """What the engine itself says, through the same preprocessing (SegmentService) and
    through the video runtime."""
    eng = segfast.load(engine_file)
    svc = serving.SegmentService(eng)

    def masks(img_rgb: np.ndarray) -> np.ndarray:
        bgr = img_rgb[..., ::-1].copy()  # the service decodes to BGR, as the video runtime
        m = svc.segment([bgr])[0]
        np.testing.assert_array_equal(m, next(iter(video.stream(eng, bgr, output="mask"))).mask)
        return m

    return masks


def _mask_of_png(data: bytes) -> np.ndarray:
    return serving.decode_request(data, channels=1)[..., 0]


def test_healthz(service):
    status, body = _get(f"{service}/healthz")
    assert status == 200
    info = json.loads(body)
    assert info["status"] == "ok"
    assert info["input"] == "3×48×48"
    assert "batch-dynamic" in info["batching"]


def test_concurrent_requests_are_batched_and_equal_the_engine(service, reference):
    images = [_picture(40 + 7 * i, 50 + 5 * i, i) for i in range(8)]
    expected = [reference(img) for img in images]
    bodies = [_encode_png(img) for img in images]
    results: list = [None] * 16

    def client(k: int) -> None:
        results[k] = post(service, bodies[k % 8], query="format=json" if k % 2 else "")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches = []
    for k, (status, headers, data) in enumerate(results):
        assert status == 200, data
        batches.append(int(headers["x-segfast-batch"]))
        if k % 2:
            assert headers["content-type"] == "application/json"
            got = serving.decode_rle(json.loads(data))
        else:
            assert headers["content-type"] == "image/png"
            got = _mask_of_png(data)
        np.testing.assert_array_equal(got, expected[k % 8])
    assert max(batches) > 1, batches  # concurrency became batches
    assert max(batches) <= 4


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("empty", 400, "empty body"),
        ("junk", 415, "not an image"),
        ("big", 413, "over the limit"),
        ("rgba", 422, "4 channel"),
        ("gray", 422, "1 channel"),
        ("format", 400, "format must be"),
        ("get", 405, "POST"),
        ("path", 404, "no route"),
    ],
)
def test_bad_requests_get_4xx_and_the_service_goes_on(service, reference, kind, status, reason):
    good = _picture(30, 30, 99)
    if kind == "get":
        got, body = _get(f"{service}/segment")
    elif kind == "path":
        got, _, body = post(service, _encode_png(good), path="/nope")
    else:
        data = {
            "empty": b"",
            "junk": b"GIF89a but not really",
            "big": _encode_png(_picture(200, 200, 1)),  # 40 000 px > --max-pixels 20000
            "rgba": _encode_png(np.zeros((10, 10, 4), np.uint8)),
            "gray": _encode_png(np.zeros((10, 10), np.uint8)),
            "format": _encode_png(good),
        }[kind]
        got, _, body = post(service, data, query="format=xml" if kind == "format" else "")
    assert got == status, body
    text = body.decode()
    assert reason in text
    assert text.count("\n") <= 1  # one line
    ok, _, data = post(service, _encode_png(good))  # and the next good one still works
    assert ok == 200
    np.testing.assert_array_equal(_mask_of_png(data), reference(good))


def test_bounded_load_nothing_lost(service, reference):
    images = [_picture(48, 48, 200 + i) for i in range(4)]
    expected = [reference(img) for img in images]
    bodies = [_encode_png(img) for img in images]

    def check(i: int, data: bytes) -> str | None:
        same = np.array_equal(_mask_of_png(data), expected[i])
        return None if same else "mask differs from the engine's"

    report = http_load(service, bodies, clients=8, seconds=10.0, check=check)
    print(report.summary())
    assert report.sent == report.ok > 0, report.as_dict()
    assert report.failed == 0
    assert max(report.batches) > 1
    _status, body = _get(f"{service}/healthz")
    info = json.loads(body)
    assert sum(info["batches"].values()) > 0
