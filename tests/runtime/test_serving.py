"""The HTTP service's request decoding, response encoding and batched segmentation
(segfast.runtime.serving), without a server."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

import segfast
from segfast import models
from segfast.runtime import serving, video
from segfast.runtime.serving import BadRequest, SegmentService, decode_request

av = pytest.importorskip("av")


def encode(img: np.ndarray, codec: str = "png", pix: str | None = None) -> bytes:
    """Image bytes of an H×W (gray) or H×W×C array: PNG (gray, rgb24, rgba), TIFF, JPEG."""
    arr_fmt = "gray" if img.ndim == 2 else {3: "rgb24", 4: "rgba"}[img.shape[2]]
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height = img.shape[1], img.shape[0]
    cc.pix_fmt = pix or arr_fmt
    cc.time_base = Fraction(1, 1)
    f = av.VideoFrame.from_ndarray(img, format=arr_fmt)
    if cc.pix_fmt != arr_fmt:
        f = f.reformat(format=cc.pix_fmt)
    return b"".join(bytes(p) for p in [*cc.encode(f), *cc.encode(None)])


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 3] = (200, 30, 30)
    img[h // 3 :, w // 2 :] = (20, 180, 60)
    return np.clip(img + g.integers(0, 40, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
    return segfast.compile(net, input_shape=(1, 3, 32, 32), backend="eager", output="mask",
                           dynamic=("batch",))  # fmt: skip


def test_images_decode_to_the_frame_the_video_runtime_reads():
    rgb = picture(20, 30)
    for codec in ("png", "tiff", "bmp"):
        pix = "bgr24" if codec == "bmp" else None
        got = decode_request(encode(rgb, codec, pix), channels=3, order="rgb")
        np.testing.assert_array_equal(got, rgb)
    for codec, pix in (("mjpeg", "yuvj444p"), ("libwebp", "yuv420p")):
        lossy = decode_request(encode(rgb, codec, pix), channels=3, order="rgb")
        assert lossy.shape == rgb.shape
        assert np.abs(lossy.astype(int) - rgb).mean() < 12, codec
    bgr = decode_request(encode(rgb), channels=3, order="bgr")
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])
    gray = decode_request(encode(rgb[..., 0].copy()), channels=1)
    np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, axis=2))


@pytest.mark.parametrize(
    ("body", "kw", "status", "match"),
    [
        (b"", {}, 400, "empty body"),
        (b"hello, not an image", {}, 415, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, {}, 415, "image"),  # a PNG header, no picture
        ("big", {"max_pixels": 100}, 413, "over the limit"),
        ("rgba", {}, 422, "4 channel"),
        ("gray", {}, 422, "1 channel"),
    ],
)
def test_bad_requests_get_their_status_and_a_reason(body, kw, status, match):
    if body == "big":
        body = encode(picture(20, 30))
    elif body == "rgba":
        body = encode(np.zeros((8, 8, 4), np.uint8))
    elif body == "gray":
        body = encode(np.zeros((8, 8), np.uint8))
    with pytest.raises(BadRequest, match=match) as e:
        decode_request(body, channels=3, **kw)
    assert e.value.status == status
    assert "\n" not in e.value.reason


def test_rle_and_json_round_trip():
    g = np.random.default_rng(0)
    mask = (g.random((13, 17)) * 3).astype(np.uint8)
    mask[4:9] = 1
    data, ctype = serving.encode_mask(mask, "json")
    assert ctype == "application/json"
    d = json.loads(data)
    np.testing.assert_array_equal(serving.decode_rle(d), mask)
    assert sum(n for _, n in d["runs"]) == mask.size
    assert d["areas"] == {str(c): int((mask == c).sum()) for c in np.unique(mask)}
    png, ctype = serving.encode_mask(mask, "png")
    assert ctype == "image/png"
    back = decode_request(png, channels=1)[..., 0]
    np.testing.assert_array_equal(back, mask)
    wide = np.full((3, 4), 300, np.int32)  # above 255 classes: 16-bit PNG
    png16, _ = serving.encode_mask(wide, "png")
    with av.open(__import__("io").BytesIO(png16)) as c:
        f = next(c.decode(video=0))
        assert f.format.name.startswith("gray16")
        assert int(f.to_ndarray().max()) == 300
    with pytest.raises(BadRequest, match="format"):
        serving.encode_mask(mask, "xml")


def test_a_batch_equals_each_image_alone_and_the_video_runtime(engine):
    svc = SegmentService(engine, max_batch=4)
    frames = [picture(20 + 3 * i, 30 + 5 * i, seed=i)[..., ::-1].copy() for i in range(5)]
    masks = svc.segment(frames)
    assert svc.runner.calls == {4: 1, 1: 1}  # batches of up to 4
    for f, m in zip(frames, masks, strict=True):
        assert m.shape == f.shape[:2]
        np.testing.assert_array_equal(m, svc.segment([f])[0])
        ref = next(iter(video.stream(engine, f, output="mask")))  # frames are BGR there too
        np.testing.assert_array_equal(m, ref.mask)
    info = svc.info()
    assert info.input == "3×32×32"
    assert "batch-dynamic" in info.batching


def test_an_image_the_engine_refuses_fails_alone(monkeypatch):
    """One image the engine cannot take, batched with good ones, used to fail every
    request of its batch (500 each); it is refused at decode (422) when its size is out
    of the engine's range, and a batch failing anyway runs again frame by frame."""
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
    eng = segfast.compile(net, input_shape=(1, 3, 32, 32), backend="torch", output="mask",
                          dynamic=True)  # fmt: skip
    svc = SegmentService(eng, max_batch=4)
    lo = svc.io.height_range[0]
    with pytest.raises(BadRequest, match="the image size is") as info:
        svc.decode(encode(picture(lo - 1, 40)))
    assert info.value.status == 422
    good = [picture(32 + 4 * i, 40, seed=i) for i in range(3)]
    assert svc.decode(encode(good[0])).shape == good[0].shape
    # an image that passes the range check and fails in the engine (a guard, say)
    real = svc.runner.run

    def refusing(xs, convert):
        if any(x.shape[-1] == 44 for x in xs):
            raise segfast.InputError("input 1×3×36×44 is outside the shapes …")
        return real(xs, convert)

    monkeypatch.setattr(svc.runner, "run", refusing)
    bad = picture(36, 44, seed=9)
    out = svc.segment([good[0], bad, good[1], good[2]])
    assert isinstance(out[1], BadRequest)
    assert out[1].status == 422
    for f, m in zip(good, [out[0], out[2], out[3]], strict=True):
        np.testing.assert_array_equal(m, svc.segment([f])[0])
    with pytest.raises(segfast.InputError):
        svc.segment([bad])
