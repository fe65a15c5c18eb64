"""``segfast bench``'s engine: every backend on the same inputs, timed and checked.

For one model, input size, batch and precision, each requested backend is
built with :func:`segfast.compile`, warmed up, timed over rotating input sets,
and compared with the fp32 eager model on the same inputs. A backend that
cannot run here is reported with its reason instead of numbers.

Timing: every backend is built, warmed up and checked first; then the timed
calls run in ``rounds`` rounds, each round giving every backend one block of
calls, in an order that rotates from round to round. Side by side in one run
means the same conditions: a slow minute of a shared machine lands on every
backend, not on whichever ran then. On the CPU each block starts after a short
pause and one untimed call, so the thread pool of the backend before it
(OpenMP, ONNX Runtime's spinning workers) has parked instead of competing for
the cores (measured on 2 cores: without the pause, alternating oneDNN and ONNX
Runtime made both 30–50 % slower). On the CPU each call is timed with
``time.perf_counter``; on a GPU the device time comes from CUDA events recorded
around the call and the host latency from the host clock after synchronising —
both are kept. Engines that replay CUDA graphs (triton) do so inside the timed
call. Warm-up runs are excluded; the input sets rotate so caches do not flatter
small inputs.

Peak memory: what the backend added at its peak while it was built, warmed up
and checked, over what the process held before (the other engines stay alive
for the interleaved timing): on a GPU ``torch.cuda.max_memory_allocated``
minus the allocated bytes before; on the CPU the process's peak resident set
size minus its resident size before (Linux's VmHWM, reset per backend after
``malloc_trim`` returns the pages earlier backends freed, so that no backend is
measured on memory another one left resident; elsewhere not reported). It counts
the engine's own weight copies (folded, prepacked, transformed), workspaces and the
activations alive at the peak; the model's weights, shared by all, are not counted.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

import segfast
from segfast._warnings import quiet_torch_internals
from segfast.metrics import compare
from segfast.precision import DTYPES, PRECISIONS
from segfast.stats import summarize, throughput
from segfast.timing import measure, median

# Backends segfast measures itself against; "ratio to the fastest peer" uses these.
PEERS = ("eager", "eager_cl", "inductor", "onnxruntime", "tensorrt")
INT8_BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt")
ALL_BACKENDS = ("eager", "eager_cl", "torch", "triton", "inductor", "onnxruntime", "tensorrt")
# Benchmark rows that are a backend with options: eager with channels_last memory.
VARIANTS = {"eager_cl": ("eager", {"channels_last": True})}


@dataclass
class Row:
    backend: str
    precision: str
    status: str  # "ok", "unavailable", "failed"
    reason: str = ""
    build_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # mean/p50/p90/p99/min/max/std
    device_ms: dict[str, float] = field(default_factory=dict)  # GPU only: CUDA-event time
    fps: float | None = None
    gflops_per_s: float | None = None
    gbytes_per_s: float | None = None
    activation_bytes: int | None = None
    peak_memory_bytes: int | None = None
    rel_l2: float | None = None
    max_abs: float | None = None
    mask_agreement: float | None = None
    torch_lowp_rel_l2: float | None = None  # PyTorch's own error in this precision
    accuracy_ok: bool | None = None
    accuracy_reason: str = ""
    vs_eager: float | None = None  # eager p50 / this p50 (higher is faster)
    vs_best_peer: float | None = None  # fastest peer's p50 / this p50
    floor_pct: float | None = None  # the fused plan's roofline floor / this p50, × 100
    cuda_graph: bool = False
    samples_s: list[float] = field(default_factory=list)  # host latency, every timed call
    device_samples_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    model: str
    input_shape: tuple[int, ...]
    batch: int
    precision: str
    output: str
    device: str
    warmup: int
    iters: int
    flops: int
    environment: dict[str, Any]
    rows: list[Row]
    # The fused plan's roofline floor on this device (segfast.bench.roofline), when the
    # device is in its table; estimated for the CPU. None: unknown device, or no plan.
    floor_ms: float | None = None
    floor_device: str | None = None
    floor_estimated: bool = False

    def row(self, backend: str) -> Row:
        return next(r for r in self.rows if r.backend == backend)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = "segfast-bench/1"
        return d


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, versions and date, for the JSON report."""
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "segfast": segfast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "onnxruntime", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    env["device_name"] = env.get("gpu") or env["cpu"]
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


