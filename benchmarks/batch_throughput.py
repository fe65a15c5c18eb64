"""`segfast batch` throughput with 1 and 2 actors, and actor memory against image size
(not in CI).

    python benchmarks/batch_throughput.py [--json benchmarks/results/batch-cpu.json]

Throughput: the demo nuclei U-Net (1 channel, 2 classes; ``torch`` backend, 256×256,
dynamic batch) over a generated archive — 48 PNGs (512×512), 2 videos (48 frames,
320×240) and a tiled 4096×4096 TIFF — on a local Ray instance, as (actors × CPUs each)
1×1, 1×2 and 2×1. Wall time includes starting the actors (each loads the engine).

Memory: a small 3-channel conv net over tiled RGB TIFFs of 4096² (48 MB of pixels) and
16384² (768 MB) with 2 actors: each actor's peak resident memory (``ru_maxrss``, which
includes PyTorch and the engine) and this driver's, which stitches the bands.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

import segfast
from segfast.runtime.writers import encode_png


def _nuclei(h: int, w: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    img = g.normal(40, 8, (h, w))
    y, x = np.mgrid[0:h, 0:w]
    for _ in range(h * w // 2500):
        cy, cx, r = g.integers(0, h), g.integers(0, w), g.integers(5, 14)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] += g.normal(120, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def archive(root: Path) -> Path:
    import av
    import tifffile

    d = root / "archive"
    d.mkdir(parents=True)
    for k in range(48):
        (d / f"img{k:02d}.png").write_bytes(encode_png(_nuclei(512, 512, k), "gray"))
    for v in range(2):
        with av.open(str(d / f"cam{v}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=Fraction(25))
            s.height, s.width, s.pix_fmt = 240, 320, "yuv420p"
            for k in range(48):
                g = _nuclei(240, 320, 1000 * v + k)
                f = av.VideoFrame.from_ndarray(np.repeat(g[..., None], 3, 2), "rgb24")
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode(None):
                c.mux(p)
    slide = np.tile(_nuclei(1024, 1024, 7), (4, 4))
    tifffile.imwrite(d / "slide.tif", slide, tile=(256, 256), compression="zlib")
    return d


def slide_rgb(path: Path, n: int) -> Path:
    import tifffile

    def tiles():
        for ty in range(0, n, 512):
            for tx in range(0, n, 512):
                y, x = np.mgrid[ty : ty + 512, tx : tx + 512]
                yield np.stack([(x // 3) % 256, (y // 5) % 256, ((x + y) // 7) % 256], -1).astype(
                    np.uint8
                )

    tifffile.imwrite(path, tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(512, 512),
                     compression="zlib", photometric="rgb")  # fmt: skip
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp one)")
    ap.add_argument("--part", choices=("all", "throughput", "memory"), default="all",
                    help="run one part; --json then updates that part of an existing file")  # fmt: skip
    args = ap.parse_args()
    import ray

    root = Path(args.keep or tempfile.mkdtemp(prefix="segfast-batch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    from segfast.demo import load_demo_model

    unet = segfast.compile(load_demo_model(), input_shape=(1, 1, 256, 256), backend="torch",
                           output="mask", dynamic=("batch",))  # fmt: skip
    unet_file = unet.save(root / "unet.segfast")
    data = archive(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict = {
        "device": f"CPU: {platform.processor() or platform.machine()}, 2 cores (local Ray)",
        "torch": torch.__version__, "ray": ray.__version__, "throughput": [], "memory": [],
    }  # fmt: skip
    for actors, cpus in ((1, 1), (1, 2), (2, 1)) if args.part != "memory" else ():
        out = root / f"out-{actors}x{cpus}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rep = segfast.batch(unet_file, data, out, actors=actors, cpus_per_actor=cpus,
                            overlap=64, batch=4)  # fmt: skip
        wall = time.perf_counter() - t0
        assert rep.failed == 0, rep.summary()
        row = {
            "actors": actors, "cpus_per_actor": cpus, "wall_s": round(wall, 2),
            "images": rep.images, "frames": rep.frames, "tiles": rep.tiles,
            "inputs_per_s": round(rep.done / wall, 2),
            "frames_per_s": round(rep.frames / wall, 2),
            "peak_actor_rss_mb": rep.peak_actor_rss_mb,
        }  # fmt: skip
        print(json.dumps(row))
        results["throughput"].append(row)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    small = segfast.compile(net, input_shape=(1, 3, 512, 512), backend="torch", output="mask",
                            dynamic=("batch",))  # fmt: skip
    small_file = small.save(root / "small.segfast")
    for n in (4096, 16384) if args.part != "throughput" else ():
        slide = slide_rgb(root / f"rgb{n}.tif", n)
        out = root / f"mem-{n}"
        shutil.rmtree(out, ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        rep = segfast.batch(small_file, slide, out, actors=2, overlap=64, batch=4)
        wall = time.perf_counter() - t0
        assert rep.failed == 0, rep.summary()
        row = {
            "image": f"{n}x{n}x3 uint8", "pixels_mb": round(n * n * 3 / 2**20),
            "tiles": rep.tiles, "wall_s": round(wall, 2),
            "peak_actor_rss_mb": rep.peak_actor_rss_mb,
            "driver_peak_rss_mb_before": round(before),
            "driver_peak_rss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }  # fmt: skip
        print(json.dumps(row))
        results["memory"].append(row)
        slide.unlink()
    ray.shutdown()
    if args.json:
        path = Path(args.json)
        if args.part != "all" and path.exists():  # keep the other part's measurements
            old = json.loads(path.read_text())
            keep = "memory" if args.part == "throughput" else "throughput"
            results[keep] = old.get(keep, [])
        path.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
