"""segfast's Triton kernels, imported as ``segfast.kernels``.

One op per module (``segfast.kernels.conv2d``, ``.conv_transpose2d``, ``.pool``,
``.resize``, ``.head``, ``.preprocess``, ``.overlay``), each with its Triton
kernel(s), a launcher, and the plain PyTorch reference it is tested against.

Conventions shared by every launcher:

- tensors keep PyTorch's *logical* N×C×H×W shape and may have any strides;
  outputs are allocated channels_last (NHWC in memory), the layout every kernel
  is tuned for. So a channel slice of a larger NHWC buffer (``buf[:, a:b]``) is a
  valid ``out=`` target: that is how producers write straight into a concat.
- arithmetic accumulates in fp32 whatever the storage dtype (fp32/fp16/bf16).
- on a CPU tensor the kernels run only under ``TRITON_INTERPRET=1`` (tests);
  ``segfast.kernels._common.check_device`` raises a clear error otherwise.

Importing this package does not import triton; the op modules do.
"""
