"""Test configuration shared by the whole suite.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1)
on CPU tensors; the variable must be set before any ``@triton.jit`` runs, so it
is set here, before test modules import the kernels. Tests marked ``gpu`` run
only when CUDA is present.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor compiles in a pool of worker processes, each importing torch (~4 CPU-s), in
# every test process that compiles; the tests' graphs are tiny: compiled in-process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


# Seconds each test module took in a cold-cache `make test` on CI's kind of machine
# (`python tests/module_seconds.py LOG` writes it from a `--durations=0` log). Only a
# scheduling hint: under pytest-xdist the modules are handed out longest first, so the
# last module a worker starts is a short one. Handed out in collection order, the Ray
# batch tests and the kernel compile check (minutes each) came last and one worker
# idled for minutes while the other finished them.
_MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")
_SECONDS_PER_UNKNOWN_TEST = 0.5


def _longest_modules_first(items: list[pytest.Item]) -> None:
    try:
        known: dict[str, float] = json.loads(_MODULE_SECONDS.read_text())
    except (OSError, ValueError):
        known = {}
    modules = [item.nodeid.split("::", 1)[0] for item in items]
    counts = Counter(modules)
    cost = {m: known.get(m, _SECONDS_PER_UNKNOWN_TEST * n) for m, n in counts.items()}
    order = sorted(range(len(items)), key=lambda i: -cost[modules[i]])  # stable
    items[:] = [items[i] for i in order]  # a module's tests keep their order


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _longest_modules_first(items)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- services that end with their module ---------------------------------------------
# A Ray instance or a `segfast serve` service lives in a session fixture (pytest-xdist
# tears module fixtures down whenever a worker runs out of queued tests, and starting
# them again costs tens of seconds). Left up until the worker ends, though, it costs
# CPU while every other module runs: an idle `segfast serve` (Ray, Serve's controller,
# proxy and replica) keeps ~0.3 of a core busy, a bare local Ray ~0.1 — minutes of
# CI's two cores. So a fixture hands its shutdown to ``at_module_end``, which runs it
# when the last test of the module that started it has finished in this process (all
# of a module's tests run in one process under ``--dist loadscope``; otherwise the
# count never reaches zero and the session's teardown does it). Shutdowns must be
# idempotent: the session teardown calls them again.
_MODULE_END: dict[Path, list] = {}  # a test module's file -> its shutdowns
_TESTS_LEFT: Counter | None = None  # a test module's file -> its tests not yet run here


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    global _TESTS_LEFT
    if _TESTS_LEFT is None:
        _TESTS_LEFT = Counter(i.path.resolve() for i in item.session.items)
    module = item.path.resolve()
    _TESTS_LEFT[module] -= 1
    if _TESTS_LEFT[module] <= 0:
        for shutdown in _MODULE_END.pop(module, []):
            shutdown()


@pytest.fixture(scope="session")
def at_module_end():
    """``at_module_end(__file__, fn)``: run ``fn`` once that test module has no test left
    to run in this process (at once if it has none)."""

    def register(module_file: str, shutdown) -> None:
        module = Path(module_file).resolve()
        if _TESTS_LEFT is not None and _TESTS_LEFT[module] <= 0:
            shutdown()
        else:
            _MODULE_END.setdefault(module, []).append(shutdown)

    return register


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
# sanitizer on: the convolution kernels' own tests (the most index arithmetic, and the
# int64-offset variant). Elsewhere it is off: on the tiny shapes tests use no index can
# come near 2**31, and the sanitizer (an int64 recomputation and an assert after every
# integer add, sub and mul) was half of the interpreter's time on whole models and a
# fifth of it on the other kernels' tests (CI time).
_SANITIZED = ("tests/kernels/test_conv2d.py",)


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` (``inspect.getmembers`` over tl,
    tl.tensor and tl.math: ~2 ms) at every launch *and at every call of a @triton.jit
    helper inside it* — for every program of the grid. The launch's patch already covers
    the helpers (the language modules are the same objects), and the helpers' patches
    are never restored (they only set again what the launch set), so inside a launch a
    helper whose language modules the launch patched skips it. What runs is unchanged;
    up to a fifth of a test's interpreter time was this re-patching (CI time). Another
    Triton whose interpreter lacks these names is left as it is."""
    try:
        from triton import language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    patch_lang = getattr(interp, "_patch_lang", None)
    executor = getattr(interp, "GridExecutor", None)
    scope_type = getattr(interp, "_LangPatchScope", None)
    if patch_lang is None or executor is None or scope_type is None:
        return
    if getattr(patch_lang, "_segfast_once_per_launch", False):
        return
    launch: dict[str, object] = {"active": False, "patched": frozenset()}

    @functools.cache  # asked at every helper call of every program: once per function
    def langs_of(fn) -> frozenset[int]:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def once_per_launch(fn):
        langs = langs_of(fn)
        if launch["active"] and langs <= launch["patched"]:
            return scope_type()  # nothing set, nothing to restore
        scope = patch_lang(fn)
        if launch["active"]:
            launch["patched"] = launch["patched"] | langs
        return scope

    once_per_launch._segfast_once_per_launch = True
    run_grid = executor.__call__

    def call(self, *args, **kwargs):
        launch["active"], launch["patched"] = True, frozenset()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launch["active"], launch["patched"] = False, frozenset()

    interp._patch_lang = once_per_launch
    executor.__call__ = call


