"""The torch backend's CPU plan: whole models against eager and against the
unlowered fused graph, that each lowering fires, options, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import segfast
from segfast import models
from segfast.backends.cpu import native
from segfast.compiler import ops

needs_onednn_bf16 = pytest.mark.skipif(
    not ops._mkldnn_ok(torch.bfloat16),
    reason="oneDNN has no bf16 convolutions on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)

pytestmark = pytest.mark.skipif(not ops._mkldnn_ok(), reason="oneDNN is not usable here")
HAS_LIB = native.load() is not None


class Mixed(nn.Module):
    """Every lowering in one small net: a wide 3×3 stage (Winograd), an atrous
    depthwise conv (rate 12), a skip concat into a 3×3 conv, a transposed conv,
    max-pooling, residual adds and a resize."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(96, 112, 3, padding=1), nn.BatchNorm2d(112), nn.ReLU6())
        self.atrous = nn.Conv2d(112, 112, 3, padding=12, dilation=12, groups=112, bias=False)
        self.point = nn.Conv2d(112, 112, 1)
        self.up = nn.ConvTranspose2d(112, 96, 2, stride=2)
        self.fuse = nn.Conv2d(192, 100, 3, padding=1)
        self.small = nn.Conv2d(100, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        s = self.stem(x)
        y = self.wide(F.max_pool2d(s, 2))
        y = F.relu(self.point(self.atrous(y)) + y)
        y = self.fuse(torch.cat([s, self.up(y)], 1)).relu()
        y = F.interpolate(self.small(y), scale_factor=0.5, mode="bilinear")
        return self.head(y)


def _compile(model, x, **options):
    return segfast.compile(model, x, backend="torch", options=options)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = Mixed().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_every_lowering_fires_and_matches_eager(mixed):
    x = torch.randn(2, 3, 34, 30)
    eng = _compile(mixed, x)
    lowered = eng._runner.details["lowered"]
    assert lowered["conv_transpose2d"] == 1
    assert lowered["max_pool2d (no indices)"] == 1
    if HAS_LIB:
        assert lowered["conv2d 3×3 Winograd F(4×4,3×3)"] == 1  # wide (96 → 112)
        assert lowered["conv2d 3×3 Winograd F(4×4,3×3) two-source"] == 1  # fuse (192 → 100)
        assert lowered["depthwise conv2d (segfast kernel, atrous)"] == 1
    else:
        assert lowered["conv2d (two-source, split-K)"] == 1
    report = segfast.check(eng, mixed, [x, torch.randn(2, 3, 34, 30)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    assert "CPU plan:" in eng.summary()


def test_plan_equals_the_fused_graph(mixed):
    x = torch.randn(1, 3, 22, 26)
    planned = _compile(mixed, x)
    graph = _compile(mixed, x, no_cpu_plan=True)
    assert "lowered" not in graph._runner.details
    assert _rel(planned(x), graph(x)) <= 1e-5


def test_options_turn_lowerings_off(mixed):
    x = torch.randn(1, 3, 20, 20)
    no_wino = _compile(mixed, x, winograd=False)._runner.details["lowered"]
    assert not any("Winograd" in k for k in no_wino)
    no_kernels = _compile(mixed, x, cpu_kernels=False)
    lowered = no_kernels._runner.details["lowered"]
    assert not any("segfast kernel" in k or "Winograd" in k for k in lowered)
    assert lowered["conv2d (two-source, split-K)"] == 1
    assert segfast.check(no_kernels, mixed, x).passed


def test_without_the_kernels_the_summary_says_why(mixed, monkeypatch):
    monkeypatch.setattr(native, "_outcome", lambda: (None, "no C compiler found (test)"))
    x = torch.randn(1, 3, 16, 16)
    eng = _compile(mixed, x)
    assert "segfast CPU kernels: not used (no C compiler found (test))" in eng.summary()
    assert segfast.check(eng, mixed, x).passed


def test_every_intermediate_is_freed(mixed):
    plan_eng = _compile(mixed, torch.randn(1, 3, 16, 16))
    from segfast.backends.cpu.plan import lower

    plan = lower(plan_eng._runner.details["graph"])
    freed = {i for s in plan.steps for i in s.free}
    produced = {s.out for s in plan.steps}
    out_slots = {plan.steps[-1].out}
    assert produced - out_slots <= freed | set(plan.inputs)


@needs_onednn_bf16
def test_bf16_plan(mixed):
    x = torch.randn(1, 3, 24, 24)
    eng = segfast.compile(mixed, x, backend="torch", precision="bf16")
    assert not any("Winograd" in k for k in eng._runner.details["lowered"])
    assert segfast.check(eng, mixed, x).passed


def test_dynamic_shapes_run_at_other_sizes(mixed):
    x = torch.randn(1, 3, 32, 32)
    eng = segfast.compile(mixed, x, backend="torch", dynamic=True)
    for shape in [(1, 3, 20, 28), (1, 3, 46, 38)]:  # even: the model pools by 2
        y = torch.randn(*shape)
        with torch.no_grad():
            assert _rel(eng(y), mixed(y)) <= 1e-5


@pytest.mark.parametrize(
    "name", ["unet", "segnet", "fcn8s", "pspnet", "deeplabv3plus_mobilenetv2", "dcgan_generator"]
)
def test_zoo_models_on_the_plan(name):
    model = models.create(name, tiny=True).eval()
    spec = models.get_spec(name)
    (x,) = spec.make_inputs(model, 2)
    eng = segfast.compile(model, x, backend="torch")
    assert eng._runner.details["lowered"]
    assert segfast.check(eng, model, x).passed


@pytest.mark.slow
def test_unet_base32_takes_winograd():
    """The benchmark's U-Net: its 96+-channel 3×3 layers take Winograd, within the contract."""
    if not HAS_LIB:
        pytest.skip(f"CPU kernels: {native.status()[1]}")
    model = models.create("unet", base=32, in_channels=3, num_classes=2).eval()
    x = torch.randn(1, 3, 128, 128)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    lowered = eng._runner.details["lowered"]
    # not the 512-channel bottleneck's two at 8×8: 4 tiles (winograd.MIN_TILES)
    assert sum(n for k, n in lowered.items() if "Winograd" in k) == 7
    report = segfast.check(eng, model, x)
    assert report.passed, report


class UpThenSeparable(nn.Module):
    """bilinear ×4 → depthwise 3×3 → ReLU → pointwise: the resize fusion (the
    activation keeps the pointwise conv from mixing at the source)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 40, 3, stride=4, padding=1)
        self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False)
        self.pw = nn.Conv2d(40, 7, 1)

    def forward(self, x):
        y = F.relu(self.enc(x))
        y = F.interpolate(y, scale_factor=4.0, mode="bilinear", align_corners=False)
        return self.pw(F.relu(self.dw(y)))


@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_upsample_into_depthwise_is_fused(monkeypatch):
    from segfast.backends.cpu import plan

    monkeypatch.setattr(plan, "MIN_BYTES", 1)  # fuse even this small test map
    model = UpThenSeparable().eval()
    x = torch.randn(2, 3, 36, 44)
    eng = _compile(model, x)
    assert (
        eng._runner.details["lowered"]["bilinear upsample + depthwise conv2d (segfast kernel)"] == 1
    )
    with torch.no_grad():
        assert _rel(eng(x), model(x)) <= 1e-5
    monkeypatch.setattr(plan, "MIN_BYTES", 1 << 40)  # and not when the map is small
    eng = _compile(model, x)
    assert not any("upsample" in k for k in eng._runner.details["lowered"])


@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_onednn_bf16)])
def test_logits_upsample_and_mask_head(precision):
    """A model ending in a bilinear upsample (FCN/DeepLab style): the logits come
    back NCHW from the resize kernel; output="mask" takes the argmax kernel."""
    model = models.create("deeplabv3plus_mobilenetv2", tiny=True).eval()
    x = torch.randn(1, 3, 45, 61)
    logits = segfast.compile(model, x, backend="torch", precision=precision)
    assert (
        logits._runner.details["lowered"][
            "bilinear upsample of the logits, NCHW out (segfast kernel)"
        ]
        == 1
    )
    y = logits(x)
    assert y.is_contiguous()
    assert segfast.check(logits, model, x).passed
    mask = segfast.compile(model, x, backend="torch", precision=precision, output="mask")
    assert mask._runner.details["lowered"]["head: [resize +] argmax (segfast kernel)"] == 1
    if precision == "fp32":
        assert segfast.check(mask, model, x).passed
    else:  # random weights: near-ties flip in bf16; no worse than PyTorch's own bf16
        with torch.no_grad():
            ref = model(x).argmax(1)
            own = copy.deepcopy(model).bfloat16()(x.bfloat16()).argmax(1)
        ours = (mask(x).long() == ref).float().mean()
        assert ours >= (own == ref).float().mean()


@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_mask_head_with_classifier_inside():
    """FCN's head: 1×1 classifier + upsample + argmax as one segfast.head."""
    model = models.create("fcn_resnet50", tiny=True).eval()
    x = torch.randn(1, 3, 40, 36)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    assert eng.info.fusions.get("head_conv") == 1
    assert eng._runner.details["lowered"]["head: [resize +] argmax (segfast kernel)"] == 1
    assert segfast.check(eng, model, x).passed


class UpSeparableWithSkip(nn.Module):
    """DeepLab v3+'s decoder in miniature: cat([up×4(aspp), low]) → separable conv."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.low = nn.Conv2d(3, 6, 3, padding=1)
        self.deep = nn.Conv2d(6, 32, 3, stride=4, padding=1)
        self.dw = nn.Conv2d(38, 38, 3, padding=1, groups=38, bias=False)
        self.pw = nn.Sequential(nn.Conv2d(38, 20, 1, bias=False), nn.BatchNorm2d(20),
                                act if act is not None else nn.ReLU())  # fmt: skip

    def forward(self, x):
        low = F.relu(self.low(x))
        deep = F.relu(self.deep(low))
        up = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.pw(self.dw(torch.cat([up, low], 1)))


@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1)])
def test_decoder_separable_mixes_at_the_source(monkeypatch, act):
    from segfast.backends.cpu import plan

    monkeypatch.setattr(plan, "MIN_BYTES", 1)
    model = UpSeparableWithSkip(act).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 48, 40)
    eng = _compile(model, x)
    lowered = eng._runner.details["lowered"]
    assert lowered["bilinear upsample + separable conv, mixed at the source (segfast kernel)"] == 1
    assert eng.info.fusions["concat_depthwise"] == 1
    with torch.no_grad():
        assert _rel(eng(x), model(x)) <= 1e-5


@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
@needs_onednn_bf16
def test_bf16_decoder_separable_mixes_at_the_source(monkeypatch):
    """bf16: W_t·a and the output in bf16, the tap sums in fp32; a lone bf16
    upsample → depthwise conv stays on oneDNN."""
    from segfast.backends.cpu import plan

    monkeypatch.setattr(plan, "MIN_BYTES", 1)
    torch.manual_seed(6)
    model = UpSeparableWithSkip(nn.ReLU6()).eval()
    x = torch.randn(1, 3, 48, 40)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    lowered = eng._runner.details["lowered"]
    assert lowered["bilinear upsample + separable conv, mixed at the source (segfast kernel)"] == 1
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 48, 40)])
    assert report.passed, report
    eng = segfast.compile(UpThenSeparable().eval(), x, backend="torch", precision="bf16")
    assert not any("upsample" in k for k in eng._runner.details["lowered"])


def test_plan_runs_methods_and_graph_values_in_keywords():
    """FX nodes the fused graph may carry besides call_function: call_method, and
    graph values passed by keyword."""
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_method("relu", (x,))
    z = g.call_function(torch.add, (x,), {"other": y, "alpha": 2})
    g.output(z)
    from segfast.backends.cpu.plan import lower

    plan = lower(fx.GraphModule(nn.Module(), g))
    t = torch.randn(3, 4)
    assert torch.equal(plan(t), torch.add(t, t.relu(), alpha=2))


class ResidualThenAct(nn.Module):
    """``act(conv(y) + y)`` and ``act(conv(cat))``: oneDNN fuses only relu after its
    binary add (PyTorch's op raised "Unary Fusion behavior undefined" for the rest)."""

    def __init__(self, act) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.act = act

    def forward(self, x):
        y = self.a(x)
        z = self.act(self.b(y) + y)
        return self.act(self.c(torch.cat([z, y], 1)))


@pytest.mark.parametrize(
    "act", [F.relu, F.relu6, F.silu, torch.sigmoid, torch.tanh, lambda t: F.leaky_relu(t, 0.2)]
)
@pytest.mark.parametrize("options", [{}, {"no_cpu_plan": True}])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_any_activation_after_a_fused_residual(act, options, precision):
    torch.manual_seed(5)
    model = ResidualThenAct(act).eval()
    x = torch.randn(1, 3, 14, 18)
    eng = segfast.compile(model, x, backend="torch", options=options, precision=precision)
    report = segfast.check(eng, model, x)
    assert report.passed, report


def test_bf16_without_onednn_bf16_runs_plain_pytorch(monkeypatch):
    """On CPUs where oneDNN refuses bf16 convolutions (AVX2 without AVX-512 BW/VL/DQ),
    a bf16 engine still builds and runs — on plain PyTorch ops, and says so."""
    real = ops._mkldnn_ok

    def no_bf16(dtype: torch.dtype = torch.float32) -> bool:
        return dtype != torch.bfloat16 and real(dtype)

    monkeypatch.setattr(ops, "_mkldnn_ok", no_bf16)
    torch.manual_seed(0)
    m = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(m, x, backend="torch", precision="bf16")
    assert "unavailable in torch.bfloat16 here" in eng.summary()
    assert "lowered" not in eng._runner.details  # no CPU plan
    with torch.no_grad():
        ref = m(x)
        own = copy.deepcopy(m).to(torch.bfloat16)(x.to(torch.bfloat16)).float()  # PyTorch's
    got = eng(x).float()

    def rel(a: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    assert torch.isfinite(got).all()
    assert rel(got) <= 2 * rel(own), (rel(got), rel(own))  # as good as PyTorch's own bf16


@pytest.mark.narrow_vectors
@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_without_avx512_the_direct_kernels_stay_off(monkeypatch):
    """Where 16-float vectors take two registers (no AVX-512) the plan keeps Winograd and
    the head but leaves the 16-lane direct kernels (atrous depthwise, narrow convs, the
    upsample fusions) to oneDNN, and says so."""
    monkeypatch.setattr(native.load(), "wide_vectors", False)
    monkeypatch.setattr(native.load(), "avx2", True)
    torch.manual_seed(0)
    m = models.create("deeplabv3plus_mobilenetv2", tiny=True).eval()
    x = torch.randn(1, 3, 64, 64)
    eng = segfast.compile(m, x, backend="torch", output="logits")
    lowered = eng._runner.details["lowered"]
    assert not [k for k in lowered if "atrous" in k]
    # the 8-lane kernel takes the ASPP's atrous depthwise convs (rates 6, 12, 18) and,
    # the tiny net's maps being ≤ 16 wide, its other stride-1 depthwise convs
    assert lowered["depthwise conv2d (segfast kernel, 8-lane)"] == 15
    assert not [k for k in lowered if "17–24" in k or "separable" in k]
    assert "no AVX-512 here" in eng.summary()
    assert segfast.check(eng, m, [x]).passed
    monkeypatch.setattr(native.load(), "wide_vectors", True)  # the same model with them
    again = segfast.compile(m, x, backend="torch", output="logits")
    assert [k for k in again._runner.details["lowered"] if "atrous" in k]


@pytest.mark.narrow_vectors
@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_without_avx512_inverted_residual_blocks_still_fuse(monkeypatch):
    """sf_invres holds one register of lanes (8 on AVX2): without AVX-512 the plan still
    fuses MobileNetV2's blocks where worthwhile, and not with ``avx2_kernels`` off."""
    from segfast.backends.cpu import invres

    monkeypatch.setattr(native.load(), "wide_vectors", False)
    monkeypatch.setattr(native.load(), "avx2", True)
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)  # the tiny net's small maps too
    torch.manual_seed(0)
    m = models.create("deeplabv3plus_mobilenetv2", tiny=True).eval()
    x = torch.randn(1, 3, 64, 64)
    eng = segfast.compile(m, x, backend="torch", output="logits")
    lowered = eng._runner.details["lowered"]
    assert lowered["inverted residual block (segfast kernel)"] >= 5, lowered
    report = segfast.check(eng, m, [x, torch.randn(1, 3, 64, 64)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    off = segfast.compile(m, x, backend="torch", output="logits",
                          options={"avx2_kernels": False})  # fmt: skip
    assert "inverted residual block (segfast kernel)" not in off._runner.details["lowered"]


@pytest.mark.narrow_vectors
@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_without_avx512_depthwise_layers_take_the_8_lane_kernel_where_it_wins(monkeypatch):
    """No AVX-512 but AVX2: 5×5 and 7×7 stride-1 depthwise layers, those on small maps
    and atrous ones run sf_dwconv8; 3×3 layers on larger maps and stride 2 stay on
    oneDNN (depthwise.vec8_worthwhile); the engine matches eager either way."""
    monkeypatch.setattr(native.load(), "wide_vectors", False)
    monkeypatch.setattr(native.load(), "avx2", True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k5 = nn.Conv2d(24, 24, 5, padding=2, groups=24)  # 5×5 at 32²: 8-lane
            self.k3 = nn.Conv2d(24, 24, 3, padding=1, groups=24)  # 3×3 at 32²: oneDNN
            self.s2 = nn.Conv2d(24, 24, 3, 2, padding=1, groups=24)  # stride 2: oneDNN
            self.small = nn.Conv2d(24, 24, 3, padding=1, groups=24)  # 16²: 8-lane
            self.atrous = nn.Conv2d(24, 24, 3, padding=6, dilation=6, groups=24)  # 8-lane

        def forward(self, x):
            y = F.hardswish(self.k5(x))
            y = F.relu(self.k3(y)) + y
            y = self.s2(y)
            return self.atrous(F.relu6(self.small(y)))

    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(2, 24, 32, 32)
    eng = segfast.compile(m, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered["depthwise conv2d (segfast kernel, 8-lane)"] == 3
    assert lowered["conv2d"] == 2
    assert segfast.check(eng, m, [x]).passed
    off = segfast.compile(m, x, backend="torch", options={"avx2_kernels": False})
    assert "depthwise conv2d (segfast kernel, 8-lane)" not in off._runner.details["lowered"]
    monkeypatch.setattr(native.load(), "avx2", False)  # without AVX2: all on oneDNN
    again = segfast.compile(m, x, backend="torch")
    assert "depthwise conv2d (segfast kernel, 8-lane)" not in again._runner.details["lowered"]


def test_vec8_rule():
    from segfast.backends.cpu.depthwise import vec8_worthwhile as ok

    assert ok((5, 5), (1, 1), (2, 2), (1, 1), 32)
    assert ok((7, 7), (1, 1), (3, 3), (1, 1), None)
    assert ok((3, 3), (1, 1), (1, 1), (1, 1), 16)
    assert not ok((3, 3), (1, 1), (1, 1), (1, 1), 32)
    assert not ok((3, 3), (1, 1), (1, 1), (1, 1), None)  # dynamic width: unknown, oneDNN
    assert not ok((5, 5), (2, 2), (2, 2), (1, 1), 8)  # stride 2
    assert ok((3, 3), (1, 1), (6, 6), (6, 6), 64)
    assert ok((3, 3), (1, 1), (18, 18), (18, 18), None)
    assert not ok((3, 3), (1, 1), (6, 6), (6, 6), 128)  # a wide map: padded first, oneDNN
    assert not ok((3, 3), (1, 1), (2, 2), (2, 2), 32)  # rate 2: oneDNN's fast path


@pytest.mark.narrow_vectors
@pytest.mark.skipif(not HAS_LIB, reason="needs segfast's CPU kernels")
def test_asymmetric_zero_pads_fold_into_8_lane_depthwise(monkeypatch):
    """efficientnet-pytorch's "same" padding — ZeroPad2d((0, 1, 0, 1)) before a stride-2
    depthwise conv — becomes the 8-lane kernel's padding where it runs: no padded copy.
    A pad also read by a dense conv stays a pad."""
    monkeypatch.setattr(native.load(), "wide_vectors", False)
    monkeypatch.setattr(native.load(), "avx2", True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pad3 = nn.ZeroPad2d((0, 1, 0, 1))
            self.dw3 = nn.Conv2d(16, 16, 3, 2, groups=16)
            self.pad5 = nn.ZeroPad2d((1, 2, 1, 2))
            self.dw5 = nn.Conv2d(16, 16, 5, 2, groups=16)
            self.pad_shared = nn.ZeroPad2d((0, 1, 0, 1))
            self.dw_shared = nn.Conv2d(16, 16, 3, 1, groups=16)
            self.dense = nn.Conv2d(16, 16, 3)

        def forward(self, x):
            y = F.silu(self.dw3(self.pad3(x)))
            y = self.dw5(self.pad5(y))
            p = self.pad_shared(y)
            return self.dw_shared(p) + self.dense(p)

    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(2, 16, 37, 30)
    eng = segfast.compile(m, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered["depthwise conv2d (segfast kernel, 8-lane, pad folded)"] == 2
    assert segfast.check(eng, m, [x, torch.randn(2, 16, 37, 30)]).passed
    off = segfast.compile(m, x, backend="torch", options={"avx2_kernels": False})
    assert (
        "depthwise conv2d (segfast kernel, 8-lane, pad folded)"
        not in off._runner.details["lowered"]
    )
    assert segfast.check(off, m, [x]).passed


def test_canonical_strides_of_views():
    """A [1, H·W, C] token map permuted and reshaped to [1, C, H, W] is channels_last
    with a batch stride of C: the same elements, re-strided canonically; other tensors
    as they are."""
    tok = torch.randn(1, 6 * 5, 7)
    x = tok.permute(0, 2, 1).reshape(1, 7, 6, 5)
    assert x.stride() == (7, 1, 35, 7)
    y = ops.canonical_strides(x)
    assert y.stride() == (210, 1, 35, 7)
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(y, x)
    nchw = torch.randn(4, 1, 6, 5)[1:2].transpose(0, 1).reshape(1, 1, 6, 5)  # C = 1: both
    assert ops.canonical_strides(nchw) is nchw
    v = torch.randn(2, 7, 6, 5)[:1]  # NCHW, batch stride already canonical
    assert ops.canonical_strides(v) is v
    odd = torch.randn(1, 3, 8, 10)[..., ::2]  # neither layout
    assert ops.canonical_strides(odd) is odd
    assert ops.canonical_strides(tok) is tok  # not 4-D


class TokenHead(nn.Module):
    """SegFormer's all-MLP head: token maps [B, H·W, C] → Linear → [B, C, H, W] (a
    permuted view) → bilinear to the largest map → concat of three → 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.down = nn.Conv2d(16, 32, 3, 2, 1)
        self.down2 = nn.Conv2d(32, 32, 3, 2, 1)
        self.mlp1, self.mlp2, self.mlp3 = nn.Linear(16, 24), nn.Linear(32, 24), nn.Linear(32, 24)
        self.fuse = nn.Conv2d(72, 5, 1)

    def _tokens(self, f, mlp):
        b, _, h, w = f.shape
        t = mlp(f.flatten(2).transpose(1, 2))  # [B, H·W, 24]
        return t.permute(0, 2, 1).reshape(b, -1, h, w)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down(f1)
        f3 = self.down2(f2)
        a = self._tokens(f1, self.mlp1)
        b = F.interpolate(self._tokens(f2, self.mlp2), size=a.shape[2:], mode="bilinear")
        c = F.interpolate(self._tokens(f3, self.mlp3), size=a.shape[2:], mode="bilinear")
        return self.fuse(torch.cat([c, b, a], 1))


@pytest.mark.parametrize("batch", [1, 2])
def test_plan_gives_views_canonical_strides(lowered_plans, batch):
    """The bilinear upsample of a permuted token map reads canonical channels_last
    strides, so PyTorch runs (and writes) it channels_last; the result is eager's."""
    from segfast.backends.cpu import plan as plan_mod

    torch.manual_seed(5)
    model = TokenHead().eval()
    x = torch.randn(batch, 3, 24, 40)
    eng = segfast.compile(model, x, backend="torch")
    report = segfast.check(eng, model, [x, torch.randn(batch, 3, 24, 40)])
    assert report.passed, report
    plan = lowered_plans[-1]
    assert any(isinstance(s.fn, plan_mod._CanonicalStrides) for s in plan.steps)
    # run the plan step by step: the upsample's input and output are NHWC
    env: list = [None] * plan.n_slots
    env[plan.inputs[0]] = x
    seen = 0
    for step in plan.steps:
        args = step.args(env)
        env[step.out] = step.fn(*args, **step.kwargs(env))
        if step.fn is torch.ops.aten.upsample_bilinear2d.vec:
            _, c, h, w = args[0].shape
            assert args[0].stride() == (c * h * w, 1, w * c, c)
            assert env[step.out].is_contiguous(memory_format=torch.channels_last)
            assert not env[step.out].is_contiguous()
            seen += 1
    assert seen == 2
