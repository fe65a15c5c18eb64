"""NaN and ±Inf reach an engine's output where the eager model puts them, on every backend.

A frame of NaNs through the ``torch`` backend's CPU plan used to come out as
NaN-free logits (oneDNN's fused relu/clip post-ops and segfast's C kernels compute
max/min in ways that turn NaN into a number): a corrupt frame became a confident
mask. Engines of such backends now run non-finite inputs through the eager model;
the Triton kernels propagate NaN themselves.
"""

from __future__ import annotations

import pytest
import torch

import segfast
from segfast import api, models
from segfast.kernels._common import interpreting
from segfast.outputs import WithHead

SIZE = (36, 44)


def _inputs(name: str, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    spec = models.get_spec(name)
    return spec.make_inputs(model, 1, (max(SIZE[0], spec.min_size), max(SIZE[1], spec.min_size)))


def _corrupt(inputs: tuple[torch.Tensor, ...], kind: str) -> tuple[torch.Tensor, ...]:
    """The first input with a run of NaNs, one +Inf, or NaN everywhere (any shape:
    images, and a generator's N×nz×1×1 latent)."""
    x = inputs[0].clone()
    flat = x.view(-1)
    n = flat.numel()
    if kind == "nan-patch":
        flat[n // 3 : n // 3 + max(1, n // 20)] = float("nan")
    elif kind == "inf-pixel":
        flat[n // 2] = float("inf")
    elif kind == "all-nan":
        flat.fill_(float("nan"))
    else:
        raise AssertionError(kind)
    return (x, *inputs[1:])


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same NaN positions, same ±Inf positions, and the same values elsewhere."""
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    if not out.is_floating_point():
        assert torch.equal(out, ref)
        return
    o, r = out.float(), ref.float()
    assert torch.equal(o.isnan(), r.isnan()), (
        f"NaN at {int(o.isnan().sum())}, eager {int(r.isnan().sum())}"
    )
    assert torch.equal(o == float("inf"), r == float("inf"))
    assert torch.equal(o == float("-inf"), r == float("-inf"))
    finite = r.isfinite()
    torch.testing.assert_close(o[finite], r[finite], rtol=1e-4, atol=1e-4)


ZOO = models.names()
SEGMENTATION = models.names("segmentation")
KINDS = ("nan-patch", "inf-pixel", "all-nan")
# ONNX Runtime's engines, like the torch backend's, run non-finite inputs through the
# eager model (the same wrapper, segfast.api._finite_or_reference), so the torch backend
# takes every model and ONNX Runtime a few, each of which costs an export of seconds:
# logits of an image model and of a generator (a latent input), a mask.
ORT_CASES = [("unet", "logits"), ("dcgan_generator", "logits"), ("segnet", "mask")]
CASES = (
    [("torch", name, "logits") for name in ZOO]
    + [("torch", name, "mask") for name in SEGMENTATION]
    + [("onnxruntime", name, output) for name, output in ORT_CASES]
)


@pytest.mark.parametrize(("backend", "name", "output"), CASES)
def test_nonfinite_inputs_reach_the_output_as_in_eager(backend, name, output):
    model = models.create(name, tiny=True).eval()
    inputs = _inputs(name, model)
    eng = segfast.compile(model, inputs, backend=backend, output=output)
    assert "NaN/Inf run the eager model" in eng.summary()  # why ORT_CASES can be few
    ref_model = WithHead(model, output)
    for kind in KINDS:
        bad = _corrupt(inputs, kind)
        with torch.no_grad():
            ref = ref_model(*bad)
        assert_same_nonfinite(eng(*bad), ref)
    if output == "logits":
        assert eng(*inputs).isfinite().all()


def test_finite_inputs_take_the_fused_path(monkeypatch):
    """The reference model runs only for non-finite inputs."""
    calls = []
    original = api._Reference.__call__

    def counted(self, *inputs):
        calls.append(1)
        return original(self, *inputs)

    monkeypatch.setattr(api._Reference, "__call__", counted)
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(model, x, backend="torch", output="mask")
    assert "NaN/Inf run the eager model" in eng.summary()
    calls.clear()
    eng(x)
    assert calls == []
    x[0, 0, 0, 0] = float("nan")
    eng(x)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_nonfinite_inputs_run_the_model_as_compiled(backend):
    """Not the caller's live module: after compiling, the caller scales a weight in place
    and puts the model back in train mode. A batch with one corrupt image must still give
    the compile-time model's output for the clean image, and the reference must not run
    BatchNorm on batch statistics (which would write NaN into the model's running stats)."""
    model = _DownUp().eval()
    with torch.no_grad():
        model.enc[1].running_mean.uniform_(-0.5, 0.5)
        model.enc[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 1, 32, 32)
    eng = segfast.compile(model, x, backend=backend)
    with torch.no_grad():
        as_compiled = model(x)
        model.head.weight.mul_(3.0)
    model.train()
    bad = x.clone()
    bad[0, 0, 5, 7] = float("nan")
    out = eng(bad)
    assert out[0].isnan().any()
    torch.testing.assert_close(out[1], as_compiled[1], rtol=1e-4, atol=1e-5)
    assert model.enc[1].running_mean.isfinite().all()
    assert model.training  # the engine did not touch the caller's mode either
    torch.testing.assert_close(eng(x), as_compiled, rtol=1e-4, atol=1e-5)


def test_bf16_engine_returns_its_own_dtype_for_nonfinite_inputs():
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    x[0, 0, 4, 4] = float("nan")
    out = eng(x)
    assert out.dtype == eng(torch.randn(1, 1, 32, 32)).dtype == torch.bfloat16
    assert out.isnan().any()


class _DownUp(torch.nn.Module):
    """A U-Net's ops in one level — conv + BatchNorm + ReLU, max-pool, transposed conv,
    skip concat, 1×1 head — with fewer kernels for Inductor to build (C++ compiles on a
    cold cache: 42 s on CI's cores for the zoo's tiny U-Net)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU6())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        return self.head(torch.cat([self.up(self.mid(e)), e], dim=1))


@pytest.mark.slow
def test_inductor_propagates_nonfinite_as_eager():
    model = _DownUp().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.enc[1].running_mean.uniform_(-0.5, 0.5)
        model.enc[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, *SIZE)
    eng = segfast.compile(model, x, backend="inductor")
    for kind in KINDS:
        (bad,) = _corrupt((x,), kind)
        with torch.no_grad():
            assert_same_nonfinite(eng(bad), model(bad))


@pytest.mark.interpreter
@pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()),
    reason="triton backend needs a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize(("name", "output"), [("unet", "mask"), ("segnet", "logits")])
def test_triton_kernels_propagate_nonfinite_as_eager(name, output):
    """No reference fallback here: the kernels themselves keep NaN (where() epilogues,
    NaN-aware max-pool and argmax). Small sizes: the interpreter is slow."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.create(name, tiny=True).eval().to(device)
    (x,) = _inputs(name, model)
    x = x[..., :20, :24].to(device)
    eng = segfast.compile(model, x, backend="triton", output=output)
    assert "NaN/Inf run the eager model" not in eng.summary()
    for kind in ("nan-patch", "all-nan"):
        (bad,) = _corrupt((x,), kind)
        with torch.no_grad():
            ref = WithHead(model, output)(bad)
        assert_same_nonfinite(eng(bad).cpu(), ref.cpu())
