"""Each fusion pass: the pattern fires (recorded in the engine summary) and the
fused graph computes what the original did, on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.testing import assert_close


def _compile(model: nn.Module, x: torch.Tensor, **kw) -> segfast.Engine:
    return segfast.compile(model.eval(), x, backend="torch", **kw)


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding is really exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _same(engine: segfast.Engine, model: nn.Module, *xs: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model(*xs)
    assert_close(engine(*xs), ref, atol=1e-5, rtol=1e-4)


class ConvBN(nn.Module):
    def __init__(self, transposed: bool = False, bias: bool = False, groups: int = 1):
        super().__init__()
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        kw = {"stride": 2} if transposed else {"padding": 1}
        self.conv = cls(4, 6, 3, bias=bias, groups=groups, **kw)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("transposed", "bias", "groups"),
    [(False, False, 1), (False, True, 1), (True, False, 1), (True, True, 2), (False, True, 2)],
)
def test_bn_fold(transposed, bias, groups):
    model = _randomise_bn(ConvBN(transposed, bias, groups)).eval()
    x = torch.randn(2, 4, 9, 11)
    eng = _compile(model, x)
    assert eng.info.fusions["bn_fold"] == 1
    assert eng.info.fusions["conv_transpose" if transposed else "conv"] == 1
    _same(eng, model, x)


ACTS = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "silu": nn.SiLU(),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
    "hardswish": nn.Hardswish(),  # MobileNetV3
    "hardsigmoid": nn.Hardsigmoid(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "clamp06": None,
}


@pytest.mark.parametrize("act", list(ACTS))
def test_activation_fuses(act):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.act = ACTS[act]

        def forward(self, x):
            y = self.conv(x)
            return torch.clamp(y, 0, 6) if self.act is None else self.act(y)

    x = torch.randn(1, 3, 7, 9) * 3
    model = M().eval()
    eng = _compile(model, x)
    assert eng.info.fusions["conv_act"] == 1
    _same(eng, model, x)


# Activations written out in elementary ops (timm's Swish, pre-1.6 MobileNetV3 code):
# each becomes the ATen op (written_activation) and then fuses into the conv (conv_act).
WRITTEN = {
    "swish": lambda y: y * torch.sigmoid(y),
    "swish_rev_inplace": lambda y: y.sigmoid().mul(y),
    "h_sigmoid": lambda y: F.relu6(y + 3) / 6,
    "h_sigmoid_clamp_mul": lambda y: torch.clamp(3 + y, 0, 6) * (1 / 6),
    "h_swish": lambda y: y * F.relu6(y + 3) / 6,
    "h_swish_of_h_sigmoid": lambda y: y * (F.relu6(y + 3.0) / 6.0),
    "x_hardsigmoid": lambda y: F.hardsigmoid(y) * y,
}
# Near misses that must stay as written (different operands or constants, a broadcast).
NOT_WRITTEN = {
    "other_sigmoid": lambda y: y * torch.sigmoid(y + 1),
    "relu6_plus2": lambda y: F.relu6(y + 2) / 6,
    "over5": lambda y: F.relu6(y + 3) / 5,
    "clamp_07": lambda y: torch.clamp(y + 3, 0, 7) / 6,
    "gate_broadcast": lambda y: y * torch.sigmoid(y.mean((2, 3), keepdim=True)),
}


class _Written(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("form", list(WRITTEN))
def test_written_activation_fuses(form):
    x = torch.randn(1, 3, 7, 9) * 3
    model = _Written(WRITTEN[form]).eval()
    eng = _compile(model, x)
    assert eng.info.fusions["written_activation"] == 1
    assert eng.info.fusions["conv_act"] == 1
    _same(eng, model, x)
    left = [n.target for n in eng._runner.details["graph"].graph.nodes if n.op == "call_function"]
    assert not [t for t in left if "mul" in str(t) or "div" in str(t) or "sigmoid" in str(t)]


@pytest.mark.parametrize("form", list(NOT_WRITTEN))
def test_near_miss_activation_stays_written(form):
    x = torch.randn(1, 3, 7, 9) * 3
    model = _Written(NOT_WRITTEN[form]).eval()
    eng = _compile(model, x)
    assert "written_activation" not in eng.info.fusions
    _same(eng, model, x)


class _PadConv(nn.Module):
    def __init__(self, pads, value=0.0, padding=0, also_read=False, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.pads, self.value, self.also_read = pads, value, also_read

    def forward(self, x):
        p = F.pad(x, self.pads, value=self.value)
        y = self.conv(p)
        if self.also_read:  # the padded tensor is also read by a slice
            return y + p[:, :1, 1:-1, 1:-1]
        return y + self.conv2(p)[..., : y.shape[2], : y.shape[3]] if self.pads == (2,) * 4 else y


@pytest.mark.parametrize(
    ("case", "folds"),
    [
        (dict(pads=(1, 1, 1, 1)), 1),  # Conv2dStaticSamePadding, stride 1
        (dict(pads=(2, 2, 1, 1), padding=1, stride=2), 1),  # on top of the conv's padding
        (dict(pads=(2, 2, 2, 2)), 2),  # two convs read it
        (dict(pads=(0, 1, 0, 1), stride=2), 0),  # asymmetric: "same" at stride 2
        (dict(pads=(1, 1, 1, 1), value=0.5), 0),  # not a zero border
        (dict(pads=(-1, -1, -1, -1)), 0),  # a crop
        (dict(pads=(1, 1, 1, 1), also_read=True), 0),
    ],
    ids=["same-s1", "plus-padding-s2", "two-convs", "asymmetric", "value", "crop", "also-read"],
)
def test_zero_pad_moves_into_the_conv(case, folds):
    x = torch.randn(2, 3, 10, 9)
    model = _PadConv(**case).eval()
    eng = _compile(model, x)
    assert eng.info.fusions.get("pad_into_conv", 0) == folds
    _same(eng, model, x)


class _EmptyPart(nn.Module):
    """smp's U-Net on a mit_b* encoder: a 0-channel placeholder feature joined to the
    decoder's upsample (``where`` first or last; ``alone``: the placeholder and one real
    part, so the cat is that part; ``three``: two real parts remain)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.down = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv = nn.Conv2d(8 + (4 if where == "three" else 0), 5, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        up = F.interpolate(self.down(x), scale_factor=2.0, mode="nearest")
        empty = torch.empty(x.shape[0], 0, x.shape[2], x.shape[3], dtype=x.dtype)
        parts = {"first": [empty, up], "last": [up, empty],
                 "three": [up, empty, self.side(x)]}[self.where]  # fmt: skip
        return self.conv(torch.cat(parts, 1))


@pytest.mark.parametrize("where", ["first", "last", "three"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_concat_parts_are_dropped(where, backend):
    torch.manual_seed(3)
    model = _EmptyPart(where).eval()
    x = torch.randn(2, 3, 12, 18)
    eng = segfast.compile(model, x, backend=backend)
    assert eng.info.fusions.get("empty_concat_part", 0) == 1
    _same(eng, model, x)
    _same(eng, model, torch.randn(2, 3, 12, 18))


def test_empty_concat_parts_that_decide_the_dtype_or_are_inputs_stay():
    """cat promotes across every part, empty ones too: an fp32 placeholder joined to
    fp16 features makes fp32, so it stays. A 0-channel graph input is not dropped
    from the engine's inputs."""

    class Promotes(nn.Module):
        def forward(self, x):
            h = x.half()
            return torch.cat([h, torch.empty(x.shape[0], 0, *x.shape[2:])], 1) * 2

    x = torch.randn(1, 3, 4, 5)
    eng = segfast.compile(Promotes().eval(), x, backend="torch")
    assert eng.info.fusions.get("empty_concat_part", 0) == 0
    y = eng(x)
    assert y.dtype == torch.float32
    assert_close(y, Promotes()(x))

    class EmptyInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, extra):
            return self.conv(torch.cat([x, extra], 1))

    model = EmptyInput().eval()
    extra = torch.randn(1, 0, 6, 7)
    x = torch.randn(1, 3, 6, 7)
    eng = segfast.compile(model, (x, extra), backend="torch")
    assert eng.info.fusions.get("empty_concat_part", 0) == 1
    _same(eng, model, x, extra)


def test_unfusable_activation_stays_separate():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x):
            return F.hardtanh(self.conv(x), -2.0, 2.0)  # not ReLU6: no fused form

    x = torch.randn(1, 3, 7, 9) * 3
    model = M().eval()
    eng = _compile(model, x)
    assert "conv_act" not in eng.info.fusions
    _same(eng, model, x)


class Residual(nn.Module):
    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        skip = self.b(x)
        if self.order == "add_then_relu":  # ResNet: relu(conv + skip)
            return F.relu(self.a(x) + skip)
        if self.order == "relu_then_add":
            return skip + F.relu(self.a(x))
        return self.a(x) + x  # plain add (MobileNetV2)


@pytest.mark.parametrize("order", ["add_then_relu", "relu_then_add", "add"])
def test_residual_fuses(order):
    model = Residual(order).eval()
    x = torch.randn(2, 4, 8, 6)
    eng = _compile(model, x)
    assert eng.info.fusions["conv_residual"] >= 1
    if order != "add":
        assert eng.info.fusions["conv_act"] >= 1
    _same(eng, model, x)


def test_broadcast_add_is_not_a_residual():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.bias

    model = M().eval()
    x = torch.randn(1, 3, 5, 5)
    eng = _compile(model, x)
    assert "conv_residual" not in eng.info.fusions
    _same(eng, model, x)


class Decoder(nn.Module):
    """cat([skip, up(x)]) → conv, the U-Net decoder step, in every form."""

    def __init__(self, mode: str | None, align: bool | None, first: bool, scale: bool):
        super().__init__()
        self.mode, self.align, self.first, self.scale = mode, align, first, scale
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 6, 2, stride=2)
        self.dec = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        low = F.relu(self.down(skip))
        if self.mode is None:
            up = self.up(low)
        elif self.scale:
            up = F.interpolate(low, scale_factor=2, mode=self.mode, align_corners=self.align)
        else:
            up = F.interpolate(low, size=skip.shape[-2:], mode=self.mode, align_corners=self.align)
        parts = [up, skip] if self.first else [skip, up]
        return self.dec(torch.cat(parts, dim=1))


