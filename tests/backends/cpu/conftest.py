"""The CPU plan's tests exercise segfast's direct kernels on every CPU: the plan uses
them only where AVX-512 is (``Native.wide_vectors``: elsewhere oneDNN is faster), but
they compute the same numbers everywhere, so the tests turn them on here; one test
(test_plan.py) checks the choice itself."""

from __future__ import annotations

import pytest

from segfast.backends.cpu import native


@pytest.fixture(autouse=True)
def direct_kernels_everywhere(request, monkeypatch):
    if "narrow_vectors" in request.keywords:
        return
    lib = native.load()
    if lib is not None:
        monkeypatch.setattr(lib, "wide_vectors", True)
