"""Building and loading segfast's CPU kernels, and the reasons given when they can't be."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from segfast.backends.cpu import native

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU kernels build on Linux")


def _probe(env: dict[str, str]) -> str:
    code = "from segfast.backends.cpu import native; print(native.status())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip()


def test_builds_and_loads_here():
    ok, why = native.status()
    assert ok, why
    lib = native.load()
    assert lib is not None
    assert lib.path.exists()
    assert lib.path.parent == native.cache_dir()


def test_cache_key_follows_the_source(tmp_path, monkeypatch):
    cc = native._compiler()
    key = native._key(cc)
    assert key == native._key(cc)  # stable
    src = tmp_path / "segfast_cpu.c"
    src.write_bytes(native.SOURCE.read_bytes() + b"\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", src)
    assert native._key(cc) != key


def test_disabled_by_environment(tmp_path):
    out = _probe({"SEGFAST_CPU_NATIVE": "0", "SEGFAST_CACHE_DIR": str(tmp_path)})
    assert "(False, 'disabled by SEGFAST_CPU_NATIVE=0')" in out
    assert not any(tmp_path.rglob("*.so"))


def test_missing_compiler_is_reported(tmp_path):
    out = _probe({"CC": str(tmp_path / "no-such-cc"), "SEGFAST_CACHE_DIR": str(tmp_path)})
    assert out.startswith("(False,")
    assert "no-such-cc" in out


def test_failed_build_is_reported_and_leaves_no_file(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text(
        "#!/bin/sh\necho 'fake-cc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'boom' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    out = _probe({"CC": str(fake), "SEGFAST_CACHE_DIR": str(tmp_path / "cache")})
    assert out.startswith("(False,")
    assert "failed: boom" in out
    assert not list((tmp_path / "cache").rglob("*.so*"))


def test_fresh_cache_dir_builds(tmp_path):
    out = _probe({"SEGFAST_CACHE_DIR": str(tmp_path)})
    assert out.startswith("(True,")
    built = list((tmp_path / "cpu").glob("segfast_cpu-*.so"))
    assert len(built) == 1
    assert not list((tmp_path / "cpu").glob("*.tmp"))