class _RssPeak:
    """Peak resident set size of this process between enter and exit (Linux).

    The kernel's high-water mark (``VmHWM`` in /proc/self/status) is reset on
    entry by writing 5 to /proc/self/clear_refs and read on exit: exact, and no
    sampling thread to steal a core from the timed work (on 2 cores a 2 ms sampler
    thread made OpenMP barriers wait and slowed small models 50×).
    """

    def __init__(self) -> None:
        self.peak = 0  # bytes above the resident size at entry

    @staticmethod
    def supported() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return _RssPeak._hwm() > 0
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def _hwm() -> int:
        return _RssPeak._status("VmHWM:")

    def __enter__(self) -> _RssPeak:
        # Memory earlier backends freed stays resident in malloc's free lists; a backend
        # measured after them would reuse it without the resident size growing (eager
        # showed 0.5 KiB after the torch engine, 14 MiB alone). Hand every free page back
        # first, so that each backend's peak counts the pages it touches itself.
        gc.collect()
        _trim_heap()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(0, self._hwm() - self.base)


def _trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: return the free pages of every malloc arena to the
    system (they stay mapped, but no longer resident). Elsewhere a no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return
    if trim is not None:
        trim(0)


def _peak_memory(device: torch.device) -> Any:
    if device.type == "cuda":
        return _CudaPeak(device)
    return _RssPeak() if _RssPeak.supported() else None


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> _CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


