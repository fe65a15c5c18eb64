"""Train the demo nuclei U-Net on generated images, reproducibly, on the CPU.

    python -m segfast.demo.train [--out PATH] [--steps N] [--seed S] [--threads T]

Every training image is generated on the fly by :mod:`segfast.demo.synth`
(image ``i`` of step ``k`` from ``SeedSequence([seed, k, i])``), then augmented
so the model holds up on real images: scale jitter (0.7-1.4×, resampled with
antialiasing), flips and 90° rotations, the :func:`segfast.demo.normalize`
contract (skipped for 20 % of the images, so raw [0, 1] frames work too), gamma
(0.6-1.7), contrast and brightness jitter (now and then a raised background),
extra Gaussian noise and blur. The tile side varies per step (113-128 for the
default 128), so sizes the U-Net pads inside are trained on too.

The defaults (1800 steps of 8 tiles, U-Net base 12, depth 4, one thread) made
the committed ``segfast/demo/weights/nuclei_unet.safetensors`` in ~12 minutes on
a shared 2-core x86-64 CPU.

Loss: cross-entropy + soft Dice of the nucleus class. AdamW with a linear
warm-up and a cosine decay to zero. Then the model is evaluated on a held-out
generated set drawn from another seed, and the weights are written as fp32
safetensors with :func:`segfast.save_weights`, with a JSON card beside them
(architecture, preprocessing contract, training configuration, seeds, versions,
time, held-out Dice).

Reproducibility: torch and NumPy are seeded, ``torch.use_deterministic_algorithms``
is on and the thread count is fixed, so a rerun with the same arguments on the
same machine, torch and NumPy build gives bit-identical weights (the test suite
checks this on short runs; two full default runs here gave the same sha256).
Another CPU, thread count or torch version gives slightly different weights of
the same quality: floating-point reductions are ordered differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
import torch.nn.functional as F
from scipy import ndimage

from segfast import models
from segfast._io import atomic_path, sha256_file
from segfast.demo import CLASSES, DEMO_WEIGHTS, NORM_PERCENTILES, card_path, normalize
from segfast.demo.synth import DEFAULT_RADIUS, synth_batch, synth_image
from segfast.weights import save_weights


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (recorded in the card)."""

    steps: int = 1800
    batch: int = 8
    crop: int = 128  # training tile side (px): 113-128, drawn per step
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    dice_weight: float = 1.0  # loss = CE + dice_weight · (1 − soft Dice)
    seed: int = 0
    threads: int = (
        1  # one thread: the same result on any machine, and no OpenMP spinning on shared cores
    )
    base: int = 12  # U-Net width: 1.09 M parameters, 4.4 MB as fp32
    depth: int = 4
    scale_jitter: tuple[float, float] = (0.7, 1.4)
    eval_images: int = 32
    eval_size: int = 256
    eval_seed: int = 1_000_003  # held out: training seeds are SeedSequence([seed, step, i])

    @classmethod
    def tiny(cls, steps: int = 3) -> TrainConfig:
        """A seconds-long configuration for tests: a 2-level, width-4 U-Net on 32×32 tiles."""
        return cls(
            steps=steps, batch=2, crop=32, base=4, depth=2, warmup=1, eval_images=2, eval_size=32
        )

    def architecture(self) -> dict[str, Any]:
        return {
            "name": "unet",
            "in_channels": 1,
            "num_classes": 2,
            "base": self.base,
            "depth": self.depth,
        }


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a [H, W] float array to size×size (antialiased when shrinking)."""
    t = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]
    shrink = a.shape[0] > size
    out = F.interpolate(
        t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0, 0].numpy()


def make_sample(
    seed: np.random.SeedSequence, crop: int, scale_jitter: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training pair: image float32 [crop, crop], mask int64 [crop, crop]."""
    rng = np.random.default_rng(seed)
    zoom = math.exp(rng.uniform(math.log(scale_jitter[0]), math.log(scale_jitter[1])))
    gen = max(16, round(crop / zoom))  # generate larger (smaller nuclei) or smaller, then resize
    image, mask, _ = synth_image(gen, rng, radius=DEFAULT_RADIUS)
    if gen != crop:
        image = _resize(image, crop)
        mask = (_resize(mask.astype(np.float32), crop) > 0.5).astype(np.uint8)
    k = int(rng.integers(4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.2:
        image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.5))
    if rng.random() < 0.8:  # the inference contract; the rest stay raw [0, 1] frames
        image = normalize(image)
    image = np.clip(image, 0.0, 1.0) ** math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
    # Contrast and brightness; now and then a raised background (a dark halo or
    # lumen took the 1st percentile) with the nuclei brighter still.
    offset = rng.uniform(0.1, 0.45) if rng.random() < 0.15 else rng.uniform(-0.1, 0.1)
    image = image * rng.uniform(0.7, 1.3) + offset
    if rng.random() < 0.3:
        image = image + rng.normal(0.0, rng.uniform(0.0, 0.08), size=image.shape)
    return image.astype(np.float32), mask.astype(np.int64)


