"""Warnings users cannot act on stay inside segfast; theirs still reach them.

torch 2.13's own pytree code warns "`isinstance(treespec, LeafSpec)` is deprecated"
(from copyreg.py) whenever torch.export's specs are deep-copied — several times in
every ``make demo`` and ``segfast`` command. A fresh interpreter (so nothing is
deduplicated by an earlier warning and pytest's filters do not apply) compiles,
saves, loads, checks, exports and plans, and its stderr must hold the model's own
warning but none of PyTorch's internal one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from torch import nn
    import segfast
    from segfast.api import plan
    from segfast.export import export_onnx

    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            warnings.warn("the user's own warning", UserWarning)
            return self.conv(x)

    x = torch.randn(1, 1, 16, 16)
    unet = segfast.models.create("unet", tiny=True).eval()
    eng = segfast.compile(unet, x, backend="torch", dynamic=["batch"])
    segfast.load(eng.save(r"{tmp}/e.segfast"))
    eager = segfast.compile(unet, x, backend="eager")
    segfast.load(eager.save(r"{tmp}/f.segfast"))
    assert segfast.check(segfast.compile(unet, x, backend="torch", precision="bf16"), unet, [x])
    plan(unet, x)
    export_onnx(unet, r"{tmp}/u.onnx", example_input=x, dynamic=True)
    segfast.compile(Loud().eval(), x, backend="torch")
    print("ran")
    """
)


@pytest.mark.slow
def test_no_torch_internal_warnings_reach_users(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", SCRIPT.format(tmp=tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran" in proc.stdout
    assert "LeafSpec" not in proc.stderr, proc.stderr[-3000:]
    assert "the user's own warning" in proc.stderr
