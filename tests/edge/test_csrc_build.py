"""csrc/ compiles: nvcc (the Makefile, sm_87 Jetson Orin and sm_90 Hopper, warnings as
errors) and NVRTC (what segfast.edge does at load time), with each kernel's parameter the
size of the argument record the runtime passes.

No GPU is needed for either; CI's machine has nvcc, so the nvcc test runs there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from segfast.edge import kernels as K

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("87", "90")


def test_sources_ship_as_package_data():
    """segfast.edge finds the .cu files through the package (pyproject maps csrc/ to
    segfast.edge.csrc), so an installed segfast can compile them with NVRTC."""
    d = K.source_dir()
    for name in (*K.SOURCES, K.HEADER):
        assert (d / name).read_bytes() == (CSRC / name).read_bytes()


def test_kernel_locations_are_checked(tmp_path):
    from segfast.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="neither 'nvrtc'"):
        K.load_images(tmp_path, "sm_87")
    (tmp_path / "sm_87").mkdir()
    with pytest.raises(BackendUnavailable, match=r"make -C csrc ARCHS=87"):
        K.load_images(tmp_path, "sm_87")


def test_every_source_is_built():
    """The Makefile, the runtime and these tests agree on the .cu files."""
    on_disk = sorted(p.name for p in CSRC.glob("*.cu"))
    assert on_disk == sorted(K.SOURCES)
    makefile = (CSRC / "Makefile").read_text()
    assert re.search(r"^SOURCES := (.*)$", makefile, re.M).group(1).split() == list(K.SOURCES)
    for source in K.SOURCES:
        text = (CSRC / source).read_text()
        entries = set(re.findall(r"^SF_\w+_KERNEL\((\w+),", text, re.M))
        assert entries == {k for k, s in K.KERNEL_SOURCE.items() if s == source}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_nvcc_builds_cubins_for_orin_and_hopper(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["make", "-C", str(CSRC), f"BUILD={tmp_path}", f"ARCHS={' '.join(ARCHS)}"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # one nvcc call per architecture, every source in it
    assert proc.stdout.count("nvcc ") == len(ARCHS), proc.stdout
    for arch in ARCHS:
        for source in K.SOURCES:
            cubin = tmp_path / f"sm_{arch}" / (Path(source).stem + ".cubin")
            assert cubin.is_file()
            assert cubin.read_bytes()[:4] == b"\x7fELF"  # a cubin is an ELF image
            assert cubin.stat().st_size > 1000
        images = K.load_images(tmp_path, f"sm_{arch}")  # how EdgeEngine(kernels=dir) loads
        assert sorted(images) == sorted(K.SOURCES)
        assert images["overlay.cu"] == (tmp_path / f"sm_{arch}" / "overlay.cubin").read_bytes()
    print(f"nvcc: {len(ARCHS)} architectures × {len(K.SOURCES)} sources in {seconds:.1f} s")


def _nvrtc_or_skip():
    pytest.importorskip("cuda.bindings", reason="cuda-python (segfast[edge]) not installed")
    _, nvrtc = K.cuda_bindings()
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:  # cuda-python raises its own loader errors without libnvrtc
        pytest.skip(f"libnvrtc not found ({type(exc).__name__}: {exc})")


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in ARCHS])
def test_nvrtc_compiles_each_kernel_with_the_runtime_record(arch):
    _nvrtc_or_skip()
    for source in K.SOURCES:
        cubin, ptx = K.compile_source(CSRC / source, arch)
        assert cubin[:4] == b"\x7fELF"
        text = ptx.rstrip(b"\0").decode()
        assert f".target {arch}" in text
        # .entry NAME(.param .align 8 .b8 NAME_param_0[SIZE]): one struct parameter
        entries = dict(
            (name, (int(align), int(size)))
            for name, align, size in re.findall(
                r"\.entry (\w+)\(\s*\.param \.align (\d+) \.b8 \w+\[(\d+)\]\s*\)", text
            )
        )
        want = {k for k, s in K.KERNEL_SOURCE.items() if s == source}
        assert set(entries) == want, text[:2000]
        for name, (align, size) in entries.items():
            assert size == K.KERNEL_ARGS[name].itemsize, name
            assert align == K.KERNEL_ARGS[name].alignment, name


def test_nvrtc_compiles_a_source_directory():
    _nvrtc_or_skip()
    images = K.load_images(CSRC, "sm_87")  # EdgeEngine(kernels="path/to/csrc")
    assert sorted(images) == sorted(K.SOURCES)
    assert all(img[:4] == b"\x7fELF" for img in images.values())


def test_nvrtc_reports_compile_errors(tmp_path):
    _nvrtc_or_skip()
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(int* p) { p[0] = undefined_name; }\n')
    with pytest.raises(RuntimeError, match="undefined_name"):
        K.compile_source(bad, "sm_90")