def parse_backends(text: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if "all" in names:
        return list(ALL_BACKENDS)
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise ValueError(
            f"unknown backend(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}, all"
        )
    return names


def run_benchmark(
    model: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    *,
    name: str,
    backends: Sequence[str] = ALL_BACKENDS,
    precision: str | Sequence[str] = "fp32",
    output: str = "logits",
    warmup: int = 5,
    iters: int = 30,
    device: str | torch.device = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    engines: dict[str, Any] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    rounds: int = 5,
    pause_s: float = 0.05,
    calibration: Any = None,
) -> BenchResult:
    """Benchmark ``model`` on every backend in ``backends``.

    ``inputs`` is a list of input sets (tuples), rotated through while timing;
    the accuracy columns compare each engine with the fp32 eager model on all
    of them. ``engines`` may supply prebuilt engines by backend name (used by
    tests to benchmark a deliberately wrong engine). ``on_progress(backend,
    done, total)`` is called after every timed iteration. The ``iters`` timed
    calls per backend are split over ``rounds`` interleaved rounds (see the
    module docstring); ``pause_s`` is the CPU pause before each block.

    ``precision`` may list several ("fp32,bf16,int8"): one row per backend and
    precision, all timed in the same interleaved rounds. int8 rows need
    ``calibration`` (``segfast.compile``'s); ×eager is against the fp32 eager row
    where there is one, ×best peer against the fastest correct fp32 peer.
    """
    from segfast.bench.modelstats import model_stats
    from segfast.outputs import WithHead

    dev = torch.device(device)
    model = model.eval().to(dev)
    sets = [tuple(t.to(dev) for t in s) for s in inputs]
    if not sets:
        raise ValueError("run_benchmark needs at least one input set")
    precisions = [precision] if isinstance(precision, str) else list(precision)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {precisions}")
    flops = model_stats(model, sets[0]).flops
    floor = _floor(model, sets[0], precision=precisions[0], output=output, device=dev)
    reference = WithHead(model, output)
    with torch.inference_mode():
        refs = [reference(*(t.float() if t.is_floating_point() else t for t in s)) for s in sets]
    batch = int(sets[0][0].shape[0]) if sets[0][0].dim() else 1
    rows: list[Row] = []
    built: list[tuple[Row, Any]] = []
    for prec in precisions:
        lowp_ref = _lowp_reference(reference, sets, prec)
        for be in backends:
            engine = (engines or {}).get(be)
            if engine is not None and engine.precision != prec:
                engine = None
            row, engine = _prepare(
                be, model, sets, refs, lowp_ref, precision=prec, output=output, warmup=warmup,
                device=dev, options=(options or {}).get(be, {}), engine=engine,
                calibration=calibration,
            )  # fmt: skip
            rows.append(row)
            if engine is not None:
                built.append((row, engine))
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _time_interleaved(built, sets, iters=iters, rounds=rounds, pause_s=pause_s, device=dev,
                      on_progress=on_progress)  # fmt: skip
    for row, engine in built:
        if row.status == "ok":
            _finish(row, engine, flops=flops, batch=batch)
    del built
    _ratios(rows)
    if floor is not None:
        _floor_pct([r for r in rows if r.precision == precisions[0]], floor[0])
    return BenchResult(
        model=name,
        input_shape=tuple(sets[0][0].shape),
        batch=batch,
        precision=",".join(precisions),
        output=output,
        device=str(dev),
        warmup=warmup,
        iters=iters,
        flops=flops,
        environment=environment(dev),
        rows=rows,
        floor_ms=None if floor is None else 1e3 * floor[0],
        floor_device=None if floor is None else floor[1].title,
        floor_estimated=floor is not None and floor[1].estimated,
    )


def _lowp_reference(
    reference: nn.Module, sets: list[tuple[torch.Tensor, ...]], precision: str
) -> list[torch.Tensor] | None:
    """PyTorch's own fp16/bf16 result, for the contract's bound (None for fp32 and int8)."""
    if precision not in ("fp16", "bf16"):
        return None
    import copy

    dtype = DTYPES[precision]
    with quiet_torch_internals():
        lowp_model = copy.deepcopy(reference).to(dtype)
    with torch.inference_mode():
        return [lowp_model(*(t.to(dtype) if t.is_floating_point() else t for t in s)) for s in sets]


def _floor(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], *, precision: str, output: str,
    device: torch.device,
) -> tuple[float, Any] | None:  # fmt: skip
    """(seconds, the table's device): the roofline floor of the model's fused plan here,
    or None when the table does not know this device or the model has no plan."""
    from segfast.bench import roofline

    known = roofline.device_for(device)
    if known is None:
        return None
    try:
        roof = roofline.analyse(model, inputs, precision=precision, output=output,
                                backend=roofline.plan_backend(known))  # fmt: skip
    except Exception:  # a model export cannot capture still runs on the other backends
        return None
    return roof.floor_s(known), known


def _floor_pct(rows: list[Row], floor_s: float) -> None:
    for r in rows:
        if r.status == "ok" and r.latency_ms:
            p50 = r.device_ms.get("p50_ms") or r.latency_ms["p50_ms"]
            r.floor_pct = 100 * 1e3 * floor_s / p50


