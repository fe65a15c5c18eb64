"""Keeping large CPU activations between frames (glibc malloc thresholds)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import memory
from segfast.compiler import ops

pytestmark = pytest.mark.skipif(not ops._mkldnn_ok(), reason="oneDNN is not usable here")


@pytest.fixture
def fresh(monkeypatch):
    memory.keep_large_allocations.cache_clear()
    yield
    memory.keep_large_allocations.cache_clear()


def test_env_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv("SEGFAST_KEEP_MEMORY", "0")
    assert memory.keep_large_allocations() == (False, "off (SEGFAST_KEEP_MEMORY=0)")


def test_not_glibc_is_said(fresh, monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    ok, why = memory.keep_large_allocations()
    assert not ok
    assert "not glibc" in why


class _FakeLibc:
    def __init__(self, accept: bool) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accept = accept

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(self.accept)


@pytest.mark.parametrize("accept", [True, False])
def test_thresholds_set_once(fresh, monkeypatch, accept):
    libc = _FakeLibc(accept)
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    ok, why = memory.keep_large_allocations()
    assert ok == accept
    assert libc.calls[0] == (memory.M_MMAP_THRESHOLD, memory.KEEP_BYTES)
    if accept:
        assert libc.calls[1] == (memory.M_TRIM_THRESHOLD, memory.KEEP_BYTES)
    else:
        assert "refused" in why
    memory.keep_large_allocations()
    assert len(libc.calls) == (2 if accept else 1)  # once per process


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 40, 3, padding=1)  # 40 × 170 × 170 × 4 B = 4.6 MB ≥ 1 MiB
        self.b = nn.Conv2d(40, 2, 1)

    def forward(self, x):
        return self.b(self.a(x).relu())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_engine_with_large_activations_keeps_them(fresh, monkeypatch):
    libc = _FakeLibc(True)
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    model = Wide().eval()
    x = torch.randn(1, 3, 170, 170)
    eng = segfast.compile(model, x, backend="torch")
    assert "activation memory: glibc keeps freed blocks" in eng.summary()
    assert libc.calls
    assert segfast.check(eng, model, x).passed
    memory.keep_large_allocations.cache_clear()
    libc.calls.clear()
    eng = segfast.compile(model, x, backend="torch", options={"keep_memory": False})
    assert "activation memory" not in eng.summary()
    assert not libc.calls
    small = segfast.compile(model, torch.randn(1, 3, 64, 64), backend="torch")  # 655 KB
    assert "activation memory" not in small.summary()