def _cheaper_interpreter_types() -> None:
    """Triton's interpreter runs the language's type checking for real, in every op of
    every program, and pays for bookkeeping there that compiling pays once:
    ``broadcast_impl_value`` compares the operands' shapes (tuples) with the result's (a
    list), always finds them different and broadcasts both operands of every binary op
    to the shape they already have (two views, two tensors, two block types); every
    block type is built anew (``with_element_ty``, and ``block_type.to_ir`` →
    ``get_block_ty`` for every splat); ``_get_np_dtype`` rebuilds an 18-entry table at
    every call. Here operands of one shape are returned as they are, block types
    (element type and shape: immutable values) are made once, and numpy dtypes are
    looked up by type name. What runs is unchanged; a Triton-backend test's time went
    43 → 33 s (CI time). Another Triton without these names is left as it is."""
    try:
        from triton.language import core as tl_core
        from triton.language import semantic
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    sem = getattr(semantic, "TritonSemantic", None)
    builder = getattr(interp, "InterpreterBuilder", None)
    block_type = getattr(tl_core, "block_type", None)
    if sem is None or builder is None or block_type is None:
        return
    broadcast = getattr(sem, "broadcast_impl_value", None)
    if broadcast is None or getattr(broadcast, "_segfast_fast", False):
        return

    def broadcast_impl_value(self, lhs, rhs):
        lt, rt = lhs.type, rhs.type
        if lt.is_block() and rt.is_block() and lt.get_block_shapes() == rt.get_block_shapes():
            return lhs, rhs
        return broadcast(self, lhs, rhs)

    broadcast_impl_value._segfast_fast = True
    sem.broadcast_impl_value = broadcast_impl_value
    types: dict[tuple, object] = {}

    def block_of(dtype, shape):
        key = (dtype, tuple(shape))
        try:
            ty = types.get(key)
        except TypeError:  # an unhashable element type (a pointer): made each time
            return block_type(dtype, shape)
        if ty is None:
            ty = types[key] = block_type(dtype, shape)
        return ty

    builder.get_block_ty = lambda self, dtype, shape: block_of(dtype, shape)
    block_type.with_element_ty = lambda self, scalar_ty: block_of(scalar_ty, self.shape)
    np_dtype = getattr(interp, "_get_np_dtype", None)
    if np_dtype is not None:  # rebuilds a table of 18 types at every call
        by_name: dict[str, object] = {}

        def get_np_dtype(tt_dtype):
            name = getattr(tt_dtype, "name", None)
            found = by_name.get(name) if isinstance(name, str) else None
            if found is None:
                found = np_dtype(tt_dtype)
                if isinstance(name, str):
                    by_name[name] = found
            return found

        interp._get_np_dtype = get_np_dtype


if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()
    _cheaper_interpreter_types()


def _scan_torchlib_once() -> None:
    """Every ``torch.onnx.export`` builds its registry from onnxscript's torchlib, and
    onnxscript's ``get_torchlib_ops`` re-parses the source of its ~500 functions each
    time (``inspect.getsource`` + ``ast.parse``, only to read each one's domain): 1.2 s of
    every export, 73 exports in the suite (CI time). The list it returns (name, the
    registry's own function objects, domain) does not change within a process, so the
    tests scan once and hand each export a fresh copy of the list. Another torch or
    onnxscript without these names is left as it is."""
    try:
        from torch.onnx._internal import _lazy_import
    except ImportError:
        return
    lazy = getattr(_lazy_import, "onnxscript_apis", None)
    name = getattr(lazy, "_name", None)  # a _LazyModule; the module itself has __name__
    try:
        module = importlib.import_module(name or lazy.__name__)
    except (ImportError, AttributeError):
        return  # no onnxscript: the ONNX tests skip
    scan = getattr(module, "get_torchlib_ops", None)
    if scan is None or getattr(scan, "_segfast_once", False):
        return
    once = functools.cache(scan)

    def get_torchlib_ops():
        return list(once())

    get_torchlib_ops._segfast_once = True
    module.get_torchlib_ops = get_torchlib_ops


_scan_torchlib_once()


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