def _prepare(
    backend: str,
    model: nn.Module,
    sets: list[tuple[torch.Tensor, ...]],
    refs: list[torch.Tensor],
    lowp_ref: list[torch.Tensor] | None,
    *,
    precision: str,
    output: str,
    warmup: int,
    device: torch.device,
    options: dict[str, Any],
    engine: Any,
    calibration: Any = None,
) -> tuple[Row, Any]:
    """Build (or take), warm up and check one backend: (its row, the engine or None)."""
    from segfast.backends import available

    row = Row(backend=backend, precision=precision, status="ok")
    backend, extra = VARIANTS.get(backend, (backend, {}))
    options = {**extra, **options}
    if engine is None:
        try:
            ok, why = available(backend, device)
        except ValueError as exc:  # not registered in this installation
            ok, why = False, str(exc)
        if not ok:
            row.status, row.reason = "unavailable", why
            return row, None
        if precision == "int8" and backend not in INT8_BACKENDS:
            row.status, row.reason = "unavailable", f"{backend} has no int8 path"
            return row, None
        if precision == "int8" and calibration is None:
            row.status, row.reason = "unavailable", "int8 needs calibration inputs"
            return row, None
    peak = _peak_memory(device)
    try:
        with peak if peak is not None else _Null():
            if engine is None:
                t0 = time.perf_counter()
                engine = segfast.compile(
                    model, sets[0], backend=backend, precision=precision, output=output,
                    device=device, options=options,
                    calibration=calibration if precision == "int8" else None,
                )  # fmt: skip
                row.build_s = time.perf_counter() - t0
            else:
                row.build_s = engine.info.build_seconds
            for s in sets:
                engine.check_inputs(s)
            measure(engine.run_unchecked, sets, warmup=warmup, iters=0, device=device)
            with torch.inference_mode():
                outs = [engine.run_unchecked(*s) for s in sets]
    except segfast.BackendUnavailable as exc:
        row.status, row.reason = "unavailable", str(exc).splitlines()[0]
        return row, None
    except Exception as exc:  # a backend failing on this model is a result, not a crash
        _failed(row, exc)
        return row, None
    if peak is not None:
        row.peak_memory_bytes = int(peak.peak)
    _accuracy(row, outs, refs, lowp_ref, precision, output)
    return row, engine


def _failed(row: Row, exc: BaseException) -> None:
    row.status = "failed"
    text = str(exc).strip()
    row.reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _time_interleaved(
    built: list[tuple[Row, Any]],
    sets: list[tuple[torch.Tensor, ...]],
    *,
    iters: int,
    rounds: int,
    pause_s: float,
    device: torch.device,
    on_progress: Callable[[str, int, int], None] | None,
) -> None:
    """``iters`` timed calls per engine in ``rounds`` blocks, the order rotating."""
    rounds = max(1, min(rounds, iters)) if iters > 0 else 0
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    done: dict[int, int] = {id(row): 0 for row, _ in built}
    several = len({row.precision for row, _ in built}) > 1
    for r in range(rounds):
        k = r % len(built) if built else 0
        for row, engine in built[k:] + built[:k]:
            if row.status != "ok":
                continue
            if device.type == "cpu" and pause_s > 0:
                time.sleep(pause_s)

            def tick(i: int, row: Row = row, base: int = done[id(row)]) -> None:
                if on_progress is not None:
                    label = f"{row.backend} {row.precision}" if several else row.backend
                    on_progress(label, base + i + 1, iters)

            try:
                samples = measure(engine.run_unchecked, sets, warmup=1, iters=per_round[r],
                                  device=device, on_iteration=tick)  # fmt: skip
            except Exception as exc:  # failing while timed: a result, not a crash
                _failed(row, exc)
                continue
            row.samples_s.extend(samples.host_s)
            row.device_samples_s.extend(samples.device_s)
            done[id(row)] += per_round[r]


def _finish(row: Row, engine: Any, *, flops: int, batch: int) -> None:
    """Latency statistics and throughput from the row's samples."""
    if not row.samples_s:
        return
    row.latency_ms = summarize(row.samples_s).as_dict()
    if row.device_samples_s:
        row.device_ms = summarize(row.device_samples_s).as_dict()
    timed = median(row.device_samples_s or row.samples_s)
    row.fps = throughput(batch, timed)
    row.gflops_per_s = flops / timed / 1e9
    info = engine.info
    row.activation_bytes = info.bytes_after if info.bytes_after is not None else info.bytes_before
    if row.activation_bytes:
        row.gbytes_per_s = row.activation_bytes / timed / 1e9
    row.cuda_graph = bool(getattr(engine._runner, "cuda_graph", False))
    row.notes = list(info.notes)


