"""The core-ATen lowering without a re-trace (segfast.compiler.decompose): where it
rewrites a graph, the result is the graph ``run_decompositions`` gives — the same ops
with the same arguments, the same outputs — and where it cannot be exact (in-place ops
on tensors read again or aliased, inputs and buffers written, batch norms that use batch
statistics, reflect padding, ops it has no rule for) it gives up and the compile goes
through ``run_decompositions``, with the model's results unchanged."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import segfast
from segfast import models
from segfast.compiler import decompose
from segfast.compiler.capture import (
    KEEP_WHOLE,
    decomposition_table,
    dynamic_shapes,
    lower_to_core,
    trace_inputs,
)
from segfast.models import edge
from segfast.testing import assert_close


def _export(model: nn.Module, x: torch.Tensor, axes: tuple[str, ...] = ()):
    traced = trace_inputs((x,), axes)
    return torch.export.export(
        model.eval(), traced, dynamic_shapes=dynamic_shapes(traced, axes), strict=False
    )


def _signature(gm: fx.GraphModule) -> Counter:
    """Each call's op and arguments, producers named by their op and rank among
    that op's nodes (node names differ between the two lowerings)."""
    names: dict[fx.Node, str] = {}
    seen: Counter = Counter()
    out: Counter = Counter()

    def norm(a):
        if isinstance(a, fx.Node):
            return names.get(a, f"{a.op}:{a.target}")
        if isinstance(a, list | tuple):
            return type(a)(norm(v) for v in a)
        return a

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        out[repr((str(n.target), norm(n.args), sorted((k, norm(v)) for k, v in n.kwargs.items())))] += 1  # fmt: skip
        names[n] = f"{n.target}#{seen[str(n.target)]}"
        seen[str(n.target)] += 1
    return out


NETS = {
    # U-Net with a dynamic height and width pads to a multiple of 8: symbolic sizes
    "unet": (lambda: models.create("unet", tiny=True), (1, 1, 37, 53), ("height", "width")),
    "pspnet": (lambda: models.create("pspnet", tiny=True), (2, 3, 33, 41), ()),
    "deeplabv3plus": (lambda: models.create("deeplabv3plus_mobilenetv2", tiny=True),
                      (1, 3, 33, 41), ()),
    "dcgan_generator": (lambda: models.create("dcgan_generator", tiny=True), (2, 16, 1, 1), ()),
    "lraspp": (lambda: edge.lraspp_mobilenet_v3_large(5, width=0.25), (1, 3, 19, 23), ()),
    "fpn_gn": (lambda: edge.fpn_groupnorm(3, pyramid=8, seg=8, groups=4), (1, 3, 32, 64), ()),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NETS))
def test_lowering_equals_run_decompositions(name):
    build, shape, axes = NETS[name]
    model = build().eval()
    x = torch.randn(shape)
    program = _export(model, x, axes)
    fast = decompose.lower(program, decomposition_table(), KEEP_WHOLE)
    assert fast is not None, "the lowering gave up on a graph it has rules for"
    slow = program.run_decompositions(decomposition_table()).module()
    assert _signature(fast) == _signature(slow)
    with torch.no_grad():
        assert torch.equal(fast(x), slow(x))
        if axes:  # another size through the dynamic axes
            grow = [int(a in axes) for a in ("batch", "channels", "height", "width")]
            other = torch.randn(
                [s + g * (i + 1) for i, (s, g) in enumerate(zip(shape, grow, strict=True))]
            )
            assert torch.equal(fast(other), slow(other))
    # the graph carries what the passes read: a fake value on every tensor node
    for n in fast.graph.nodes:
        if n.op == "call_function":
            assert "val" in n.meta, n


class _ReadAfterWrite(nn.Module):
    """Export's trace follows the tensor: the later read of ``a`` is a read of the
    in-place op's result, so the functional form is exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv(x)
        b = torch.relu_(a)  # writes a ...
        return a * 2 + b  # ... which is read again: both see the relu


class _WriteThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv(x)
        a[:, :2].relu_()  # half the channels rectified, in a
        return a


class _WriteInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x.relu_())


class _Reflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class _BatchStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in eval

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _BroadcastInPlace(nn.Module):
    """In-place add of a broadcast tensor and a Python scalar: exact out of place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        a = self.conv(x)
        a.add_(self.bias).mul_(0.5)
        return F.hardtanh_(a, -0.2, 0.3)


