"""Reports of a benchmark run: the side-by-side table, JSON, and latency plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from segfast._io import atomic_path
from segfast.bench.runner import BenchResult, Row
from segfast.stats import format_bytes

SCHEMA = "segfast-bench/1"
# Keys every row of the JSON carries (tests check the schema against this).
ROW_KEYS = (
    "backend", "precision", "status", "reason", "build_s", "latency_ms", "device_ms", "fps",
    "gflops_per_s", "gbytes_per_s", "activation_bytes", "peak_memory_bytes", "rel_l2", "max_abs",
    "mask_agreement", "torch_lowp_rel_l2", "accuracy_ok", "accuracy_reason", "vs_eager",
    "vs_best_peer", "floor_pct", "cuda_graph", "samples_s", "device_samples_s", "notes",
)  # fmt: skip
COLUMNS = (
    "backend", "prec", "build s", "p50 ms", "p90 ms", "p99 ms", "mean ms", "fps", "GFLOP/s",
    "GB/s", "% of floor", "peak mem", "rel-L2", "max-abs", "mask %", "acc", "×eager", "×best peer",
)  # fmt: skip


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def row_cells(r: Row, estimated: bool = False) -> list[str]:
    """One row's cells; ``estimated`` marks the % of floor "~" (the CPU's estimated peaks)."""
    if r.status != "ok":
        return [r.backend, r.precision] + ["-"] * (len(COLUMNS) - 2)
    lat = r.device_ms or r.latency_ms
    acc = "ok" if r.accuracy_ok else "FAIL"
    return [
        r.backend + (" (graph)" if r.cuda_graph else ""),
        r.precision,
        _f(r.build_s, ".1f"),
        _f(lat.get("p50_ms"), ".2f"),
        _f(lat.get("p90_ms"), ".2f"),
        _f(lat.get("p99_ms"), ".2f"),
        _f(lat.get("mean_ms"), ".2f"),
        _f(r.fps, ".1f"),
        _f(r.gflops_per_s, ".1f"),
        _f(r.gbytes_per_s, ".2f"),
        "-" if r.floor_pct is None else ("~" if estimated else "") + format(r.floor_pct, ".1f"),
        format_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else "-",
        _f(r.rel_l2, ".1e"),
        _f(r.max_abs, ".1e"),
        _f(None if r.mask_agreement is None else 100 * r.mask_agreement, ".3f"),
        acc,
        _f(r.vs_eager, ".2f"),
        _f(r.vs_best_peer, ".2f"),
    ]


def header(res: BenchResult) -> str:
    env = res.environment
    shape = "×".join(map(str, res.input_shape))
    return (
        f"{res.model}  input {shape}  {res.precision}  output {res.output}  "
        f"on {env.get('device_name')} ({res.device})  "
        f"{res.flops / 1e9:.2f} GFLOP/run  warmup {res.warmup}, {res.iters} timed runs  "
        f"{env.get('date')}"
    )


def format_table(res: BenchResult) -> str:
    """A plain-text table (what `segfast bench` prints when rich is absent)."""
    rows = [list(COLUMNS)] + [row_cells(r, res.floor_estimated) for r in res.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [header(res)]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))  # fmt: skip
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += footnotes(res)
    return "\n".join(lines)


def footnotes(res: BenchResult) -> list[str]:
    out = []
    for r in res.rows:
        if r.status != "ok":
            out.append(f"{r.backend}: {r.status} — {r.reason}")
        elif not r.accuracy_ok:
            out.append(f"{r.backend}: ACCURACY FAIL — {r.accuracy_reason}")
    timing = "CUDA events (device time)" if res.device.startswith("cuda") else "perf_counter"
    out.append(
        f"latency: median of {res.iters} calls timed with {timing}; ×eager and ×best peer are "
        "p50 ratios (>1 = faster); peers: eager, eager_cl (channels_last), inductor, onnxruntime, "
        "tensorrt; accuracy vs fp32 eager on the same inputs"
    )
    if res.floor_ms is not None:
        out.append(
            f"% of floor: the fused plan's roofline floor, {res.floor_ms:.3f} ms on "
            f"{res.floor_device} in {res.precision.split(',')[0]} rows (segfast.bench.roofline), over the p50"
            + ("; ~: the CPU's peak is estimated (DRAM bandwidth unknown)"
               if res.floor_estimated else "")
        )  # fmt: skip
    return out


def print_table(res: BenchResult) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(res))
        return
    table = Table(title=header(res), title_justify="left")
    for i, c in enumerate(COLUMNS):
        table.add_column(c, justify="left" if i < 2 else "right", no_wrap=True)
    for r in res.rows:
        cells = row_cells(r, res.floor_estimated)
        style = None if r.status == "ok" and r.accuracy_ok else "red" if r.status == "ok" else "dim"
        table.add_row(*cells, style=style)
    console = Console(width=max(160, Console().width))
    console.print(table)
    for line in footnotes(res):
        console.print(line, highlight=False)


def to_json(res: BenchResult) -> dict[str, Any]:
    d = res.as_dict()
    d["schema"] = SCHEMA
    return d


def write_json(res: BenchResult | list[BenchResult], path: str | os.PathLike[str]) -> Path:
    """Every raw sample plus device, driver, versions and date; atomically."""
    payload: Any = to_json(res) if isinstance(res, BenchResult) else {
        "schema": SCHEMA, "runs": [to_json(r) for r in res]
    }  # fmt: skip
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return out


def plot(res: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Latency distribution per backend (box + points), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in res.rows if r.status == "ok"]
    if not ok:
        raise ValueError("no backend produced timings to plot")
    data = [[1e3 * s for s in (r.device_samples_s or r.samples_s)] for r in ok]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(ok) + 2), 4.0), dpi=110)
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(ok) + 1), [r.backend for r in ok])
    for i, d in enumerate(data, start=1):
        ax.scatter([i] * len(d), d, s=6, alpha=0.5)
    ax.set_ylabel("latency per call (ms)")
    ax.set_title(f"{res.model} {'×'.join(map(str, res.input_shape))} {res.precision} — "
                 f"{res.environment.get('device_name')}", fontsize=9)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def markdown_table(results: list[BenchResult]) -> str:
    """The README's results table: one line per model × backend, device and date."""
    lines = [
        "| model | input | precision | backend | p50 ms | fps | ×eager | ×best peer | accuracy "
        "| device | date |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for res in results:
        env = res.environment
        for r in res.rows:
            shape = "×".join(map(str, res.input_shape))
            if r.status != "ok":
                lines.append(
                    f"| {res.model} | {shape} | {r.precision} | {r.backend} | - | - | - | - | "
                    f"{r.status}: {r.reason} | {env.get('device_name')} | {env.get('date', '')[:10]} |"
                )
                continue
            lat = r.device_ms or r.latency_ms
            acc = (
                f"rel-L2 {r.rel_l2:.1e}" + (
                    f", mask {100 * r.mask_agreement:.2f}%" if r.mask_agreement is not None else ""
                ) + ("" if r.accuracy_ok else " FAIL")
            )  # fmt: skip
            lines.append(
                f"| {res.model} | {shape} | {r.precision} | {r.backend} | {lat['p50_ms']:.2f} | "
                f"{r.fps:.1f} | {_f(r.vs_eager, '.2f')} | {_f(r.vs_best_peer, '.2f')} | {acc} | "
                f"{env.get('device_name')} | {env.get('date', '')[:10]} |"
            )
    return "\n".join(lines)
