"""The parts of `segfast batch` that need no Ray: region reads of TIFFs (tiled, striped,
pyramidal, sparse, truncated), bands of tile rows equal to the whole-image result,
band stitching into a tiled TIFF, input discovery and output names, the manifest
(torn lines), resume checks, debris removal, and the worker against `segfast run`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import segfast
from segfast import InputError
from segfast.runtime import batchjob
from segfast.runtime.batchjob import (
    BatchWorker,
    Item,
    Manifest,
    WorkerOptions,
    assemble_bands,
    band_plan,
    discover,
    output_digest,
    remove_debris,
    still_done,
)
from segfast.runtime.largeimage import TiffRegionReader, open_large, write_tiled_tiff
from segfast.runtime.tiling import segment_large, tile_grid
from segfast.testing import write_noise_video

tifffile = pytest.importorskip("tifffile")
av = pytest.importorskip("av")


def convnet(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, classes, 3, padding=1)
    ).eval()


@pytest.fixture(scope="module")
def engine():
    return segfast.compile(
        convnet(), input_shape=(1, 3, 40, 40), backend="eager", output="mask",
        dynamic=("batch",),
    )  # fmt: skip


def picture(h: int, w: int, c: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    g = np.random.default_rng(seed)
    hi = 256 if dtype == np.uint8 else 65536
    shape = (h, w, c) if c else (h, w)
    return g.integers(0, hi, shape).astype(dtype)


def write_png(path: Path, img: np.ndarray) -> Path:
    from segfast.runtime.writers import encode_png

    path.write_bytes(encode_png(img, "rgb24"))
    return path


def write_clip(path: Path, n: int = 6, hw=(48, 64), seed: int = 0) -> Path:
    return write_noise_video(path, n, hw, seed=seed)


# -- region reads -------------------------------------------------------------------------
LAYOUTS = {
    "tiled-deflate": {"tile": (64, 48), "compression": "zlib"},
    "tiled-raw": {"tile": (32, 32)},
    "striped": {"rowsperstrip": 7},
    "one-strip": {},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("channels", "dtype"), [(3, np.uint8), (0, np.uint16), (4, np.uint8)])
def test_region_reads_equal_the_whole_image(tmp_path, layout, channels, dtype):
    img = picture(131, 97, channels, seed=1, dtype=dtype)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, img, **LAYOUTS[layout])
    with TiffRegionReader(path, cache_bytes=4096) as r:  # a tiny cache: evictions happen
        assert r.shape == img.shape
        assert r.dtype == img.dtype
        g = np.random.default_rng(2)
        for _ in range(25):
            y0, x0 = int(g.integers(0, 130)), int(g.integers(0, 96))
            y1, x1 = int(g.integers(y0 + 1, 132)), int(g.integers(x0 + 1, 98))
            np.testing.assert_array_equal(r.read(y0, y1, x0, x1), img[y0:y1, x0:x1])
        with pytest.raises(InputError, match="outside"):
            r.read(0, 132, 0, 10)


def test_pyramidal_tiff_reads_level_zero(tmp_path):
    img = picture(300, 260, 3, seed=3)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), subifds=2, compression="zlib")
        tw.write(img[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
        tw.write(img[::4, ::4], tile=(64, 64), subfiletype=1, compression="zlib")
    with open_large(path) as r:
        assert r.shape == img.shape
        np.testing.assert_array_equal(r.read(0, 300, 0, 260), img)


def _read_all(path: Path) -> np.ndarray:
    with TiffRegionReader(path) as r:
        return r.read(0, r.shape[0], 0, r.shape[1])


def test_reader_refuses_stacks_truncation_and_garbage(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, picture(5, 40, 30, seed=0), photometric="minisblack")
    with pytest.raises(InputError, match="pages"):
        TiffRegionReader(stack)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, picture(3, 40, 30), photometric="rgb", planarconfig="separate")
    with pytest.raises(InputError, match="planar"):
        TiffRegionReader(planar)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, picture(256, 256, 3), tile=(64, 64))
    cut = tmp_path / "cut.tif"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"truncated|not a readable"):
        _read_all(cut)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(InputError, match=r"not a readable TIFF|holds no image"):
        TiffRegionReader(junk)
    with pytest.raises(InputError, match=r"\.npy"):
        open_large(tmp_path / "x.png")


def test_segment_large_reads_a_tiff_tile_by_tile(tmp_path, engine):
    img = picture(211, 173, 3, seed=4)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, tile=(32, 32), compression="zlib")
    whole = segment_large(engine, img, blend="crop", overlap=8)
    with TiffRegionReader(path, cache_bytes=1 << 20) as r:
        got = segment_large(engine, r, blend="crop", overlap=8)
        decoded = r.segments_decoded
    np.testing.assert_array_equal(got, whole)
    # each 32×32 segment is decoded a few times at most (overlapping tiles, small cache)
    assert decoded <= 4 * 7 * 6, decoded


# -- bands ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w", "band_rows"), [(211, 173, 1), (211, 173, 2), (64, 300, 3)])
def test_bands_of_tile_rows_stack_into_the_whole_result(engine, h, w, band_rows):
    img = picture(h, w, 3, seed=5)
    whole = segment_large(engine, img, blend="crop", overlap=8, batch=3)
    grid = tile_grid(engine, h, w, overlap=8)
    parts = []
    for i0, i1 in band_plan(grid.rows, band_rows):
        band = segment_large(engine, img, blend="crop", overlap=8, batch=3, tile_rows=(i0, i1))
        assert band.shape == (min(i1 * grid.sy, h) - i0 * grid.sy, w)
        parts.append(band)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_bands_refuse_gaussian_and_bad_rows(engine):
    img = picture(100, 100, 3)
    with pytest.raises(InputError, match="crop"):
        segment_large(engine, img, blend="gaussian", tile_rows=(0, 1))
    with pytest.raises(InputError, match="tile_rows"):
        segment_large(engine, img, blend="crop", overlap=8, tile_rows=(2, 99))
    with pytest.raises(InputError, match="band_rows"):
        band_plan(5, 0)


def test_bands_stitch_into_a_tiled_tiff(tmp_path):
    mask = picture(600, 530, 0, seed=6) % 5
    files = []
    for k, (y0, y1) in enumerate([(0, 100), (100, 333), (333, 600)]):
        f = tmp_path / f"b{k}.npy"
        np.save(f, mask[y0:y1])
        files.append((y0, f))
    target = tmp_path / "m.tif"
    assemble_bands(target, files, 600, 530)
    np.testing.assert_array_equal(tifffile.imread(target), mask)
    with tifffile.TiffFile(target) as tf:
        assert tf.pages[0].is_tiled
        assert tf.pages[0].compression == 8
    with pytest.raises(InputError, match="cover"):
        assemble_bands(tmp_path / "n.tif", files[:2], 600, 530)
    assert not (tmp_path / "n.tif").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_write_tiled_tiff_checks_rows(tmp_path):
    with pytest.raises(InputError, match="rows"):
        write_tiled_tiff(
            tmp_path / "x.tif", lambda a, b: np.zeros((1, 1), np.uint8), 10, 10, "uint8"
        )
    assert not list(tmp_path.iterdir())


# -- discovery, names -------------------------------------------------------------------------
def test_discovery_of_folders_globs_and_list_files(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ["a.png", "b.jpg", "sub/c.png", "v.mp4", "big.tif", "arr.npy", "notes.txt",
                ".hidden/x.png", "sub/a.png"]:  # fmt: skip
        (d / rel).write_bytes(b"x")
    items, ignored = discover([d])
    assert ignored == 1  # notes.txt
    names = {it.name: it.output for it in items}
    assert names == {
        "a.png": "a.png", "arr.npy": "arr.mask.tif", "b.jpg": "b.png", "big.tif": "big.mask.tif",
        "sub/a.png": "sub/a.png", "sub/c.png": "sub/c.png", "v.mp4": "v.mkv",
    }  # fmt: skip
    assert {it.kind for it in items} == {"image", "video", "large"}
    # the job's output folder inside an input folder holds no inputs
    (d / "masks").mkdir()
    (d / "masks" / "a.png").write_bytes(b"x")
    items, _ = discover([d], exclude=d / "masks")
    assert "masks/a.png" not in {it.name for it in items}
    items, _ = discover([str(d / "**" / "*.png")], exclude=d / "masks")
    assert "masks/a.png" not in {it.name for it in items}
    (d / "masks" / "a.png").unlink()
    # video as PNG frames: a folder
    items, _ = discover([d], video_output="png")
    assert {it.name: it.output for it in items}["v.mp4"] == "v"
    # a glob, and a file named twice (once by the glob, once by path) counts once
    items, _ = discover([str(d / "**" / "*.png"), d / "a.png"])
    assert sorted(it.name for it in items) == ["a.png", "sub/a.png", "sub/c.png"]
    # a list file: relative lines, comments; missing and unsupported entries are kept
    lst = tmp_path / "list.txt"
    lst.write_text("# inputs\nin/a.png\n\nin/missing.png\nin/notes.txt\n")
    items, _ = discover([lst])
    probs = {Path(it.path).name: it.problem for it in items}
    assert probs["a.png"] is None
    assert probs["missing.png"] == "does not exist"
    assert "unsupported" in probs["notes.txt"]


def test_clashing_outputs_keep_their_suffix_and_bad_inputs_are_refused(tmp_path):
    for n in ["x.png", "x.jpg", "y.png"]:
        (tmp_path / n).write_bytes(b"x")
    items, _ = discover([tmp_path])
    assert sorted(it.output for it in items) == ["x.jpg.png", "x.png.png", "y.png"]
    with pytest.raises(InputError, match="does not exist"):
        discover([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        discover([tmp_path / "empty"])
    with pytest.raises(InputError, match="matches no"):
        discover([str(tmp_path / "*.webm")])
    with pytest.raises(InputError, match="video_output"):
        discover([tmp_path], video_output="avi")


# -- manifest, resume, debris ---------------------------------------------------------------
def test_manifest_survives_a_torn_line(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append({"input": "a", "status": "done"})
    with open(m.path, "ab") as fh:
        fh.write(b'{"input": "b", "sta')  # a crash mid-write
    m.append({"input": "c", "status": "failed"})
    recs = m.records()
    assert [r["input"] for r in recs] == ["a", "c"]
    assert m.bad_lines == 1
    m.append({"input": "a", "status": "failed"})
    assert m.latest()["a"]["status"] == "failed"
    for line in m.path.read_text().splitlines()[2:]:
        json.loads(line)  # every line after the torn one is whole


def test_still_done_checks_output_and_input(tmp_path):
    src = write_png(tmp_path / "a.png", picture(20, 20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"mask")
    item = Item(0, str(src), "a.png", "image", "a.png")
    size, digest = output_digest(out / "a.png")
    rec = {"status": "done", "output": "a.png", "bytes": size, "sha256": digest,
           **batchjob.input_stamp(src)}  # fmt: skip
    assert still_done(rec, out, item, "digest")
    (out / "a.png").write_bytes(b"MASK")  # same size, other bytes
    assert still_done(rec, out, item, "size")
    assert not still_done(rec, out, item, "digest")
    (out / "a.png").write_bytes(b"mask")
    os.utime(src, ns=(1, 1))  # the input changed
    assert not still_done(rec, out, item, "digest")


def test_folder_digest_covers_names_and_contents(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    (d / "f0.png").write_bytes(b"a")
    (d / "f1.png").write_bytes(b"b")
    one = output_digest(d)
    (d / "f1.png").rename(d / "f2.png")
    assert output_digest(d) != one
    assert output_digest(d)[0] == one[0] == 2


def test_remove_debris_takes_only_staging_and_temporary_names(tmp_path):
    keep = ["a.png", ".config", "v.mkv", ".x.partial.txt"]
    junk = [".a.png.tmp-123", ".v.mkv.segfast-staging.mkv", "..v.segfast-staging.partial-77.mkv",
            ".v.partial-12.mkv"]  # fmt: skip
    for n in keep + junk:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / ".frames.segfast-staging").mkdir()
    assert remove_debris([tmp_path]) == len(junk) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# -- the worker, without Ray -----------------------------------------------------------------
def _run_mask(engine, src: Path, dst: Path) -> None:
    segfast.run_video(engine, str(src), dst, output="mask")


def test_worker_outputs_equal_segfast_run(tmp_path, engine):
    imgs = [write_png(tmp_path / f"i{k}.png", picture(30 + 7 * k, 50 - 3 * k, seed=k))
            for k in range(3)]  # fmt: skip
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    clip = write_clip(tmp_path / "c.mp4")
    out = tmp_path / "out"
    w = BatchWorker(engine, WorkerOptions(batch=3))
    res = w.run({"unit": 0, "kind": "images", "items": [0, 1, 2, 3],
                 "paths": [str(p) for p in [*imgs, bad]],
                 "outputs": [str(out / f"i{k}.png") for k in range(4)]})  # fmt: skip
    assert [r["status"] for r in res] == ["done", "done", "done", "failed"]
    assert res[3]["error"]
    assert not (out / "i3.png").exists()
    for k, src in enumerate(imgs):
        _run_mask(engine, src, tmp_path / f"ref{k}.png")
        assert (out / f"i{k}.png").read_bytes() == (tmp_path / f"ref{k}.png").read_bytes()
        assert res[k]["sha256"] == output_digest(out / f"i{k}.png")[1]
    r = w.run({"unit": 1, "kind": "video", "item": 4, "path": str(clip),
               "output": str(out / "c")})[0]  # fmt: skip
    assert r["status"] == "done"
    assert r["frames"] == 6
    _run_mask(engine, clip, tmp_path / "ref_frames")
    ref = sorted((tmp_path / "ref_frames").iterdir())
    got = sorted((out / "c").iterdir())
    assert [p.name for p in got] == [p.name for p in ref]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, ref, strict=True))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_worker_reports_a_corrupt_video_and_leaves_nothing(tmp_path, engine):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    w = BatchWorker(engine, WorkerOptions())
    r = w.run({"unit": 0, "kind": "video", "item": 0, "path": str(bad),
               "output": str(tmp_path / "o" / "bad.mkv")})[0]  # fmt: skip
    assert r["status"] == "failed"
    assert r["error"]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_worker_retries_an_item_that_raises_once(tmp_path, engine):
    class Flaky:
        def __init__(self, e):
            self.e, self.info, self.device, self.calls = e, e.info, e.device, 0

        def __call__(self, x):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("transient")
            return self.e(x)

    src = write_png(tmp_path / "a.png", picture(30, 30))
    w = BatchWorker(Flaky(engine), WorkerOptions(retries=1))
    r = w.run({"unit": 0, "kind": "images", "items": [0], "paths": [str(src)],
               "outputs": [str(tmp_path / "o.png")]})[0]  # fmt: skip
    assert r["status"] == "done"
    assert r["attempts"] == 2
