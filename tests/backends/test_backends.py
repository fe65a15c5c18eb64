"""The backend interface: availability, eager, inductor, auto."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import segfast
from segfast import BackendUnavailable, backends, models
from segfast.cli import main


def test_availability_lists_every_backend():
    avail = backends.availability("cpu")
    for name in ("eager", "torch", "inductor"):
        assert name in avail
        ok, why = avail[name]
        assert isinstance(ok, bool)
        assert why


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        segfast.compile(nn.Conv2d(3, 3, 1), input_shape=(1, 3, 8, 8), backend="nope")


def test_unknown_options_are_refused_with_a_hint():
    """Options are shared by every backend (auto hands them to each candidate), so each
    backend skips the others' keys — and a key no backend reads is a typo, refused."""
    m, shape = nn.Conv2d(3, 3, 1), (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['winogard'\].*'winograd'"):
        segfast.compile(m, input_shape=shape, backend="torch", options={"winogard": False})
    with pytest.raises(ValueError, match=r"\['bogus'\]"):
        segfast.compile(m, input_shape=shape, backend="auto", options={"bogus": 1})
    with pytest.raises(TypeError, match="options must be a dict"):
        segfast.compile(m, input_shape=shape, backend="torch", options=[("winograd", False)])
    # another backend's key is fine: ignored by this one
    eng = segfast.compile(m, input_shape=shape, backend="eager", options={"winograd": False})
    assert eng.backend == "eager"
    for b in backends.names():
        assert set(backends.get_backend(b).options) <= set(backends.known_options())


def test_eager_backend_is_the_model():
    model = models.create("segnet", tiny=True).eval()
    x = torch.randn(1, 3, 30, 34)
    eng = segfast.compile(model, x, backend="eager", output="mask")
    with torch.no_grad():
        assert torch.equal(eng(x).long(), model(x).argmax(1))
    assert "no fusion" in eng.summary()


@pytest.mark.slow
def test_inductor_backend():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    eng = segfast.compile(model, x, backend="inductor")
    report = segfast.check(eng, model, [x])
    assert report.passed, str(report)


@pytest.mark.slow
def test_every_inductor_engine_gets_a_compile_of_its_own():
    """Dynamo keeps its graphs per code object, up to ``recompile_limit``: with every
    engine wrapped in the same ``WithHead.forward``, the ninth model compiled in one
    process ran eagerly (rel-L2 exactly 0.0) and was timed as inductor. The limit is
    lowered to 1 here, so that the second model already showed it."""
    import torch._dynamo.config
    from torch._dynamo.utils import counters

    x = torch.randn(1, 3, 12, 12)
    with torch._dynamo.config.patch(recompile_limit=1):
        for width in (4, 5, 6):
            model = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1)
            )
            before = counters["stats"]["unique_graphs"]
            eng = segfast.compile(model.eval(), x, backend="inductor")
            assert counters["stats"]["unique_graphs"] > before, f"width {width}: nothing compiled"
            assert segfast.check(eng, model, [x]).passed


@pytest.mark.slow
def test_inductor_refuses_to_pass_eager_off_as_compiled():
    """A model TorchDynamo skips entirely compiles no graph: the build says so instead of
    handing back an engine that is eager under the inductor name."""

    class Skipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        @torch._dynamo.disable
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.raises(BackendUnavailable, match="compiled no graph"):
        segfast.compile(Skipped().eval(), torch.randn(1, 3, 8, 8), backend="inductor")


