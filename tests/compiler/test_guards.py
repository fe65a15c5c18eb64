"""The guard evaluator: torch.export's guard syntax, named sizes, and nothing else."""

from __future__ import annotations

import pytest

from segfast.compiler.guards import Guards, size_name


def test_names_and_python_semantics():
    g = Guards(
        [
            "((width + (((-1)*width) % 32)) // 32) != 1",  # FCN-8s: padded width > 32
            "max(1, batch) == batch and not height < 2",
            "math.trunc(0.5*torch.sym_float(height)) >= 2",  # a scale factor's size
            "input1_d0 == batch",
        ]
    )
    assert g.first_violated([(2, 3, 40, 33), (2,)]) is None
    assert g.first_violated([(2, 3, 40, 32), (2,)]) == g.text[0]
    assert g.first_violated([(2, 3, 3, 40), (2,)]) == g.text[2]  # trunc(1.5) = 1
    assert g.first_violated([(2, 3, 40, 40), (3,)]) == g.text[3]
    assert [size_name(0, d) for d in range(4)] == ["batch", "channels", "height", "width"]


@pytest.mark.parametrize(
    "guard", ["__import__('os').getcwd() == 0", "height.bit_length() > 1", "[height][0] == 1"]
)
def test_anything_but_shape_arithmetic_is_refused(guard):
    with pytest.raises(ValueError, match="unsupported guard syntax"):
        Guards([guard])  # refused when compiled, before any input is seen


def test_a_guard_on_a_size_the_inputs_lack_is_an_error():
    with pytest.raises(ValueError, match="input1_d0"):
        Guards(["input1_d0 == batch"]).first_violated([(1, 3, 8, 8)])
