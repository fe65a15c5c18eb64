"""``python -m segfast.demo`` (``make demo``): the zoo, end to end on this machine.

For every model: the full-size model's parameters, GFLOPs and activation memory
at its standard input size (analysed on the meta device), then its tiny
configuration built and run on a random input on the CPU, with the latency.
"""

from __future__ import annotations

import time

import torch

from segfast import models
from segfast.bench.modelstats import format_bytes, model_stats


def main() -> int:
    torch.manual_seed(0)
    header = (
        f"{'model':27s} {'input':>13s} {'params':>9s} {'GFLOPs':>8s} {'act. peak':>10s}  tiny run"
    )
    print(header)
    print("-" * len(header))
    for name in models.names():
        spec = models.get_spec(name)
        with torch.device("meta"):
            full = models.create(name)
        st = model_stats(full, spec.make_inputs(full, spec.standard_batch))
        tiny = models.create(name, tiny=True).eval()
        inputs = spec.make_inputs(tiny, 1, (64, 64) if spec.task == "segmentation" else None)
        with torch.inference_mode():
            tiny(*inputs)  # warm-up
            t0 = time.perf_counter()
            out = tiny(*inputs)
            ms = 1e3 * (time.perf_counter() - t0)
        size = "×".join(str(d) for d in spec.make_inputs(full, spec.standard_batch)[0].shape)
        print(
            f"{name:27s} {size:>13s} {st.params / 1e6:8.2f}M {st.gflops:8.1f} "
            f"{format_bytes(st.activation_bytes_peak):>10s}  "
            f"{'×'.join(map(str, out.shape))} in {ms:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
