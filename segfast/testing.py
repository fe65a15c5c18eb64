"""Assertions and helpers for testing kernels, fused graphs and backends.

Public so that users testing their own models against segfast can use the
same checks as segfast's own suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from segfast.metrics import compare, mismatch_report

# fp32 kernels are held to rel ≤ 1e-4 (per element: atol/rtol below);
# fp16/bf16 are judged against PyTorch's own error in that dtype instead.
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with values no kernel produces (NaN; int max) and return it.

    Run before a kernel writes into ``t`` so elements it fails to write show up.
    """
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, *, atol: float = 1e-4, rtol: float = 1e-4
) -> None:
    """Elementwise closeness with a detailed report (count, where, NaN/Inf) on failure."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(o).all() or not torch.allclose(o, r, atol=atol, rtol=rtol):
        raise AssertionError(mismatch_report(out, ref, atol, rtol))


def assert_nhwc_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``out`` is channels_last, of ``ref``'s shape, and its largest absolute error is
    at most ``tol`` × max(1, max |ref|) (a CPU kernel against its reference)."""
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item() + 1e-12
    assert err <= tol * max(1.0, scale), (err, scale)


def assert_rel_l2(out: torch.Tensor, ref: torch.Tensor, max_rel: float) -> None:
    """‖out − ref‖ / ‖ref‖ ≤ ``max_rel`` and no NaN/Inf in ``out``."""
    acc = compare(out.float() if out.is_floating_point() else out, ref, class_dim=None)
    if acc.nonfinite or acc.rel_l2 > max_rel:
        raise AssertionError(
            f"rel-L2 {acc.rel_l2:.3g} > {max_rel:g} or non-finite ({acc.nonfinite})\n"
            + mismatch_report(out, ref, atol=0.0, rtol=max_rel)
        )


def assert_low_precision_close(
    out: torch.Tensor, ref_fp32: torch.Tensor, torch_lowp: torch.Tensor, factor: float = 2.0
) -> None:
    """A fp16/bf16 result is no worse than ``factor`` × PyTorch's own error in that dtype.

    ``ref_fp32`` is the fp32 (or fp64) reference; ``torch_lowp`` is what PyTorch
    computes for the same op in the low precision. Errors are rel-L2 against the
    reference; a small floor (fp32 epsilon) keeps an exact PyTorch result from
    demanding exactness.
    """
    ref = ref_fp32.double()
    err_kernel = compare(out.double(), ref, class_dim=None)
    err_torch = compare(torch_lowp.double(), ref, class_dim=None)
    bound = factor * max(err_torch.rel_l2, 1.2e-7)
    if err_kernel.nonfinite or err_kernel.rel_l2 > bound:
        raise AssertionError(
            f"{out.dtype} rel-L2 {err_kernel.rel_l2:.3g} exceeds {factor}× PyTorch's own "
            f"{err_torch.rel_l2:.3g} (bound {bound:.3g}); non-finite: {err_kernel.nonfinite}"
        )


def assert_no_worse_than(
    out: torch.Tensor,
    baseline: torch.Tensor,
    ref: torch.Tensor,
    *,
    factor: float = 1.2,
    floor: float = 1e-3,
    mask_slack: float = 0.01,
) -> None:
    """``out`` is about as close to ``ref`` as ``baseline`` is: rel-L2 at most ``factor`` ×
    the baseline's + ``floor``, and class masks (argmax over dim 1) agreeing with the
    reference's on at most ``mask_slack`` fewer pixels. For variants of an approximate
    engine (an int8 engine's float part in fp16 against it in fp32) that need not be
    close to each other, only to the model."""
    err_out = compare(out.float(), ref.float(), class_dim=None)
    err_base = compare(baseline.float(), ref.float(), class_dim=None)
    bound = factor * err_base.rel_l2 + floor
    if err_out.nonfinite or err_out.rel_l2 > bound:
        raise AssertionError(
            f"rel-L2 {err_out.rel_l2:.3g} to the reference exceeds {factor}× the baseline's "
            f"{err_base.rel_l2:.3g} + {floor:g}; non-finite: {err_out.nonfinite}"
        )
    r = ref.argmax(1)
    agree_out = float((out.argmax(1) == r).float().mean())
    agree_base = float((baseline.argmax(1) == r).float().mean())
    if agree_out < agree_base - mask_slack:
        raise AssertionError(
            f"masks agree with the reference on {agree_out:.2%} of pixels, the baseline's on "
            f"{agree_base:.2%} (slack {mask_slack:.0%})"
        )


def write_noise_video(
    path: str | os.PathLike[str], frames: int, hw: tuple[int, int], *, seed: int = 0,
    fps: int = 10,
) -> Path:  # fmt: skip
    """Write an H.264 video of ``frames`` uniform-noise RGB frames of ``hw`` (PyAV) —
    a test input for the video and batch runtimes. Returns the path."""
    from fractions import Fraction

    import av
    import numpy as np

    g = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.height, s.width, s.pix_fmt = *hw, "yuv420p"
        for _ in range(frames):
            img = g.integers(0, 256, (*hw, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, "rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return Path(path)


def randomised_bn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm running statistics (mean in
    [-0.3, 0.3], variance in [0.5, 2], from torch's global generator), so BN folding and
    every kernel after it see more than the identity a fresh BatchNorm computes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()
