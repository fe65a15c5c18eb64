"""``python -m segfast.demo`` (``make demo``): segfast end to end on this machine.

1. loads the committed nuclei U-Net (trained here on generated images);
2. compiles it with the best backend available here (``auto``: measured, checked);
3. writes a generated fluorescence-microscopy video and segments it through the
   threaded video pipeline in real-time mode (late frames are dropped and counted),
   writing an overlay video;
4. segments real microscopy images shipped in scikit-image's wheel with the
   overlap-tile strategy and writes overlay PNGs;
5. prints the latency table: segfast's engine against eager PyTorch, same inputs.

Everything goes to ``out/`` (``--out``). ``--tiny`` runs a seconds-long version
(the test-suite's smoke test).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import segfast
from segfast.demo import load_demo_model, normalize


def _write_video(frames: np.ndarray, path: Path, fps: int = 25) -> None:
    """Grey uint8 frames [T, H, W] → an H.264 (or MPEG-4) file, as a camera would give."""
    import av

    with av.open(str(path), "w") as container:
        try:
            st = container.add_stream("libx264", rate=fps)
            st.options = {"crf": "18", "preset": "veryfast"}
        except (av.error.FFmpegError, ValueError):  # a build without libx264
            st = container.add_stream("mpeg4", rate=fps)
        st.height, st.width = frames.shape[1:3]
        st.pix_fmt = "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, axis=2), "bgr24")
            for packet in st.encode(frame):
                container.mux(packet)
        for packet in st.encode():
            container.mux(packet)


def _overlay_png(image: np.ndarray, mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    from segfast.kernels.overlay import overlay_reference

    grey = np.clip(normalize(image) * 255, 0, 255).astype(np.uint8)
    rgb = torch.from_numpy(np.repeat(grey[..., None], 3, axis=2))
    palette = torch.tensor([[0, 0, 0], [255, 210, 40]], dtype=torch.uint8)
    out = overlay_reference(rgb, torch.from_numpy(mask.astype(np.int64)), palette, alpha=0.45)
    Image.fromarray(out.numpy()).save(path)


def _real_images(tiny: bool) -> list[tuple[str, np.ndarray]]:
    """Real microscopy from scikit-image's wheel (offline), at the model's nucleus scale."""
    from skimage import color, data, transform

    ihc = color.rgb2hed(data.immunohistochemistry())[..., 0]  # hematoxylin: nuclei
    cell = transform.rescale(data.cell().astype(np.float32), 0.5, anti_aliasing=True)
    images = [("ihc_nuclei", ihc.astype(np.float32)), ("cell", cell.astype(np.float32))]
    if tiny:
        images = [(n, im[:96, :128]) for n, im in images[:1]]
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="segfast demo: video + tiled images + latency")
    ap.add_argument("--out", default="out")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (smoke test)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.size = 6, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    print("1. the demo model: nuclei U-Net trained on generated microscopy")
    model = load_demo_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"   {n_params:,} parameters (segfast/demo/weights/nuclei_unet.safetensors)")

    print(f"2. compiling for 1×1×{args.size}×{args.size} (backend {args.backend})")
    example = torch.rand(1, 1, args.size, args.size)
    options = {"iters": 2} if args.backend == "auto" and args.tiny else None
    engine = segfast.compile(model, example, backend=args.backend, output="mask", options=options)
    print("   " + engine.summary().replace("\n", "\n   "))

    print(f"3. video: {args.frames} generated frames, real-time mode")
    from segfast.demo.synth import synth_video, to_uint8

    clip = synth_video(args.frames, args.size, seed=0)
    src = out / "microscopy.mp4"
    _write_video(to_uint8(clip.frames), src)
    # The generated frames are already in [0, 1] scale: ÷255 is the model's contract here.
    stats = segfast.run_video(engine, src, out / "microscopy_overlay.mp4", realtime=True,
                              output="overlay")  # fmt: skip
    print("   " + stats.report().replace("\n", "\n   "))
    print(f"   wrote {out / 'microscopy_overlay.mp4'}")

    print("4. real microscopy images (scikit-image), overlap-tile inference")
    tile_engine = segfast.compile(model, example, backend=engine.backend, output="logits")
    for name, image in _real_images(args.tiny):
        x = normalize(image)  # per-image percentiles, the model's input contract
        t0 = time.perf_counter()
        mask = tile_engine.segment_large(x, overlap=min(64, args.size // 4), blend="gaussian")
        ms = 1e3 * (time.perf_counter() - t0)
        path = out / f"{name}_overlay.png"
        _overlay_png(image, mask, path)
        print(f"   {name}: {image.shape[0]}×{image.shape[1]}, {100 * mask.mean():.1f}% nuclei, "
              f"{ms:.0f} ms → {path}")  # fmt: skip

    print("5. latency: segfast vs eager PyTorch (same inputs, accuracy checked)")
    from segfast.bench.report import print_table
    from segfast.bench.runner import run_benchmark

    sets = [(torch.rand(1, 1, args.size, args.size),) for _ in range(3)]
    backends = ["eager"] + ([engine.backend] if engine.backend != "eager" else [])
    res = run_benchmark(
        model, sets, name="nuclei_unet", backends=backends, output="mask",
        warmup=2 if args.tiny else 5, iters=3 if args.tiny else 30,
    )  # fmt: skip
    print_table(res)
    print(f"done in {time.perf_counter() - t_start:.0f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