class _Null:
    peak = 0

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _accuracy(
    row: Row,
    outs: list[torch.Tensor],
    refs: list[torch.Tensor],
    lowp_ref: list[torch.Tensor] | None,
    precision: str,
    output: str = "logits",
) -> None:
    """Worst accuracy over the input sets, judged by segfast.check's contract (int8: on
    the benchmark's inputs, which are not held out from its calibration unless the
    caller's calibration is other data)."""
    from segfast.metrics import (
        FP32_MAX_REL,
        INT8_MAX_REL,
        INT8_MIN_AGREEMENT,
        LOWP_FACTOR,
        LOWP_MAX_REL,
        MIN_MASK_AGREEMENT,
        class_masks,
    )

    accs = [compare(o, r) for o, r in zip(outs, refs, strict=True)]
    row.rel_l2 = max(a.rel_l2 for a in accs)
    row.max_abs = max(a.max_abs for a in accs)
    agreements = [a.mask_agreement for a in accs if a.mask_agreement is not None]
    row.mask_agreement = min(agreements) if agreements else None
    reasons = []
    if any(a.nonfinite for a in accs):
        reasons.append(f"{sum(a.nonfinite for a in accs)} non-finite values")
    integer = not outs[0].is_floating_point()
    if precision == "int8":
        masks = [
            (class_masks(o, output), class_masks(r, output))
            for o, r in zip(outs, refs, strict=True)
        ]
        if all(mo is not None and mr is not None for mo, mr in masks):
            row.mask_agreement = min(float((mo == mr).double().mean()) for mo, mr in masks)
            if row.mask_agreement < INT8_MIN_AGREEMENT:
                reasons.append(f"mask agreement {100 * row.mask_agreement:.2f}%")
        elif row.rel_l2 > INT8_MAX_REL:
            reasons.append(f"rel-L2 {row.rel_l2:.2e} > {INT8_MAX_REL:g}")
    elif integer:
        if row.mask_agreement is not None and row.mask_agreement < MIN_MASK_AGREEMENT:
            reasons.append(f"mask agreement {100 * row.mask_agreement:.2f}%")
    elif precision == "fp32":
        if row.rel_l2 > FP32_MAX_REL:
            reasons.append(f"rel-L2 {row.rel_l2:.2e} > {FP32_MAX_REL:g}")
    else:
        own = max(compare(lp, r).rel_l2 for lp, r in zip(lowp_ref or [], refs, strict=True))
        row.torch_lowp_rel_l2 = own
        if row.rel_l2 > LOWP_MAX_REL or row.rel_l2 > max(LOWP_FACTOR * own, 1e-6):
            reasons.append(f"rel-L2 {row.rel_l2:.2e} vs PyTorch's own {own:.2e}")
    row.accuracy_ok = not reasons
    row.accuracy_reason = "; ".join(reasons)


def _ratios(rows: list[Row]) -> None:
    """×eager against the eager row (fp32 where there is one); ×best peer against the
    fastest correct peer (among fp32 rows, where there are any)."""
    ok = [r for r in rows if r.status == "ok" and r.latency_ms]

    def p50(r: Row) -> float:
        return r.device_ms.get("p50_ms") or r.latency_ms["p50_ms"]

    eagers = [r for r in ok if r.backend == "eager"]
    eager = next((r for r in eagers if r.precision == "fp32"), eagers[0] if eagers else None)
    peers = [r for r in ok if r.backend in PEERS and r.accuracy_ok]
    if any(r.precision == "fp32" for r in peers):
        peers = [r for r in peers if r.precision == "fp32"]
    best_peer = min((p50(r) for r in peers), default=None)
    for r in ok:
        if eager is not None:
            r.vs_eager = p50(eager) / p50(r)
        if best_peer is not None:
            r.vs_best_peer = best_peer / p50(r)