def test_auto_measures_and_reports_its_choice():
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(
        model, x, backend="auto", options={"candidates": ["torch", "eager"], "iters": 2}
    )
    assert eng.backend in ("torch", "eager")
    chosen = [c for c in eng.info.choice if c["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["backend"] == eng.backend
    assert all(c["ms"] > 0 for c in eng.info.choice)
    assert "auto chose" in eng.summary()


def _make_inductor_unavailable(monkeypatch):
    monkeypatch.setattr(
        type(backends.get_backend("inductor")),
        "availability",
        lambda self, device=None: (False, "pretend: no compiler on this machine"),
    )


def test_auto_skips_unavailable_candidates_with_reason(monkeypatch):
    _make_inductor_unavailable(monkeypatch)
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(
        model, x, backend="auto", options={"candidates": ["inductor", "torch"], "iters": 1}
    )
    skipped = next(c for c in eng.info.choice if c["backend"] == "inductor")
    assert skipped["ms"] is None
    assert skipped["reason"] == "pretend: no compiler on this machine"
    assert eng.backend == "torch"


def test_auto_with_nothing_runnable_says_why(monkeypatch):
    _make_inductor_unavailable(monkeypatch)
    model = models.create("unet", tiny=True).eval()
    with pytest.raises(BackendUnavailable, match=r"auto found no backend.*pretend"):
        segfast.compile(
            model, torch.randn(1, 1, 16, 16), backend="auto", options={"candidates": ["inductor"]}
        )


def test_auto_goes_on_past_a_backend_that_fails_to_build(monkeypatch):
    """A candidate's own failure (a KeyError in its lowering, say) is recorded, and auto
    takes the next candidate; with none left, it raises from that failure."""

    def broken(self, req):
        raise KeyError("to_nhwc_1")

    monkeypatch.setattr(type(backends.get_backend("torch")), "build", broken)
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    eng = segfast.compile(
        model, x, backend="auto", options={"candidates": ["torch", "eager"], "iters": 1}
    )
    assert eng.backend == "eager"
    failed = next(c for c in eng.info.choice if c["backend"] == "torch")
    assert failed["reason"] == "failed to build (KeyError: 'to_nhwc_1')"
    assert "auto: torch failed to build" in eng.summary()
    with pytest.raises(BackendUnavailable, match="torch: failed to build") as info:
        segfast.compile(model, x, backend="auto", options={"candidates": ["torch"]})
    assert isinstance(info.value.__cause__, KeyError)


def test_auto_rejects_unknown_candidates():
    with pytest.raises(ValueError, match="unknown auto candidate"):
        segfast.compile(
            models.create("unet", tiny=True),
            torch.randn(1, 1, 16, 16),
            backend="auto",
            options={"candidates": ["tpu"]},
        )


def test_unavailable_backend_says_why(monkeypatch):
    _make_inductor_unavailable(monkeypatch)
    with pytest.raises(BackendUnavailable, match="cannot run here: pretend"):
        segfast.compile(
            models.create("unet", tiny=True), torch.randn(1, 1, 16, 16), backend="inductor"
        )


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out
    assert "torch" in out


def test_an_exported_program_compiles_on_one_backend_and_on_auto():
    """``compile`` takes an ``ExportedProgram``; ``auto`` builds its candidates from the
    program itself (it used to call ``eval()`` on ``program.module()``, which refuses)."""
    model = models.create("unet", tiny=True).eval()
    x = torch.randn(1, 1, 32, 32)
    program = torch.export.export(model, (x,))
    eng = segfast.compile(program, x, backend="torch", output="mask")
    assert segfast.check(eng, model, [x]).passed
    auto = segfast.compile(
        program, x, backend="auto", options={"candidates": ["eager", "torch"], "iters": 1}
    )
    assert auto.backend in ("eager", "torch")
    assert segfast.check(auto, model, [x]).passed


def test_bf16_without_fast_cpu_convolutions_warns(monkeypatch):
    """bf16 on a CPU whose oneDNN has no bf16 convolutions compiles (correct) but warns
    that it is slow, and the summary says so; fp32 on the same CPU does not warn."""
    from segfast.compiler import ops

    monkeypatch.setattr(ops, "_mkldnn_ok", lambda dtype=torch.float32: dtype == torch.float32)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(segfast.SlowPrecisionWarning, match="AVX-512 BF16 or AMX"):
        eng = segfast.compile(model, x, backend="torch", precision="bf16")
    assert "~30× slower than fp32" in eng.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error", segfast.SlowPrecisionWarning)
        segfast.compile(model, x, backend="torch")