def make_batch(config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: images [B, 1, s, s] float32, masks [B, s, s] int64.

    The side ``s`` is ``crop`` minus 0-15 pixels, drawn per step, so the network
    also learns on sizes it must pad internally to a multiple of 16.
    """
    side = config.crop - int(np.random.default_rng([config.seed, step]).integers(16))
    pairs = [
        make_sample(np.random.SeedSequence([config.seed, step, i]), side, config.scale_jitter)
        for i in range(config.batch)
    ]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))
    return x, y


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice of class 1 over the batch; logits [B, 2, H, W], target [B, H, W]."""
    p = torch.softmax(logits, dim=1)[:, 1]
    t = target.float()
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + 1.0) / (p.sum() + t.sum() + 1.0)


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(global Dice over all pixels, mean per-image Dice) of binary [N, H, W] masks.

    An image whose prediction and truth are both empty scores 1.
    """
    p, t = pred.astype(bool), truth.astype(bool)
    inter = (p & t).sum(axis=(1, 2))
    total = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    per_image = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    global_dice = 2.0 * inter.sum() / max(int(total.sum()), 1) if total.sum() else 1.0
    return float(global_dice), float(per_image.mean())


def evaluate(
    model: torch.nn.Module, n: int, size: int, seed: int, batch: int = 8
) -> dict[str, Any]:
    """Dice of ``model`` on ``n`` generated size×size images from ``seed``, under the contract."""
    images, masks = synth_batch(n, size, seed)
    preds = np.empty_like(masks)
    model.eval()
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = torch.from_numpy(normalize(images[i : i + batch]))[:, None]
            preds[i : i + batch] = model(x).argmax(1).numpy()
    global_dice, mean_dice = dice_scores(preds, masks)
    return {
        "images": n,
        "size": size,
        "seed": seed,
        "dice": round(global_dice, 4),
        "dice_mean_per_image": round(mean_dice, 4),
    }


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(
    out: str | os.PathLike[str] = DEMO_WEIGHTS,
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, evaluate, and write ``out`` (safetensors) and its card; return the card."""
    config = config or TrainConfig()
    if config.steps < 1 or config.batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {config.steps}, {config.batch}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(Path(out), config, log)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)


def _train(out: Path, config: TrainConfig, log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    arch = config.architecture()
    model = models.create(**arch)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    log(
        f"training unet base={config.base} depth={config.depth} ({params / 1e6:.2f} M params) "
        f"for {config.steps} steps of {config.batch}×{config.crop}² on {config.threads} threads"
    )
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    every = max(1, min(100, config.steps // 10))
    for step in range(config.steps):
        x, y = make_batch(config, step)  # x: [B, 1, crop, crop], y: [B, crop, crop]
        logits = model(x)  # [B, 2, crop, crop]
        loss = F.cross_entropy(logits, y) + config.dice_weight * soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach().item()
        if (step + 1) % every == 0 or step + 1 == config.steps:
            n = (step % every) + 1
            log(
                f"step {step + 1:5d}/{config.steps}  loss {running / n:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:6.0f} s"
            )
            running = 0.0
    seconds = time.perf_counter() - t0
    log(f"trained in {seconds:.0f} s; evaluating on held-out images (seed {config.eval_seed})")
    held_out = evaluate(model, config.eval_images, config.eval_size, config.eval_seed)
    log(
        f"held-out Dice {held_out['dice']:.4f} (mean per image {held_out['dice_mean_per_image']:.4f})"
    )

    model.eval()
    # No extra metadata: safetensors writes its metadata map in hash order, so two
    # or more entries would make the file bytes (and the card's sha256) vary.
    save_weights(model, out)
    card = {
        "model": "segfast demo nuclei U-Net",
        "weights": out.name,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        "dtype": "float32",
        "parameters": params,
        "architecture": arch,
        "classes": list(CLASSES),
        "preprocessing": {
            "function": "segfast.demo.normalize",
            "percentiles": list(NORM_PERCENTILES),
            "input": "float32 [N, 1, H, W]: one grey-level image, bright nuclei on a darker "
            "background, per-image percentiles mapped to 0 and 1, clipped",
            "output": "logits [N, 2, H, W]; class 1 = nucleus",
        },
        "training": {
            "command": f"python -m segfast.demo.train --steps {config.steps} --seed {config.seed} "
            f"--threads {config.threads}",
            "config": dataclasses.asdict(config),
            "data": "segfast.demo.synth.synth_image, image i of step k from SeedSequence([seed, k, i])",
            "loss": "cross-entropy + dice_weight * (1 - soft Dice of class 1)",
            "optimizer": "AdamW, linear warm-up, cosine decay to 0",
            "seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "versions": {
                "torch": torch.__version__,
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "python": platform.python_version(),
            },
        },
        "held_out": held_out,
    }
    with atomic_path(card_path(out)) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {out} ({card['bytes'] / 1e6:.2f} MB) and {card_path(out).name}")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m segfast.demo.train", description=__doc__.split("\n\n")[0]
    )
    defaults = TrainConfig()
    p.add_argument(
        "--out", type=Path, default=DEMO_WEIGHTS, help=f"weights file (default {DEMO_WEIGHTS})"
    )
    p.add_argument("--steps", type=int, default=None, help=f"default {defaults.steps}")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch intra-op threads")
    p.add_argument("--tiny", action="store_true", help="the seconds-long test configuration")
    args = p.parse_args(argv)
    base = TrainConfig.tiny() if args.tiny else defaults
    steps = base.steps if args.steps is None else args.steps
    config = dataclasses.replace(base, steps=steps, seed=args.seed, threads=args.threads)
    train(args.out, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