@pytest.mark.parametrize(
    ("cls", "exact"),
    [(_ReadAfterWrite, True), (_WriteThroughView, False), (_WriteInput, False),
     (_Reflect, False), (_BatchStats, False), (_BroadcastInPlace, True)],
)  # fmt: skip
def test_gives_up_where_a_rewrite_would_not_be_exact(cls, exact):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 9, 11)
    program = _export(model, x.clone())
    fast = decompose.lower(program, decomposition_table(), KEEP_WHOLE)
    assert (fast is not None) == exact
    lowered = lower_to_core(program)  # what capture uses: the re-trace where needed
    with torch.no_grad():
        ref = model(x.clone())
        assert_close(lowered(x.clone()), ref, atol=1e-6, rtol=1e-5)
        eng = segfast.compile(model, x.clone(), backend="torch")
        assert_close(eng(x.clone()), model(x.clone()), atol=1e-5, rtol=1e-4)
    if exact:
        slow = program.run_decompositions(decomposition_table()).module()
        assert _signature(fast) == _signature(slow)


def test_the_program_is_left_as_exported():
    """The lowering works on a copy: the program an engine file saves is unchanged."""
    model = models.create("unet", tiny=True).eval()
    program = _export(model, torch.randn(1, 1, 32, 32))
    before = str(program.graph)
    assert decompose.lower(program, decomposition_table(), KEEP_WHOLE) is not None
    assert str(program.graph) == before


class _Fn(nn.Module):
    def __init__(self, fn, *mods: nn.Module):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(self.mods, x)


# (forward, modules, rewritten exactly?) on a [2, 4, 9, 11] input
LAYERS = {
    "in-place chain": (lambda m, x: m[0](x).relu_().mul_(2).sub_(0.5).clamp_(-0.1, 0.9),
                       [nn.Conv2d(4, 4, 3, padding=1)], True),
    "in-place residual": (lambda m, x: F.relu_(m[0](x).add_(m[1](x))),
                          [nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)], True),
    "pad with a value": (lambda m, x: m[0](F.pad(x, (1, 2, 0, 1), value=0.5)),
                         [nn.Conv2d(4, 4, 3)], True),
    "transposed, output padding, groups": (
        lambda m, x: m[0](x),
        [nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)], True),
    "dilated grouped conv": (lambda m, x: m[0](x),
                             [nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4, bias=False)],
                             True),
    "max pool, ceil mode": (lambda m, x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), [], True),
    "norms without affine": (lambda m, x: m[1](m[0](x)),
                             [nn.BatchNorm2d(4, affine=False), nn.GroupNorm(2, 4, affine=False)],
                             True),
    "adaptive pool 3×3": (lambda m, x: F.adaptive_avg_pool2d(x, 3), [], True),
    "SE gate, in-place hardsigmoid": (
        lambda m, x: x * F.hardsigmoid(F.adaptive_avg_pool2d(x, 1), inplace=True), [], True),
    "padding='same'": (lambda m, x: m[0](x), [nn.Conv2d(4, 4, 3, padding="same")], False),
    "instance norm": (lambda m, x: m[0](x), [nn.InstanceNorm2d(4)], False),
    "softmax, log-softmax": (lambda m, x: torch.softmax(x, 1) + torch.log_softmax(x, 1), [],
                             True),
    "SE gate of Linear layers": (
        lambda m, x: x * torch.sigmoid(m[1](m[0](x.mean((2, 3))).relu())).reshape(2, 4, 1, 1),
        [nn.Linear(4, 2), nn.Linear(2, 4, bias=False)], True),
    "flatten": (lambda m, x: x.flatten(2).sum(2), [], False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_lower_exactly_or_not_at_all(name):
    fn, mods, exact = LAYERS[name]
    model = _Fn(fn, *mods).eval()
    x = torch.randn(2, 4, 9, 11)
    program = _export(model, x)
    fast = decompose.lower(program, decomposition_table(), KEEP_WHOLE)
    assert (fast is not None) == exact
    slow = program.run_decompositions(decomposition_table()).module()
    with torch.no_grad():
        assert torch.equal(lower_to_core(program)(x), slow(x))
    if exact:
        assert _signature(fast) == _signature(slow)


def test_group_norm_with_symbolic_sizes():
    """GroupNorm's N, C and H×W come from the input's symbolic sizes (``sym_size`` nodes
    where the re-trace derives them from the graph input's): same values, the fusions
    still fire, and the engine matches eager at other sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
        nn.Conv2d(8, 3, 1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 24)
    axes = ("batch", "height", "width")
    program = _export(model, x, axes)
    assert decompose.lower(program, decomposition_table(), KEEP_WHOLE) is not None
    eng = segfast.compile(model, x, backend="torch", dynamic=axes)
    assert eng.info.fusions.get("group_norm") == 2
    assert eng.info.fusions.get("norm_act") == 2
    for shape in [(2, 3, 16, 24), (1, 3, 33, 17), (3, 3, 20, 40)]:
        y = torch.randn(shape)
        with torch.no_grad():
            assert_close(eng(y), model(y), atol=1e-5, rtol=1e-4)
