"""Build and load segfast's CPU kernels (``segfast_cpu.c``) on first use.

The C source ships with the package and is compiled on the machine it runs on
(``cc -O3 -march=native -fopenmp``), once: the library is cached under
``$SEGFAST_CACHE_DIR`` (default ``~/.cache/segfast``) in ``cpu/``, named by a
hash of the source, the flags, the compiler's version and this CPU's feature
flags, and written atomically (a half-built file is never loaded). A cached
library is reused by every later process; building takes 10–20 s
(18 s of gcc -O3 on 2 cores of an AVX2 EPYC), once per source version and machine.

It is loaded only where it shares torch's OpenMP runtime (Linux, torch's ATen
parallel backend OpenMP, and after loading exactly one OpenMP runtime mapped in
the process): two runtimes would each keep a pool of spinning threads on the
same cores. Where any of this fails — no C compiler, a failed build, another
OpenMP runtime, ``SEGFAST_CPU_NATIVE=0`` — :func:`load` returns ``None`` and
:func:`status` says why; the ``torch`` backend then runs everything on oneDNN
and the engine's summary carries the reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("segfast_cpu.c")
ABI_VERSION = 22
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]
_OMP_LIBS = re.compile(r"lib(gomp|iomp\d*|omp)[-.\w]*\.so")

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_INT = ctypes.c_int
_FLOAT = ctypes.c_float


class NativeUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("SEGFAST_CACHE_DIR")
    if root:
        return Path(root) / "cpu"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segfast" / "cpu"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (install gcc or set CC)")
    return cc


def _cpu_flags() -> str:
    """This CPU's feature flags (the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cc: str) -> str:
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {exc}") from exc
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(),
                 _cpu_flags().encode(), platform.machine().encode()):  # fmt: skip
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            raise NativeUnavailable(
                f"building {SOURCE.name} with {cc} failed: {err[0] if err else proc.returncode}"
            )
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as exc:
        raise NativeUnavailable(f"building {SOURCE.name} with {cc} timed out") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _omp_runtimes() -> set[str]:
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(" ", 1)[-1].strip()
            if path.startswith("/") and _OMP_LIBS.search(os.path.basename(path)):
                found.add(os.path.realpath(path))
    return found


