"""Squeeze-excitation and GroupNorm/InstanceNorm fusions (issue 17): each pattern
fires, the fused graph equals the eager model on random inputs on the ``torch``
backend and on the ``triton`` backend (interpreter), and the Triton engine keeps
nothing on PyTorch.

torchvision and segmentation_models_pytorch do not install in CI, so the networks
are segfast's own stand-ins (``segfast.models.edge``: torchvision's LR-ASPP and
DeepLabV3 MobileNetV3-Large, smp's U-Net EfficientNet-B0 layouts, an smp-style FPN
with GroupNorm) and single blocks written here (MobileNetV3's bneck with SE and
hardswish, EfficientNet's MBConv with SiLU and SE).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.models import edge
from segfast.testing import assert_rel_l2


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
        if isinstance(m, nn.GroupNorm | nn.InstanceNorm2d) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


# What the Triton engine may leave on PyTorch: none of the ops issue 17 names
# (hardswish, hardsigmoid, the SE multiply, GroupNorm). The FPN's final sum of its four
# branches (Python's sum, 0 + s0 + … + s3, or smp's stack(...).sum(0)) leaves nothing
# either: the + 0 is dropped and the upsampled branches' stores add the running sum.
_NAMED = ("hardswish", "hardsigmoid", "mul", "sigmoid", "mean", "group_norm", "batch_norm")


def _check(
    model: nn.Module, x: torch.Tensor, backend: str, kept: dict[str, int] | None = None,
    **fired: int,
) -> segfast.Engine:  # fmt: skip
    model = _randomise_bn(model)
    eng = segfast.compile(model, x, backend=backend)
    for name, n in fired.items():
        assert eng.info.fusions.get(name, 0) == n, (name, eng.info.fusions)
    with torch.no_grad():
        ref = model(x)
    assert_rel_l2(eng(x), ref, 1e-4)
    if backend == "triton":
        left = eng._runner.details["kept"]
        assert left == (kept or {}), left
        assert not [k for k in left if any(n in k for n in _NAMED)], left
    return eng


class BneckV3(nn.Module):
    """torchvision's MobileNetV3 bneck: hardswish, SE with adaptive pool, ReLU, hardsigmoid."""

    def __init__(self, c: int = 16, exp: int = 40, se: int = 16) -> None:
        super().__init__()
        self.block = edge.Bneck(c, 5, exp, c, se, "HS", 1)

    def forward(self, x):
        return self.block(x)


class MBConv(nn.Module):
    """EfficientNet's MBConv: SiLU, SE with x.mean, SiLU, sigmoid; stride 2, no residual."""

    def __init__(self) -> None:
        super().__init__()
        self.block = edge.Bneck(12, 3, 48, 20, 3, "SI", 2, gate="sigmoid", se_act="SI", mean=True)

    def forward(self, x):
        return self.block(x)


class Swish(nn.Module):  # timm's Swish (smp's timm-efficientnet encoders)
    def forward(self, x):
        return x * torch.sigmoid(x)


class HSigmoid(nn.Module):  # MobileNetV3 code written before nn.Hardsigmoid
    def forward(self, x):
        return F.relu6(x + 3) / 6


class HSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3) / 6


def _written_out(model: nn.Module) -> nn.Module:
    """``model`` with its SiLU / hardswish / hardsigmoid modules written out."""
    swap = {nn.SiLU: Swish, nn.Hardswish: HSwish, nn.Hardsigmoid: HSigmoid}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in swap:
                setattr(parent, name, swap[type(child)]())
    return model


