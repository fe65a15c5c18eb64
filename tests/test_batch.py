"""`segfast batch` for real on a local Ray instance (2 CPUs, 1–2 actors): a folder of
PNGs, videos, a 1024×1024 tiled TIFF and a .npy array segmented into outputs equal to
what `segfast run` and `segment_large` give; a corrupt file reported; a rerun that does
nothing; a worker killed mid-job with nothing lost or duplicated; a job interrupted
half-way, one of its outputs tampered with, and finished by a rerun of the command
(which redoes that one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import segfast
from segfast.runtime.batchjob import MANIFEST, SCRATCH
from segfast.runtime.tiling import tile_grid
from segfast.testing import write_noise_video

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
tifffile = pytest.importorskip("tifffile")
av = pytest.importorskip("av")

pytestmark = pytest.mark.slow

OVERLAP = 32
SLIDE = 1024  # the tiled TIFF's side: 11×11 tiles of 128² (the engine's), in bands


class CrashOnce:
    """Wraps an actor's engine; the call that finds no ``marker`` file creates it and
    kills the process (a worker dying mid-job, once across all actors)."""

    def __init__(self, marker: str, at_call: int) -> None:
        self.marker, self.at_call = marker, at_call

    def __call__(self, engine):
        marker, at_call = self.marker, self.at_call

        class Dying:
            info, device = engine.info, engine.device
            calls = 0

            def __call__(self, x):
                Dying.calls += 1
                if Dying.calls == at_call and not os.path.exists(marker):
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(1)
                return engine(x)

        return Dying()


# Session scope: pytest-xdist tears module fixtures down whenever a worker runs out of
# queued tests (Ray and the inputs were set up again). Ray itself stops with this
# module's last test: idle, it keeps ~0.1 of a core busy.
@pytest.fixture(scope="session")
def local_ray(at_module_end):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # CrashOnce, for the actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    at_module_end(__file__, ray.shutdown)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def engine_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    ).eval()  # fmt: skip
    e = segfast.compile(net, input_shape=(1, 3, 128, 128), backend="torch", output="mask",
                        dynamic=("batch",))  # fmt: skip
    return e.save(tmp_path_factory.mktemp("engine") / "net.segfast")


def _png(path: Path, img: np.ndarray) -> None:
    from segfast.runtime.writers import encode_png

    path.write_bytes(encode_png(img, "rgb24" if img.ndim == 3 else "gray"))


def _clip(path: Path, n: int, hw: tuple[int, int], seed: int) -> None:
    write_noise_video(path, n, hw, seed=seed)


def _slide(h: int, w: int) -> np.ndarray:
    """A compressible RGB 'slide': gradients, stripes and blobs."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x // 3) % 256, (y // 5) % 256, ((x + y) // 7) % 256], axis=-1)
    img[((x // 200 + y // 150) % 3 == 0)] //= 3
    return img.astype(np.uint8)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    g = np.random.default_rng(0)
    (d / "cams").mkdir()
    _png(d / "a.png", g.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    _png(d / "b.png", g.integers(0, 256, (77, 131, 3), dtype=np.uint8))  # odd size
    _png(d / "gray.png", g.integers(0, 256, (64, 64), dtype=np.uint8))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    _clip(d / "cams" / "c1.mp4", 9, (64, 96), seed=1)
    _clip(d / "cams" / "c2.mp4", 5, (48, 80), seed=2)
    tifffile.imwrite(d / "slide.tif", _slide(SLIDE, SLIDE), tile=(256, 256), compression="zlib")
    np.save(d / "plate.npy", g.integers(0, 65536, (700, 901), dtype=np.uint16))
    (d / "readme.txt").write_text("not an input")
    return d


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def _debris(out: Path) -> list[str]:
    found = []
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if rel.parts[0] == SCRATCH:
            continue
        if any(part.startswith(".") for part in rel.parts):
            found.append(str(rel))
    return found


def _check_outputs(out: Path, inputs: Path, engine_file: Path, names: list[str]) -> None:
    """Each named input's output equals `segfast run` / `segment_large` on it."""
    eng = segfast.load(engine_file)
    ref = out.parent / f"{out.name}-reference"
    ref.mkdir(exist_ok=True)
    for name in names:
        src = inputs / name
        if name.endswith(".png"):
            segfast.run_video(eng, str(src), ref / name, output="mask")
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
        elif name.endswith(".mp4"):
            stem = name[: -len(".mp4")]
            segfast.run_video(eng, str(src), ref / stem, output="mask")
            want = sorted((ref / stem).iterdir())
            got = sorted((out / stem).iterdir())
            assert [p.name for p in got] == [p.name for p in want], name
            assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, want, strict=True))
        else:
            stem = name.rsplit(".", 1)[0]
            image = tifffile.imread(src) if name.endswith(".tif") else np.load(src, mmap_mode="r")
            want = eng.segment_large(image, blend="crop", overlap=OVERLAP)
            np.testing.assert_array_equal(tifffile.imread(out / f"{stem}.mask.tif"), want)


ALL = ["a.png", "b.png", "gray.png", "cams/c1.mp4", "cams/c2.mp4", "slide.tif", "plate.npy"]


def test_batch_outputs_equal_run_and_segment_large_and_a_rerun_does_nothing(
    local_ray, inputs, engine_file, tmp_path
):
    out = tmp_path / "out"
    report = segfast.batch(engine_file, inputs, out, actors=2, overlap=OVERLAP,
                           video_output="png")  # fmt: skip
    assert (report.done, report.failed, report.ignored_files) == (7, 1, 1), report.summary()
    assert report.actors == 2
    assert report.large == 2
    assert report.videos == 2
    assert report.frames == 9 + 5 + 3
    grid = tile_grid(segfast.load(engine_file), SLIDE, SLIDE, overlap=OVERLAP)
    tiles = grid.rows * grid.cols
    assert grid.rows > 8
    assert report.tiles > tiles
    assert report.peak_actor_rss_mb > 0
    recs = {r["name"]: r for r in _records(out)}
    assert len(recs) == 8
    assert len(_records(out)) == 8
    assert recs["corrupt.png"]["status"] == "failed"
    assert recs["corrupt.png"]["error"]
    assert recs["slide.tif"]["bands"] > 2
    assert recs["slide.tif"]["tiles"] == tiles
    for name in ALL:
        assert recs[name]["status"] == "done", recs[name]
        assert recs[name]["sha256"]
        assert recs[name]["bytes"] > 0
    _check_outputs(out, inputs, engine_file, ALL)
    assert not _debris(out)
    assert sorted(p.name for p in (out / SCRATCH).iterdir()) == ["lock"]  # bands cleaned up

    def stamps() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and SCRATCH not in p.parts}  # fmt: skip

    before = stamps()
    again = segfast.batch(engine_file, inputs, out, actors=2, overlap=OVERLAP,
                          video_output="png")  # fmt: skip
    assert (again.done, again.failed, again.skipped, again.failed_before) == (0, 0, 7, 1)
    assert again.units == 0
    assert again.actors == 0  # nothing to do: no actor loads an engine
    assert len(_records(out)) == 8
    assert stamps() == before  # nothing rewritten
    # (a finished output changed behind the job's back: the interrupted job's test)


def test_a_worker_killed_mid_job_loses_and_duplicates_nothing(
    local_ray, inputs, engine_file, tmp_path
):
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    names = ["a.png", "b.png", "cams/c1.mp4", "plate.npy"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(inputs / n) for n in names))
    # one actor (each costs a Python with torch and an engine; on CI's two cores they are
    # most of this module's time): it dies, Ray starts another, the unit runs again there
    report = segfast.batch(
        engine_file, listing, out, actors=1, overlap=OVERLAP, band_rows=1,
        wrap_engine=CrashOnce(str(marker), at_call=4),
    )  # fmt: skip
    assert marker.exists()  # a worker did die
    assert report.workers_replaced >= 1, report.summary()
    assert (report.done, report.failed) == (4, 0), report.summary()
    recs = _records(out)
    assert sorted(r["name"] for r in recs) == sorted(names)  # each exactly once
    assert all(r["status"] == "done" for r in recs)
    assert not _debris(out)
    assert (out / "cams" / "c1.mkv").stat().st_size > 0  # a mask video by default
    _check_outputs(out, inputs, engine_file, ["a.png", "b.png", "plate.npy"])