class Native:
    """The loaded library with its functions' ctypes signatures."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        # The direct kernels (atrous depthwise, narrow convs, the fused upsample +
        # depthwise/separable) hold 16-float vectors in registers: one AVX-512 register
        # each. Without AVX-512 every vector is two AVX2 registers of 16, the kernels
        # spill, and oneDNN is faster (DeepLab v3+ MobileNetV2 at 512² on an AVX2 EPYC:
        # 738 ms with them, 175 ms without). Winograd, the heads, the SE gate and the
        # inverted residual blocks use one register of lanes (``lanes``) and run on
        # either. The plan asks this before using the 16-lane direct kernels.
        flags = set(_cpu_flags().split())
        self.wide_vectors = "avx512f" in flags
        # sf_dwconv8 (8-lane vectors, one AVX2 register) is the depthwise kernel for
        # CPUs without AVX-512; it needs AVX2 and FMA to beat oneDNN (see
        # depthwise.vec8_worthwhile).
        self.avx2 = {"avx2", "fma"} <= flags
        # fp32 lanes of one register in this build (16 with AVX-512, 8 without): the
        # width sf_invres wants its padded channel counts to be a multiple of.
        lanes = lib.sf_lanes
        lanes.restype = _INT
        lanes.argtypes = []
        self.lanes = int(lanes())
        self.dwconv2d = lib.sf_dwconv2d
        self.dwconv2d.restype = None
        self.dwconv2d.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR, _I64, _I64, _PTR] + [_I64] * 6
            + [_PTR] + [_I64] * 5 + [_PTR] + [_I64] * 3 + [_INT, _INT, _FLOAT]
        )  # fmt: skip
        self.dwconv8 = lib.sf_dwconv8
        self.dwconv8.restype = _INT
        self.dwconv8.argtypes = self.dwconv2d.argtypes
        self.wino_in = lib.sf_wino_in
        self.wino_in.restype = None
        self.wino_in.argtypes = [_PTR] + [_I64] * 15 + [_PTR]
        self.wino_out = lib.sf_wino_out
        self.wino_out.restype = None
        self.wino_out.argtypes = (
            [_PTR] + [_I64] * 8 + [_PTR, _PTR] + [_I64] * 3 + [_INT, _INT, _FLOAT]
            + [_PTR] + [_I64] * 3
        )  # fmt: skip
        for name in ("resize_nchw", "resize_argmax"):
            fn = getattr(lib, f"sf_{name}")
            fn.restype = _INT
            fn.argtypes = (
                [_PTR, _INT] + [_I64] * 7 + [_PTR, _INT] + [_I64] * 2 + [_FLOAT, _FLOAT, _INT]
            )
            setattr(self, name, fn)
        self.resize_q8 = lib.sf_resize_q8
        self.resize_q8.restype = _INT
        self.resize_q8.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR] + [_I64] * 3 + [_FLOAT, _INT] + [_I64] * 2
            + [_FLOAT, _FLOAT, _INT]
        )  # fmt: skip
        self.up_taps = lib.sf_up_taps
        self.up_taps.restype = _INT
        self.up_taps.argtypes = (
            [_PTR] + [_I64] * 15 + [_FLOAT, _FLOAT, _INT, _PTR, _INT, _FLOAT, _PTR] + [_I64] * 3
            + [_PTR] + [_I64] * 4 + [_PTR, _INT]
        )  # fmt: skip
        self.invres = lib.sf_invres
        self.invres.restype = _INT
        self.invres.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR, _PTR, _INT, _FLOAT] + [_I64] * 2
            + [_PTR, _PTR] + [_I64] * 8 + [_INT, _FLOAT]
            + [_PTR, _PTR] + [_I64] * 2 + [_INT, _FLOAT]
            + [_PTR] + [_I64] * 5 + [_PTR] + [_I64] * 3 + [_INT]
        )  # fmt: skip
        self.invres_front = lib.sf_invres_front
        self.invres_front.restype = _INT
        self.invres_front.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR, _PTR, _INT, _FLOAT] + [_I64] * 2
            + [_PTR, _PTR] + [_I64] * 8 + [_INT, _FLOAT]
            + [_PTR] + [_I64] * 5 + [_PTR]
        )  # fmt: skip
        self.conv_narrow = lib.sf_conv_narrow
        self.conv_narrow.restype = _INT
        self.conv_narrow.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR, _PTR] + [_I64] * 6 + [_INT, _FLOAT, _PTR] + [_I64] * 6
        )  # fmt: skip
        self.conv_few = lib.sf_conv_few
        self.conv_few.restype = _INT
        self.conv_few.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR] + [_I64] * 3 + [_PTR] + [_I64] * 2 + [_PTR] + [_I64] * 5
            + [_INT, _FLOAT]
        )  # fmt: skip
        self.quantize_u8 = lib.sf_quantize_u8
        self.quantize_u8.restype = None
        self.quantize_u8.argtypes = [_PTR, _I64, _I64, _I64, _FLOAT, _INT, _PTR, _I64]
        self.fake_quant = lib.sf_fake_quant
        self.fake_quant.restype = None
        self.fake_quant.argtypes = [_PTR, _I64, _I64, _I64, _FLOAT, _PTR, _I64]
        self.se_gate = lib.sf_se_gate
        self.se_gate.restype = None
        self.se_gate.argtypes = (
            [_PTR, _INT] + [_I64] * 5 + [_PTR, _PTR, _I64, _INT, _FLOAT, _PTR, _PTR, _I64, _INT]
            + [_FLOAT, _PTR, _PTR, _PTR]
        )  # fmt: skip
        self.subpixel2 = lib.sf_subpixel2
        self.subpixel2.restype = None
        self.subpixel2.argtypes = (
            [_PTR] + [_I64] * 7 + [_PTR] + [_I64] * 3 + [_PTR, _INT, _FLOAT, _PTR] + [_I64] * 3
            + [_INT]
        )  # fmt: skip
        self.to_nhwc = lib.sf_to_nhwc
        self.to_nhwc.restype = None
        self.to_nhwc.argtypes = [_PTR] + [_I64] * 8 + [_PTR, _INT]
        self.resize_dw = lib.sf_resize_dw
        self.resize_dw.restype = _INT
        self.resize_dw.argtypes = (
            [_PTR] + [_I64] * 9 + [_FLOAT, _FLOAT, _INT, _PTR, _PTR] + [_I64] * 8
            + [_INT, _FLOAT, _PTR] + [_I64] * 6
        )  # fmt: skip


def _load() -> Native:
    if os.environ.get("SEGFAST_CPU_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise NativeUnavailable("disabled by SEGFAST_CPU_NATIVE=0")
    if sys.platform != "linux":
        raise NativeUnavailable(f"built only on Linux (this is {sys.platform})")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        raise NativeUnavailable("torch's ATen parallel backend is not OpenMP")
    before = _omp_runtimes()
    if len(before) > 1:
        raise NativeUnavailable(f"{len(before)} OpenMP runtimes are loaded already")
    cc = _compiler()
    target = cache_dir() / f"segfast_cpu-{_key(cc)}.so"
    if not target.exists():
        _build(cc, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise NativeUnavailable(f"loading {target} failed: {exc}") from exc
    after = _omp_runtimes()
    if len(after) > 1:
        raise NativeUnavailable(
            "the kernels would bring a second OpenMP runtime next to torch's: "
            + ", ".join(sorted(os.path.basename(p) for p in after))
        )
    if lib.sf_abi_version() != ABI_VERSION:
        raise NativeUnavailable(f"{target} has ABI {lib.sf_abi_version()}, need {ABI_VERSION}")
    return Native(lib, target)


@functools.cache
def _outcome() -> tuple[Native | None, str]:
    """Build/load once per process; a failure is remembered, not retried per call."""
    try:
        native = _load()
    except NativeUnavailable as exc:
        return None, str(exc)
    return native, f"built at {native.path}"


def load() -> Native | None:
    """The CPU kernels, or None where they cannot be used (see :func:`status`)."""
    return _outcome()[0]


def status() -> tuple[bool, str]:
    """(usable here, one line saying where the library is or why not)."""
    native, why = _outcome()
    return native is not None, why
