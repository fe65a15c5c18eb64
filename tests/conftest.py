"""Test configuration shared by the whole suite.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1)
on CPU tensors; the variable must be set before any ``@triton.jit`` runs, so it
is set here, before test modules import the kernels. Tests marked ``gpu`` run
only when CUDA is present.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_xdist_worker() -> None:
    """Under pytest-xdist each worker gets one intra-op thread.

    The test models are tiny, and with two workers on two cores, OpenMP's
    spinning threads oversubscribe the cores (a zoo test run went from ~22 s
    to ~95 s with the default thread count under such load).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


# Tests whose Triton kernels run under the interpreter with its integer-overflow
# sanitizer on: the kernels' own tests. Elsewhere (whole models on the `triton`
# backend, int8 engines, edge networks) it is off: on the tiny shapes these tests use no
# index can come near 2**31, and the sanitizer (an int64 recomputation and an assert
# after every integer add, sub and mul) was half of the interpreter's time there.
_SANITIZED = ("tests/kernels/",)


@pytest.fixture(autouse=True)
def _interpreter_overflow_checks(request: pytest.FixtureRequest) -> None:
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not hasattr(options, "sanitize_overflow"):
        return  # another Triton: leave its interpreter as it is
    path = request.node.path.as_posix()
    want = any(f"/{part}" in path for part in _SANITIZED)
    if options.sanitize_overflow != want:
        builder.options = dataclasses.replace(options, sanitize_overflow=want)