@pytest.mark.parametrize(
    ("mode", "align", "first", "scale"),
    [
        (None, None, False, False),
        ("bilinear", False, False, True),
        ("bilinear", True, False, False),
        ("bilinear", False, True, False),
        ("nearest", None, False, True),
        ("nearest", None, True, False),
    ],
)
def test_skip_concat(mode, align, first, scale):
    model = Decoder(mode, align, first, scale).eval()
    x = torch.randn(2, 3, 12, 16)
    eng = _compile(model, x)
    fired = "skip_concat" if mode is None else "skip_concat_resize"
    assert eng.info.fusions[fired] == 1
    _same(eng, model, x)


def test_skip_concat_odd_size_resize():
    """A non-×2 resize to the skip's size (DeepLab v3+ decoder) still fuses exactly."""
    model = Decoder("bilinear", False, True, False).eval()
    x = torch.randn(1, 3, 13, 17)  # low is 7×9, resized to 13×17
    eng = _compile(model, x)
    assert eng.info.fusions["skip_concat_resize"] == 1
    _same(eng, model, x)


def test_concat_with_other_readers_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(3, 2, 1)
            self.c = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            cat = torch.cat([self.a(x), self.b(x)], 1)
            return self.c(cat) + cat.sum(1, keepdim=True)

    model = M().eval()
    x = torch.randn(1, 3, 5, 5)
    eng = _compile(model, x)
    assert "skip_concat" not in eng.info.fusions
    _same(eng, model, x)


