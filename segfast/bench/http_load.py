"""A bounded HTTP load test of a segmentation service (``segfast serve``): ``clients``
threads, each POSTing images back to back for ``seconds``, counting every request
sent, answered and failed, with latency percentiles and throughput.

    from segfast.bench.http_load import http_load
    report = http_load("http://127.0.0.1:8000", [png_bytes, ...], clients=8, seconds=10)
    print(report.summary())

Nothing is retried: a request that fails (connection error, timeout, a status other
than 200) is counted as failed with its reason, so "nothing lost" means
``report.sent == report.ok``.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from segfast.stats import summarize

__all__ = ["LoadReport", "http_load", "post"]


@dataclass
class LoadReport:
    clients: int
    seconds: float  # wall time of the run
    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    batches: Counter[int] = field(default_factory=Counter)  # X-Segfast-Batch of each 200
    errors: list[str] = field(default_factory=list)  # the first few reasons
    latency: list[float] = field(default_factory=list)  # seconds, successful requests

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        lat = summarize(self.latency) if self.latency else None
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
            "throughput_rps": round(self.throughput, 2),
            "latency_ms": lat.as_dict() if lat is not None else None,
            "errors": self.errors,
        }

    def summary(self) -> str:
        lat = summarize(self.latency) if self.latency else None
        line = (
            f"{self.clients} clients × {self.seconds:.1f} s: sent {self.sent}, ok {self.ok}, "
            f"failed {self.failed}; {self.throughput:.1f} req/s"
        )
        if lat is not None:
            line += f"; latency p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms"
        if self.batches:
            line += "; batch sizes " + ", ".join(
                f"{b}×{n}" for b, n in sorted(self.batches.items())
            )
        return line


def post(
    url: str, body: bytes, path: str = "/segment", query: str = "", timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes]:
    """One POST: (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", path + (f"?{query}" if query else ""), body=body,
                     headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def http_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    clients: int = 8,
    seconds: float = 10.0,
    timeout: float = 60.0,
    check: Callable[[int, bytes], str | None] | None = None,
) -> LoadReport:
    """Run the load test (module docstring). ``check(index, response body)`` may return
    a reason to count a 200 as failed (e.g. a mask that is not the expected one)."""
    if clients < 1 or seconds <= 0 or not bodies:
        raise ValueError("need clients ≥ 1, seconds > 0 and at least one body")
    report = LoadReport(clients=clients, seconds=0.0)
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        k = c
        while time.perf_counter() < stop:
            i = k % len(bodies)
            k += clients
            t0 = time.perf_counter()
            with lock:
                report.sent += 1
            try:
                status, headers, data = post(url, bodies[i], timeout=timeout)
                why = None if status == 200 else f"HTTP {status}: {data[:200]!r}"
                if why is None and check is not None:
                    why = check(i, data)
            except (OSError, http.client.HTTPException) as exc:
                status, headers, why = 0, {}, f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            with lock:
                report.statuses[status] += 1
                if why is None:
                    report.ok += 1
                    report.latency.append(dt)
                    if "x-segfast-batch" in headers:
                        report.batches[int(headers["x-segfast-batch"])] += 1
                else:
                    report.failed += 1
                    if len(report.errors) < 10:
                        report.errors.append(why)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    return report
