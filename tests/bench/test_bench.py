"""segfast bench: statistics, the report table, the JSON schema, the plot, and
accuracy columns that are computed (a deliberately wrong engine is flagged)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import segfast
from segfast import models
from segfast.bench import report
from segfast.bench.runner import parse_backends, run_benchmark
from segfast.cli import main
from segfast.stats import percentile, percentiles, summarize, throughput


def test_percentiles_on_known_samples():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    assert percentile([5.0], 99) == 5.0
    assert percentiles([3, 1, 2], (0, 100)) == {0: 1, 100: 3}
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s.n == 4
    assert s.p50_ms == pytest.approx(2.5)
    assert s.mean_ms == pytest.approx(2.5)
    assert s.min_ms == pytest.approx(1.0)
    assert s.max_ms == pytest.approx(4.0)
    assert s.std_ms == pytest.approx(1.2909944)
    assert throughput(8, 0.5) == 16.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1], 101)


def test_parse_backends():
    assert parse_backends("all")[:3] == ["eager", "eager_cl", "torch"]
    assert parse_backends("eager, torch") == ["eager", "torch"]
    with pytest.raises(ValueError, match="unknown backend"):
        parse_backends("eager,cuda")


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    model = models.create("unet", tiny=True).eval()
    sets = [(torch.randn(1, 1, 32, 40),) for _ in range(2)]
    good = segfast.compile(model, sets[0], backend="torch")
    wrong_model = copy.deepcopy(model)
    with torch.no_grad():
        wrong_model.head.weight.mul_(1.1)  # a 10 % error in the classifier
    wrong = segfast.compile(wrong_model, sets[0], backend="torch")
    return run_benchmark(
        model, sets, name="unet-tiny", backends=["eager", "torch", "inductor", "tensorrt"],
        warmup=1, iters=4, engines={"torch": good, "inductor": wrong},
    )  # fmt: skip


def test_rows_have_real_numbers(result):
    eager, torch_row = result.row("eager"), result.row("torch")
    for r in (eager, torch_row):
        assert r.status == "ok"
        assert len(r.samples_s) == 4
        assert r.latency_ms["p50_ms"] > 0
        assert r.fps > 0
        assert r.gflops_per_s > 0
        assert r.peak_memory_bytes is not None
        assert r.peak_memory_bytes >= 0
    assert eager.rel_l2 == 0.0
    assert eager.vs_eager == pytest.approx(1.0)
    assert torch_row.rel_l2 < 1e-4
    assert torch_row.accuracy_ok
    assert torch_row.gbytes_per_s > 0
    assert result.flops > 0


def test_wrong_backend_is_flagged(result):
    bad = result.row("inductor")  # the perturbed engine stood in for inductor
    assert bad.status == "ok"
    assert bad.accuracy_ok is False
    assert bad.rel_l2 > 1e-2
    assert "rel-L2" in bad.accuracy_reason
    # a failing peer is not "the fastest peer"
    assert result.row("torch").vs_best_peer == pytest.approx(
        result.row("eager").latency_ms["p50_ms"] / result.row("torch").latency_ms["p50_ms"]
    )
    assert "ACCURACY FAIL" in report.format_table(result)


def test_unavailable_backend_has_a_reason(result):
    trt = result.row("tensorrt")
    assert trt.status == "unavailable"
    assert trt.reason
    assert f"tensorrt: unavailable — {trt.reason}" in report.format_table(result)


def test_json_schema(result, tmp_path):
    path = report.write_json(result, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "segfast-bench/1"
    for key in (
        "model",
        "input_shape",
        "batch",
        "precision",
        "device",
        "flops",
        "environment",
        "rows",
        "warmup",
        "iters",
    ):
        assert key in data
    for key in ("date", "torch", "segfast", "device_name", "cpu"):
        assert key in data["environment"]
    for row in data["rows"]:
        assert set(report.ROW_KEYS) <= set(row)
    assert len(data["rows"][0]["samples_s"]) == 4


def test_plot_and_markdown(result, tmp_path):
    png = report.plot(result, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown_table([result])
    assert "| unet-tiny |" in md
    assert "FAIL" in md
    assert "unavailable" in md


def test_cli_bench(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    # (triton is left out: under the tests' TRITON_INTERPRET=1 its row alone took 140 s)
    rc = main(["bench", "unet", "--tiny", "--size", "32x32", "--backends", "eager,eager_cl,torch",
               "--warmup", "1", "--iters", "3", "--no-progress", "--json", str(out_json),
               "--plot", str(out_png)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "p50" in text  # (rich abbreviates headers to fit the terminal)
    assert "torch" in text
    data = json.loads(out_json.read_text())
    assert [r["backend"] for r in data["rows"]] == ["eager", "eager_cl", "torch"]
    cl = data["rows"][1]
    assert cl["status"] == "ok"
    assert cl["accuracy_ok"]
    assert "channels_last" in " ".join(cl["notes"])
    assert out_png.exists()


def test_cli_bench_int8_float_part(capsys):
    """--int8-float reaches the int8 rows' compile (where it is not built, the row says
    why) and is refused without int8 rows."""
    assert main(["bench", "unet", "--tiny", "--precision", "fp32", "--int8-float", "fp16"]) != 0
    assert "--int8-float is for int8 rows" in capsys.readouterr().err
    rc = main(["bench", "unet", "--tiny", "--size", "32x32", "--backends", "torch",
               "--precision", "int8", "--int8-float", "bf16", "--warmup", "1", "--iters", "1",
               "--rounds", "1", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "float_precision='bf16': int8 engines on the CPU" in capsys.readouterr().out


def test_cli_bench_user_model(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))\n"
    )
    rc = main(["bench", f"{f}:build", "--size", "16x16", "--backends", "eager,torch",
               "--iters", "2", "--warmup", "1", "--no-progress"])  # fmt: skip
    assert rc == 0


def test_suite_appends_results_and_readme_renders(tmp_path):
    from segfast.bench import readme, suite

    out = tmp_path / "benchmarks" / "results"
    args = ["--out", str(out), "--cases", "smoke", "--backends", "eager,torch",
            "--precisions", "fp32", "--warmup", "1", "--iters", "2"]  # fmt: skip
    assert suite.main(args) == 0
    assert suite.main(args) == 0  # a rerun replaces its own entry, keeps the file valid
    (path,) = list(out.glob("*.json"))
    results = suite.load_results(path)
    assert [(r.model, r.precision) for r in results] == [("unet-tiny-32", "fp32")]
    assert results[0].row("torch").accuracy_ok
    text = readme.render(out)
    assert "| unet-tiny-32 | 1×1×32×32 | fp32 | torch |" in text
    (tmp_path / "README.md").write_text("a\n<!-- results:start -->\nold\n<!-- results:end -->\nz\n")
    assert readme.main([str(tmp_path)]) == 0
    new = (tmp_path / "README.md").read_text()
    assert "old" not in new
    assert "unet-tiny-32" in new
    assert new.endswith("<!-- results:end -->\nz\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read on Linux")
def test_peak_memory_counts_what_the_backend_added():
    """The torch backend keeps its own (folded, packed) weights: its peak over
    what the process held before is at least their size."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1)
    ).eval()
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())  # ~9.5 MB
    res = run_benchmark(model, [(torch.randn(1, 3, 8, 8),)], name="wide", backends=["torch"],
                        warmup=1, iters=2, rounds=2)  # fmt: skip
    assert res.row("torch").peak_memory_bytes >= weight_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read on Linux")