class SeparableAfterConcat(nn.Module):
    """cat([up(low), skip]) → depthwise 3×3 → pointwise 1×1: DeepLab v3+'s decoder."""

    def __init__(
        self, three_parts: bool = False, dw_bias: bool = False, extra_reader: bool = False
    ):
        super().__init__()
        self.three, self.extra = three_parts, extra_reader
        self.enc = nn.Conv2d(3, 5, 3, padding=1)
        self.down = nn.Conv2d(5, 7, 3, stride=2, padding=1)
        c = 5 + 7 + (3 if three_parts else 0)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=dw_bias)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 6, 1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        low = F.relu(self.down(skip))
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        parts = [up, skip] + ([x] if self.three else [])
        cat = torch.cat(parts, 1)
        y = self.pw(F.relu(self.bn(self.dw(cat))))
        return y + cat.mean() if self.extra else y


@pytest.mark.parametrize("dw_bias", [False, True])
def test_concat_moves_past_depthwise_into_a_prologue(dw_bias):
    model = _randomise_bn(SeparableAfterConcat(dw_bias=dw_bias)).eval()
    x = torch.randn(2, 3, 13, 18)
    eng = _compile(model, x)
    assert eng.info.fusions["concat_depthwise"] == 1
    assert eng.info.fusions["skip_concat"] == 1  # the pointwise conv reads both halves
    gm = eng._runner.details["graph"]
    assert not any(n.target is torch.ops.aten.cat.default for n in gm.graph.nodes)
    _same(eng, model, x)


