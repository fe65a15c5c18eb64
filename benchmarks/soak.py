"""Soak tests of the serving paths (not in CI): resident memory must stay flat.

    python benchmarks/soak.py streams [--frames 10000] [--json out.json]
    python benchmarks/soak.py serve   [--seconds 300]  [--json out.json]

``streams``: four generated sources of different sizes through one batch-dynamic
engine (``segfast.stream(engine, [a, b, c, d])``, masks only, nothing written) until
``--frames`` frames came out; the process's resident set size (RSS) sampled every
second. ``serve``: ``segfast serve`` on a local Ray instance (2 CPUs) under 8 clients
posting PNGs for ``--seconds``; the replica's RSS (its pid from /healthz) sampled every
second, and the load report (sent / ok / failed, throughput, p50/p99 latency, batch
sizes). Both report RSS after warm-up (the first 10 % of the run) against the end:
growth under 5 % passes (exit 0), more fails (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

import segfast
from segfast import models


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc: Linux only")


class Sampler:
    """RSS of ``pid`` every ``every`` seconds in a thread, as (seconds since start, bytes)."""

    def __init__(self, pid: int | None = None, every: float = 1.0) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, rss_bytes(self.pid)))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.samples.append((self.samples[-1][0] + self.every, rss_bytes(self.pid)))

    def growth(self) -> dict[str, float]:
        """RSS after warm-up (10 % of the samples in) vs the median of the last 10 %."""
        n = len(self.samples)
        k = max(1, n // 10)
        warm = float(np.median([b for _, b in self.samples[k : 2 * k]]))
        end = float(np.median([b for _, b in self.samples[-k:]]))
        return {
            "samples": n,
            "rss_after_warmup_mib": warm / 2**20,
            "rss_end_mib": end / 2**20,
            "rss_peak_mib": max(b for _, b in self.samples) / 2**20,
            "growth_pct": 100.0 * (end - warm) / warm,
        }


def _frames(h: int, w: int, seed: int, n: int):
    g = np.random.default_rng(seed)
    base = g.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        yield np.roll(base, i, axis=1)


def soak_streams(frames: int) -> dict:
    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
    eng = segfast.compile(net, input_shape=(1, 3, 64, 64), backend="torch", output="mask",
                          dynamic=("batch",))  # fmt: skip
    per = frames // 4 + 1
    sizes = [(72, 96), (64, 64), (120, 160), (50, 70)]
    sources = [_frames(h, w, i, per) for i, (h, w) in enumerate(sizes)]
    out = 0
    t0 = time.perf_counter()
    with Sampler() as rss, segfast.stream(eng, sources, output="mask", max_batch=4) as ms:
        for _ in ms:
            out += 1
            if out >= frames:
                break
    wall = time.perf_counter() - t0
    return {
        "mode": "streams",
        "frames": out,
        "wall_s": round(wall, 2),
        "fps": round(out / wall, 1),
        "batch_sizes": {str(k): v for k, v in sorted(ms.batch_sizes.items())},
        **rss.growth(),
    }


def _png(img: np.ndarray) -> bytes:
    import av

    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = img.shape[1], img.shape[0], "rgb24", Fraction(1)
    f = av.VideoFrame.from_ndarray(img, format="rgb24")
    return b"".join(bytes(p) for p in [*cc.encode(f), *cc.encode(None)])


def soak_serve(seconds: float, tmp: Path) -> dict:
    from segfast.bench.http_load import http_load
    from segfast.commands.serve import healthz

    torch.manual_seed(0)
    net = models.create("unet", tiny=True, in_channels=3, num_classes=3).eval()
    path = tmp / "soak.segfast"
    segfast.compile(net, input_shape=(1, 3, 64, 64), backend="torch", output="mask",
                    dynamic=("batch",)).save(path)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "segfast.cli", "serve", str(path), "--port", str(port),
         "--num-cpus", "2", "--max-batch-size", "8", "--batch-wait-ms", "5"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                info = healthz(url)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("segfast serve did not come up") from None
                time.sleep(1)
        g = np.random.default_rng(0)
        bodies = [_png(g.integers(0, 255, (h, w, 3), dtype=np.uint8))
                  for h, w in [(64, 64), (120, 160), (240, 320), (50, 70)]]  # fmt: skip
        with Sampler(info["replica_pid"]) as rss:
            report = http_load(url, bodies, clients=8, seconds=seconds)
        return {"mode": "serve", **report.as_dict(), **rss.growth()}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("streams", "serve"))
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.mode == "streams":
        result = soak_streams(a.frames)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            result = soak_serve(a.seconds, Path(d))
    result["device"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    ok = result["growth_pct"] < 5.0 and result.get("failed", 0) == 0
    print(("PASS" if ok else "FAIL") + f": RSS growth {result['growth_pct']:.2f} % after warm-up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