def test_peak_memory_does_not_depend_on_the_order_backends_run_in():
    """An engine measured after another used to reuse the pages the first one freed:
    eager showed 0.5 KiB after the torch engine (and ~12 MiB alone). Each backend's
    peak now counts the pages it touches itself: eager's 48 MiB activation whichever
    backend ran before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 2, 1)).eval()
    x = [(torch.randn(1, 3, 512, 512),)]
    activation = 48 * 512 * 512 * 4  # one 48-channel fp32 map, 48 MiB
    peaks = {}
    for order in (["eager", "torch"], ["torch", "eager"]):
        res = run_benchmark(model, x, name="m", backends=order, warmup=1, iters=1, rounds=1)
        peaks[order[0]] = res.row("eager").peak_memory_bytes
    assert min(peaks.values()) >= activation, peaks
    assert max(peaks.values()) <= 2 * min(peaks.values()), peaks


def test_rounds_interleave_backends(monkeypatch):
    """Timed blocks alternate between backends, the order rotating per round."""
    from segfast.bench import runner

    calls: list[str] = []
    real = runner.measure

    def spy(fn, sets, **kw):
        if kw.get("iters"):
            calls.append(fn.__self__.backend)
        return real(fn, sets, **kw)

    monkeypatch.setattr(runner, "measure", spy)
    model = models.create("unet", tiny=True).eval()
    res = run_benchmark(model, [(torch.randn(1, 1, 16, 16),)], name="t", backends=["eager", "torch"],
                        warmup=0, iters=6, rounds=3, pause_s=0)  # fmt: skip
    assert calls == ["eager", "torch", "torch", "eager", "eager", "torch"]
    assert all(len(r.samples_s) == 6 for r in res.rows)