class GatedThroughResize(nn.Module):
    """LR-ASPP's head: branch · sigmoid(conv(pool(other))) → bilinear → 1×1 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 16, 1, bias=False), nn.Sigmoid()
        )
        self.cls = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = self.cbr(x) * self.scale(x)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return self.cls(y)


class GateFeedsAdd(nn.Module):
    """An SE whose product is read by an add, not a conv: the gate fuses, the multiply stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.se = edge.SqueezeExcitation(8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.se(y) + y


class NormBlock(nn.Module):
    def __init__(self, kind: str, act: nn.Module | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 16, 3, padding=1, bias=False)
        self.norm = {
            "group": nn.GroupNorm(4, 16),
            "group1": nn.GroupNorm(1, 16, affine=False),
            "instance": nn.InstanceNorm2d(16, affine=True),
            "instance_plain": nn.InstanceNorm2d(16),
        }[kind]
        self.act = act if act is not None else nn.Identity()
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.out(self.act(self.norm(self.conv(x))))


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bneck_hardswish_se(backend):
    x = torch.randn(2, 16, 11, 13)
    _check(BneckV3(), x, backend, squeeze_excite=1, se_scale=1, conv_residual=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mbconv_silu_se(backend):
    x = torch.randn(1, 12, 15, 9)
    _check(MBConv(), x, backend, squeeze_excite=1, se_scale=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", ["bneck_v3", "mbconv"])
def test_written_out_activations_fuse_like_the_modules(block, backend):
    """The same blocks with x·sigmoid(x), relu6(x + 3)/6 and x·relu6(x + 3)/6 written
    out: the activations are recognised, so SE and the conv epilogues fuse as before."""
    model, x = {
        "bneck_v3": (BneckV3, torch.randn(2, 16, 11, 13)),
        "mbconv": (MBConv, torch.randn(1, 12, 15, 9)),
    }[block]
    _check(_written_out(model()), x, backend, squeeze_excite=1, se_scale=1, written_activation=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_moves_through_resize(backend):
    x = torch.randn(2, 24, 7, 5)
    _check(GatedThroughResize(), x, backend, squeeze_excite=1, se_scale=1)


def test_gate_without_a_conv_reader_keeps_the_multiply():
    x = torch.randn(1, 8, 6, 7)
    eng = _check(GateFeedsAdd(), x, "torch", squeeze_excite=1)
    assert "se_scale" not in eng.info.fusions


@pytest.mark.parametrize(
    ("kind", "act", "fusion"),
    [
        ("group", nn.ReLU(), "group_norm"),
        ("group1", nn.SiLU(), "group_norm"),
        ("instance", nn.Hardswish(), "instance_norm"),
        ("instance_plain", None, "instance_norm"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_act(kind, act, fusion, backend):
    x = torch.randn(2, 6, 9, 10) * 2 + 1
    fired = {fusion: 1, "norm_act": 1 if act is not None else 0}
    _check(NormBlock(kind, act), x, backend, **fired)


@pytest.mark.parametrize("kind", ["instance", "instance_plain"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_fuses_with_dynamic_shapes(kind, backend):
    """Export writes InstanceNorm with symbolic N·C and repeat counts when the batch is
    dynamic: it still fuses, and the engine matches eager at other batches and sizes."""
    model = _randomise_bn(NormBlock(kind, nn.ReLU()))
    eng = segfast.compile(model, torch.randn(2, 6, 9, 10), backend=backend,
                          dynamic=["batch", "height", "width"])  # fmt: skip
    assert eng.info.fusions.get("instance_norm") == 1, eng.info.fusions
    assert eng.info.fusions.get("norm_act") == 1
    for shape in [(3, 6, 9, 10), (1, 6, 7, 12)]:
        x = torch.randn(shape) * 2 + 1
        with torch.no_grad():
            ref = model(x)
        assert_rel_l2(eng(x), ref, 1e-4)


def test_group_norm_large_mean_is_exact_on_triton():
    """A large mean beside a small spread: the Triton statistics (Chan's update) hold
    rel-L2 1e-4 against a float64 GroupNorm where E[x²] − E[x]² would not."""
    model = _randomise_bn(NormBlock("group", nn.ReLU()))
    x = torch.randn(1, 6, 12, 12) * 0.05 + 30.0
    eng = segfast.compile(model, x, backend="triton")
    y = eng(x)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    assert_rel_l2(y.double(), ref, 1e-4)


TINY = {
    "lraspp": (lambda: edge.lraspp_mobilenet_v3_large(5, width=0.25), (1, 3, 19, 23),
               {}, {"squeeze_excite": 9, "se_scale": 9}),
    # ASPP's image-pooling branch becomes a per-image residual of the projection
    # (broadcast_branch): a zero-copy ``expand`` view of a [N, C, 1, 1] vector stays.
    "deeplabv3": (lambda: edge.deeplabv3_mobilenet_v3_large(5, width=0.25, aspp=16,
                                                          rates=(2, 3, 4)),
                  (1, 3, 17, 21), {"expand": 1},
                  {"squeeze_excite": 8, "se_scale": 8, "broadcast_branch": 1}),
    "unet_b0": (lambda: edge.unet_efficientnet_b0(2, width=0.25, depth=0.34,
                                                  decoder=(8, 8, 8, 8, 8)),
                (1, 3, 32, 32), {}, {"squeeze_excite": 7, "se_scale": 7}),
    "fpn_gn": (lambda: edge.fpn_groupnorm(3, pyramid=8, seg=8, groups=4), (1, 3, 32, 64),
               {}, {"group_norm": 7, "norm_act": 7}),
    "fpn_gn_stack": (lambda: edge.fpn_groupnorm(3, pyramid=8, seg=8, groups=4, merge="stack"),
                     (1, 3, 32, 64), {}, {"group_norm": 7, "norm_act": 7, "stack_sum": 1}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_edge_networks(name, backend):
    factory, shape, kept, fired = TINY[name]
    torch.manual_seed(0)
    eng = _check(factory(), torch.randn(shape), backend, kept, **fired)
    if backend == "triton":
        lowered = eng._runner.details["lowered"]
        assert lowered.get("se_gate", 0) == fired.get("squeeze_excite", 0)
        assert lowered.get("group_norm", 0) == fired.get("group_norm", 0)
        # every gate, GroupNorm and global pool (DeepLab's ASPP) here reads a conv's
        # output: each takes the channel statistics that conv's epilogue wrote instead
        # of reading the map again
        reducers = sum(lowered.get(k, 0) for k in ("se_gate", "group_norm", "global_avg_pool2d"))
        assert lowered.get("channel_stats_from_conv", 0) == reducers, lowered
        if name.startswith("fpn"):  # three of the four levels end in an upsample
            assert lowered.get("resize + add") == 3, lowered
