"""The compiler's passes, run in this order (one pass per module).

Order matters where noted: each later pass matches the forms earlier ones produce.
"""

from __future__ import annotations

from collections.abc import Callable

from segfast.compiler.context import PassContext
from segfast.compiler.passes import (
    activations,
    broadcast_branch,
    cleanup,
    concat_depthwise,
    concat_slices,
    conv_epilogue,
    fold_bn,
    head,
    layout,
    norm_act,
    precision,
    skip_concat,
    squeeze_excite,
    stack_sum,
)

PASSES: list[tuple[str, Callable[[PassContext], None]]] = [
    ("cleanup", cleanup.run),  # first: identity ops would break every chain below
    # before conv_epilogue: the adds it makes are absorbed as conv residuals
    ("stack_sum", stack_sum.run),
    # written-out silu / hardsigmoid / hardswish → the ATen ops, before anything fuses them
    ("activations", activations.run),
    ("fold_bn", fold_bn.run),  # before conv_epilogue: conv→BN→act only chains once BN is gone
    ("conv_epilogue", conv_epilogue.run),  # convolutions become segfast ops (+ act, residual)
    ("norm_act", norm_act.run),  # GroupNorm / InstanceNorm (+ act) become segfast.group_norm
    # after conv_epilogue (the gate's 1×1 convs are segfast.conv2d with their acts); before
    # the passes below, which leave the conv2d_gated it makes alone
    ("squeeze_excite", squeeze_excite.run),
    # after conv_epilogue (reads segfast.conv2d), before the passes that rewrite concats
    ("broadcast_branch", broadcast_branch.run),
    # before skip_concat: moves a concat past depthwise convs to a dense conv it can fuse into
    ("concat_depthwise", concat_depthwise.run),
    ("skip_concat", skip_concat.run),  # needs the consumer convs to be segfast.conv2d already
    ("head", head.run),  # needs the classifier conv as a plain segfast.conv2d
    ("concat_slices", concat_slices.run),  # after skip_concat: only cats it left over
    ("layout", layout.run),  # NHWC entry conversion
    ("precision", precision.run),  # last: casts every constant earlier passes created
]


def pass_names() -> list[str]:
    return [name for name, _ in PASSES]
