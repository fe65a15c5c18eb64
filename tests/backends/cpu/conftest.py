"""The CPU plan's tests exercise segfast's direct kernels on every CPU: the plan uses
them only where AVX-512 is (``Native.wide_vectors``: elsewhere oneDNN is faster), but
they compute the same numbers everywhere, so the tests turn them on here; one test
(test_plan.py) checks the choice itself."""

from __future__ import annotations

import pytest

from segfast.backends.cpu import native


@pytest.fixture
def lowered_plans(monkeypatch):
    """Every :class:`~segfast.backends.cpu.plan.Plan` the torch backend lowers while the
    test runs, in order (to look at its steps)."""
    from segfast.backends.cpu import plan

    plans = []
    lower = plan.lower
    monkeypatch.setattr(plan, "lower", lambda *a, **k: plans.append(lower(*a, **k)) or plans[-1])
    return plans


@pytest.fixture(autouse=True)
def direct_kernels_everywhere(request, monkeypatch):
    if "narrow_vectors" in request.keywords:
        return
    lib = native.load()
    if lib is not None:
        monkeypatch.setattr(lib, "wide_vectors", True)
