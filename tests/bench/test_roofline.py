"""Roofline (segfast.bench.roofline): a convolution counted by hand, fused vs unfused
totals over the tiny zoo, the device table, `segfast info --gpu` and the `% of floor`
column of `segfast bench`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from segfast import models
from segfast.bench import report, roofline
from segfast.bench.modelstats import model_stats
from segfast.bench.runner import run_benchmark
from segfast.bench.suite import load_results
from segfast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _by_op(costs: list[roofline.OpCost], op: str) -> roofline.OpCost:
    (match,) = [c for c in costs if c.op.startswith(op)]
    return match


def test_one_conv_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()  # + bias
    x = torch.randn(1, 3, 16, 16)
    roof = roofline.analyse(conv, x, precision="fp32")
    # the fused plan: the entry layout copy, then the conv
    assert [c.op for c in roof.fused] == ["_to_copy", "conv 3×3"]
    c = _by_op(roof.fused, "conv")
    assert c.shape == (1, 8, 16, 16)
    assert c.flops == 2 * (8 * 16 * 16) * (3 * 3 * 3)  # 2 × outputs × Cin·kh·kw
    # read x (3·16·16) + weight (8·3·3·3) + bias (8), write 8·16·16: fp32, 4 bytes each
    assert c.read_bytes == 4 * (3 * 16 * 16 + 8 * 3 * 3 * 3 + 8)
    assert c.write_bytes == 4 * (8 * 16 * 16)
    h100 = roofline.get_device("h100")
    s, bound = c.floor(h100, "fp32")
    assert bound == "memory"
    assert s == pytest.approx((c.read_bytes + c.write_bytes) / 3.35e12)
    copy = _by_op(roof.fused, "_to_copy")
    assert (copy.flops, copy.read_bytes, copy.write_bytes) == (0, 3072, 3072)
    # the unfused graph is the one conv, read from the input as given
    (u,) = roof.unfused
    assert (u.flops, u.read_bytes, u.write_bytes) == (c.flops, c.read_bytes, c.write_bytes)
    # fp16: everything but the graph's input is 2 bytes wide
    half = roofline.analyse(conv, x, precision="fp16")
    c16 = _by_op(half.fused, "conv")
    assert c16.read_bytes == 2 * (3 * 16 * 16 + 8 * 3 * 3 * 3 + 8)
    assert half.unfused[0].read_bytes == 4 * 3 * 16 * 16 + 2 * (8 * 3 * 3 * 3 + 8)
    # compute-bound on a device with a low fp32 peak and the whole H100 for a big conv
    big = roofline.OpCost("n", "conv", (1,), flops=10**12, read_bytes=10**6, write_bytes=0)
    assert big.floor(h100, "fp32") == (pytest.approx(1e12 / 67e12), "compute")


def test_transposed_conv_and_head_by_hand():
    up = nn.ConvTranspose2d(4, 2, 2, stride=2).eval()
    x = torch.randn(1, 4, 8, 8)
    c = _by_op(roofline.analyse(up, x, precision="fp32").fused, "convT 2×2/s2")
    assert c.flops == 2 * (4 * 8 * 8) * (2 * 2 * 2)  # each input scatters Cout·kh·kw
    assert c.shape == (1, 2, 16, 16)
    head = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    roof = roofline.analyse(head, x, precision="fp32", output="mask")
    h = _by_op(roof.fused, "head 1×1 argmax")
    assert h.flops == 2 * (8 * 8) * 5 * 6
    assert h.write_bytes == 8 * 8  # a uint8 mask: no logits written
    assert (
        roof.totals(roofline.get_device("l4")).flops
        == roof.totals(roofline.get_device("l4"), "unfused").flops
    )


_ZOO: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], roofline.Roofline]] = {}


def _tiny(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], roofline.Roofline]:
    if name not in _ZOO:
        spec = models.get_spec(name)
        torch.manual_seed(0)
        model = models.create(name, tiny=True).eval()
        size = None if spec.task == "generation" else (64, 64)
        inputs = spec.make_inputs(model, 1, size)
        _ZOO[name] = (model, inputs, roofline.analyse(model, inputs, precision="fp16"))
    return _ZOO[name]


@pytest.mark.parametrize("name", models.names())
def test_tiny_zoo_totals_are_consistent(name):
    model, inputs, roof = _tiny(name)
    h100, orin = roofline.get_device("h100"), roofline.get_device("agx-orin")
    fused, unfused = roof.totals(h100), roof.totals(h100, "unfused")
    # the unfused graph has exactly the FLOPs torch's flop counter gives the model
    assert unfused.flops == model_stats(model, inputs).flops > 0
    # fusion removes no multiply-add except broadcast_branch's (ASPP's pooled branch
    # share of the 1×1 projection, computed at 1×1): a fraction of a percent here
    assert unfused.flops * 0.99 <= fused.flops <= unfused.flops
    assert fused.ops < unfused.ops
    assert 0 < fused.bytes < unfused.bytes
    for dev in (h100, orin):
        assert 0 < roof.totals(dev).floor_s <= roof.totals(dev, "unfused").floor_s
    assert all(o.flops >= 0 and o.read_bytes >= 0 and o.write_bytes >= 0 for o in roof.fused)


def test_device_table():
    assert {"h100", "h200", "a100", "l4", "agx-orin", "orin-nano"} <= set(roofline.DEVICES)
    for d in roofline.DEVICES.values():
        assert set(d.peaks) == set(roofline.PRECISIONS), d.name
        assert "http" in d.source, d.name
        assert d.bandwidth
        assert d.bandwidth > 0
        # tensor-core formats at least as fast as fp32 CUDA cores; int8 the fastest
        assert d.peaks["fp32"] <= d.peaks["tf32"] <= d.peaks["fp16"] <= d.peaks["int8"]
    assert roofline.DEVICES["h100"].peaks["fp16"] == 989.5e12  # dense: 1,979 sparse / 2
    assert roofline.DEVICES["agx-orin"].peaks["int8"] == 85e12  # 170 sparse TOPS / 2
    with pytest.raises(ValueError, match="known: h100"):
        roofline.get_device("rtx9090")


def test_cpu_estimate(monkeypatch):
    info = {"flags": {"avx512f", "avx512_bf16", "avx512_vnni"}, "mhz": 2000.0,
            "vendor": "GenuineIntel", "family": 6, "name": "Xeon"}  # fmt: skip
    monkeypatch.setattr(roofline, "_cpuinfo", lambda: dict(info))
    cpu = roofline.cpu_device(threads=2)
    assert cpu.estimated
    assert cpu.bandwidth is None
    assert cpu.peaks["fp32"] == 2 * 16 * 2 * 2 * 2e9  # threads × lanes × 2 FMA × 2 × clock
    assert cpu.peaks["bf16"] == 2 * cpu.peaks["fp32"]
    assert cpu.peaks["int8"] == 4 * cpu.peaks["fp32"]
    info.update(vendor="AuthenticAMD", family=25)  # Zen 4: 512-bit ops as two halves
    assert roofline.cpu_device(threads=2).peaks["fp32"] == 2 * 8 * 2 * 2 * 2e9
    info.update(mhz=0.0)
    assert roofline.cpu_device() is None


def test_info_prints_the_per_op_floor_and_totals(capsys):
    assert main(["info", "unet", "--tiny", "--size", "32x32", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs:" in out  # the existing output stays
    assert "roofline on NVIDIA H100 SXM5 80GB, fp16" in out
    assert "source: NVIDIA H100 Tensor Core GPU datasheet" in out
    for column in ("op", "output shape", "GFLOP", "MB r+w", "floor µs", "bound"):
        assert column in out
    assert "conv 3×3 +relu +2src" in out  # a skip-concat conv of the fused plan
    totals = {m[1]: float(m[2].replace(",", "")) for m in re.finditer(
        r"^  (fused plan|unfused \(ATen\))\s+\d+\s+\S+\s+\S+\s+(\S+)$", out, re.M
    )}  # fmt: skip
    f_floor, u_floor = totals["fused plan"], totals["unfused (ATen)"]
    assert 0 < f_floor < u_floor


def test_info_unknown_gpu_lists_the_known_ones(capsys):
    assert main(["info", "unet", "--tiny", "--gpu", "rtx9090"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'rtx9090'" in err
    for name in ("h100", "h200", "a100", "l4", "agx-orin", "orin-nano", "cpu"):
        assert name in err


def _bench(**kw):
    torch.manual_seed(0)
    model = models.create("unet", tiny=True).eval()
    return run_benchmark(model, [(torch.randn(1, 1, 16, 16),)], name="unet-tiny",
                         backends=["eager", "tensorrt"], warmup=1, iters=2, rounds=1, **kw)  # fmt: skip


def test_bench_shows_percent_of_floor_on_a_known_device(tmp_path):
    res = _bench()  # the CPU: its estimate
    assert res.floor_ms is not None
    assert res.floor_ms > 0
    assert res.floor_estimated
    eager = res.row("eager")
    p50 = eager.latency_ms["p50_ms"]
    assert eager.floor_pct == pytest.approx(100 * res.floor_ms / p50)
    assert res.row("tensorrt").floor_pct is None  # unavailable here
    text = report.format_table(res)
    assert "% of floor" in text
    assert f"~{eager.floor_pct:.1f}" in text
    assert "roofline floor" in text
    # JSON: a field added; files without it still load
    path = report.write_json([res], tmp_path / "r.json")
    again = load_results(path)[0]
    assert again.floor_ms == res.floor_ms
    assert again.row("eager").floor_pct == eager.floor_pct
    data = json.loads(path.read_text())
    for run in data["runs"]:
        for key in ("floor_ms", "floor_device", "floor_estimated"):
            del run[key]
        for row in run["rows"]:
            del row["floor_pct"]
    path.write_text(json.dumps(data))
    old = load_results(path)[0]
    assert old.floor_ms is None
    assert old.row("eager").floor_pct is None


def test_bench_leaves_the_column_empty_on_an_unknown_device(monkeypatch):
    monkeypatch.setattr(roofline, "device_for", lambda device: None)
    res = _bench()
    assert res.floor_ms is None
    assert res.row("eager").floor_pct is None
    cells = report.row_cells(res.row("eager"))
    assert cells[report.COLUMNS.index("% of floor")] == "-"
    assert "roofline floor" not in report.format_table(res)


def test_readme_has_the_zoo_floors():
    text = (ROOT / "README.md").read_text()
    start, end = text.index(roofline.README_START), text.index(roofline.README_END)
    table = text[start:end]
    for name in models.names():
        assert f"| `{name}` |" in table
    assert "h100 floor fused / unfused" in table
    assert "agx-orin floor fused / unfused" in table