def test_concat_past_depthwise_with_three_parts():
    """Three parts: the concat moves past the depthwise conv and stays (no
    two-source prologue for three sources); still exact."""
    model = _randomise_bn(SeparableAfterConcat(three_parts=True)).eval()
    x = torch.randn(1, 3, 10, 12)
    eng = _compile(model, x)
    assert eng.info.fusions["concat_depthwise"] == 1
    assert "skip_concat" not in eng.info.fusions
    _same(eng, model, x)


def test_concat_read_by_more_than_the_depthwise_conv_stays():
    model = _randomise_bn(SeparableAfterConcat(extra_reader=True)).eval()
    x = torch.randn(1, 3, 10, 12)
    eng = _compile(model, x)
    assert "concat_depthwise" not in eng.info.fusions
    _same(eng, model, x)


class PoolingBranch(nn.Module):
    """ASPP in miniature: a 1×1 branch, an image-pooling branch upsampled back,
    concatenated, then a 1×1 projection (+ BN + ReLU)."""

    def __init__(self, mode: str = "bilinear", expand: bool = False, batch_norm: bool = True):
        super().__init__()
        self.mode, self.use_expand = mode, expand
        self.branch = nn.Conv2d(3, 6, 1)
        self.pool_conv = nn.Conv2d(3, 4, 1)
        self.proj = nn.Conv2d(10, 5, 1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(5) if batch_norm else nn.Identity()

    def forward(self, x):
        b = F.relu(self.branch(x))
        p = F.relu(self.pool_conv(x.mean((2, 3), keepdim=True)))
        if self.use_expand:
            p = p.expand(-1, -1, x.shape[2], x.shape[3])
        elif self.mode == "bilinear":
            p = F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
        else:
            p = F.interpolate(p, size=x.shape[-2:], mode="nearest")
        return F.relu(self.bn(self.proj(torch.cat([b, p], 1))))


@pytest.mark.parametrize(
    ("mode", "expand"), [("bilinear", False), ("nearest", False), (None, True)]
)
@pytest.mark.parametrize("batch", [1, 3])
def test_broadcast_branch_becomes_a_residual(mode, expand, batch):
    model = _randomise_bn(PoolingBranch(mode or "bilinear", expand)).eval()
    x = torch.randn(batch, 3, 9, 13)
    eng = _compile(model, x)
    assert eng.info.fusions["broadcast_branch"] == 1
    gm = eng._runner.details["graph"]
    assert not any(n.target is torch.ops.aten.cat.default for n in gm.graph.nodes)
    _same(eng, model, x)


def test_broadcast_branch_needs_a_pointwise_reader():
    class M(PoolingBranch):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(10, 5, 3, padding=1)  # 3×3: the border sees zeros

    model = M().eval()
    x = torch.randn(1, 3, 8, 8)
    eng = _compile(model, x)
    assert "broadcast_branch" not in eng.info.fusions
    _same(eng, model, x)


class Head(nn.Module):
    def __init__(self, upsample: bool, classes: int = 4, crop: bool = False):
        super().__init__()
        self.upsample, self.crop = upsample, crop
        self.body = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.cls(F.relu(self.body(x)))
        if self.upsample:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        if self.crop:
            y = y[..., : h // 2 - 1, : w // 2 - 1]
        return y


@pytest.mark.parametrize("output", ["mask", "probs"])
@pytest.mark.parametrize("upsample", [True, False])
def test_head_fusion(output, upsample):
    model = Head(upsample).eval()
    x = torch.randn(2, 3, 17, 22)
    eng = _compile(model, x, output=output)
    assert eng.info.fusions["head_conv"] == 1
    with torch.no_grad():
        logits = model(x)
    out = eng(x)
    if output == "mask":
        assert out.dtype == torch.uint8
        assert torch.equal(out.long(), logits.argmax(1))
    else:
        assert_close(out, torch.softmax(logits, 1), atol=1e-6, rtol=1e-5)


def test_head_fusion_through_crop():
    model = Head(False, crop=True).eval()
    x = torch.randn(1, 3, 20, 24)
    eng = _compile(model, x, output="mask")
    assert eng.info.fusions["head_conv"] == 1
    with torch.no_grad():
        assert torch.equal(eng(x).long(), model(x).argmax(1))


def test_binary_model_masks_by_sigmoid_threshold():
    model = Head(True, classes=1).eval()
    x = torch.randn(1, 3, 16, 16)
    eng = _compile(model, x, output="mask", threshold=0.7)
    with torch.no_grad():
        want = (torch.sigmoid(model(x))[:, 0] > 0.7).to(torch.uint8)
    assert torch.equal(eng(x), want)
    probs = _compile(model, x, output="probs")
    with torch.no_grad():
        assert_close(probs(x), torch.sigmoid(model(x)), atol=1e-6, rtol=1e-5)


def test_dropout_and_identities_are_removed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return F.relu(self.drop(self.conv(x))).clone()

    model = M().eval()
    x = torch.randn(1, 3, 6, 6)
    eng = _compile(model, x)
    assert eng.info.fusions["conv_act"] == 1  # dropout no longer splits conv → relu
    assert eng.info.ops_after == 2  # the layout conversion and the fused conv
    _same(eng, model, x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_graph(precision):
    model = _randomise_bn(ConvBN()).eval()
    x = torch.randn(1, 4, 9, 9)
    eng = _compile(model, x, precision=precision)
    out = eng(x)
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert segfast.check(eng, model, [x]).passed


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("turn", ["cast", "divide"])
def test_low_precision_integer_input_the_model_makes_float(precision, turn):
    """uint8 frames the model makes float itself (``x.float() / 255``, or ``x / 255``:
    true division promotes to fp32): that result is the engine's dtype, so the conv
    after it reads what its weights are."""

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x):
            return self.conv((x.float() if turn == "cast" else x) / 255.0)

    model = Frames().eval()
    x = torch.randint(0, 256, (1, 3, 9, 9), dtype=torch.uint8)
    eng = _compile(model, x, precision=precision)
    out = eng(x)
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert segfast.check(eng, model, [x]).passed


def test_layout_is_channels_last():
    model = ConvBN().eval()
    x = torch.randn(1, 4, 9, 9)
    out = _compile(model, x)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
