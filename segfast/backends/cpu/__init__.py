"""The ``torch`` backend's CPU lowering: the fused graph as a flat plan of calls
into oneDNN with weights packed once at build time.

- :mod:`.onednn` — convolution and transposed convolution on prepacked oneDNN
  weights with the epilogue (bias, activation, residual) as oneDNN post-ops,
  the two-source prologue as two accumulating convolutions (no concat buffer);
- :mod:`.plan` — lowers the fused ``GraphModule`` into a list of steps and runs
  it, freeing each intermediate after its last use.

Everything here is exact reordering of the same arithmetic (packing changes
memory layout, not values; split-K accumulation changes only the summation
order), so the CPU plan matches the composite implementations to fp32 rounding.
"""
