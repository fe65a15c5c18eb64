"""Shared by the runtime tests: no pipeline thread outlives its test."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture(autouse=True)
def _no_stray_threads():
    """Every test leaves no pipeline thread behind (close() joins them)."""
    before = set(threading.enumerate())
    yield
    deadline = time.time() + 5
    while True:
        left = [
            t.name for t in set(threading.enumerate()) - before if t.name.startswith("segfast-")
        ]
        if not left:
            return
        if time.time() > deadline:
            raise AssertionError(f"pipeline threads still running: {left}")
        time.sleep(0.05)