def test_an_interrupted_job_keeps_whole_outputs_and_the_command_finishes_it(
    local_ray, inputs, engine_file, tmp_path
):
    from segfast.cli import main

    out = tmp_path / "out"
    seen: list[dict] = []

    def stop_after_two(rec: dict) -> None:
        seen.append(rec)
        if len(seen) == 2:
            raise KeyboardInterrupt

    names = [n for n in ALL if n != "slide.tif"] + ["corrupt.png"]  # the slide: test one
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(str(inputs / n) for n in names))
    report = segfast.batch(engine_file, listing, out, actors=1, overlap=OVERLAP,
                           video_output="png", on_record=stop_after_two)  # fmt: skip
    assert report.interrupted
    recs = _records(out)
    assert len(recs) == 2
    assert recs == seen
    assert not _debris(out)
    for r in recs:
        if r["status"] == "done":
            assert (out / r["output"]).exists()
    # a finished output changed behind the job's back is redone, and only that one
    tampered = next(r for r in recs if r["status"] == "done")
    (out / tampered["output"]).write_bytes(b"tampered")

    argv = ["batch", str(engine_file), "--input", str(listing), "--output", str(out),
            "--actors", "1", "--overlap", str(OVERLAP), "--video-output", "png",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 1  # the corrupt PNG fails; everything else is done
    latest = {}
    for r in _records(out):
        latest[r["name"]] = r
    assert sorted(latest) == sorted(names)
    done_lines = [r["name"] for r in _records(out) if r["status"] == "done"]
    # nothing done twice but the tampered output
    assert sorted(done_lines) == sorted([*names[:-1], tampered["name"]])
    _check_outputs(out, inputs, engine_file,
                   sorted({"b.png", "cams/c2.mp4", "plate.npy", tampered["name"]}))  # fmt: skip
    assert not _debris(out)
    assert len(_records(out)) == len(names) + 1  # each once, the tampered output twice
    assert main(argv) == 1
    assert len(_records(out)) == len(names) + 1  # nothing left to do: nothing recorded


def test_bad_arguments_are_refused_before_anything_runs(inputs, engine_file, tmp_path, capsys):
    from segfast.cli import main

    out = tmp_path / "out"
    base = ["batch", str(engine_file), "--input", str(inputs), "--output", str(out)]
    assert main([*base, "--batch", "0"]) == 2
    assert main(["batch", str(tmp_path / "none.segfast"), "--input", str(inputs),
                 "--output", str(out)]) == 2  # fmt: skip
    assert main([*base[:3], str(tmp_path / "nowhere"), *base[4:]]) == 2
    assert main([*base, "--blend", "gaussian"]) == 2  # a mask engine cannot blend
    (tmp_path / "empty").mkdir()  # refused before a model is compiled (no engine written)
    assert main(["batch", "unet", "--tiny", "--input", str(tmp_path / "empty"),
                 "--output", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "holds no images" in err
    assert "--batch must be ≥ 1" in err
    assert "does not exist" in err
    assert "gaussian" in err
    assert not out.exists() or not any(p.is_file() and p.name != "lock" for p in out.rglob("*"))
    (tmp_path / "in.png").write_bytes(b"x")
    with pytest.raises(segfast.InputError, match="is a file"):
        segfast.batch(engine_file, inputs, tmp_path / "in.png")
