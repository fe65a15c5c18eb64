"""``segfast export``: through its own parser (the lead adds it to cli.COMMANDS)."""

from __future__ import annotations

import argparse

import onnx
import pytest

from segfast._io import sha256_file
from segfast.commands import export


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segfast")
    export.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


def test_export_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "unet.onnx"
    args = parse(
        ["unet", "--tiny", "--option", "base=4", "-o", str(out), "--size", "37x45",
         "--output", "mask", "--dynamic", "--dynamic-batch"]
    )  # fmt: skip
    assert export.run(args) == 0
    onnx.checker.check_model(str(out), full_check=True)
    text = capsys.readouterr().out
    assert f"wrote {out}" in text
    assert sha256_file(out) in text
    assert "input   input    float    [batch, 1, height, width]  (example 1×1×37×45)" in text
    assert "output  mask     uint8    [batch, height, width]" in text
    assert "dynamic batch 1..2147483647, height 2..2147483647, width 2..2147483647" in text
    assert "ONNX Runtime vs PyTorch eager (fp32) at 1×1×37×45: rel-L2 0" in text
    assert text.count("— ok") >= 2  # the example and a size other than it


def test_fp16_static_export(tmp_path, capsys):
    out = tmp_path / "psp.onnx"
    assert export.run(parse(["pspnet", "--tiny", "-o", str(out), "--size", "33x41", "--precision", "fp16"])) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "fp16 graph, output logits, 21 classes" in text
    assert "float16  [1, 3, 33, 41]" in text
    assert "dynamic none (static shapes)" in text


def test_o_is_the_output_file_and_options_take_the_long_form():
    args = parse(["unet", "-o", "m.onnx", "--option", "depth=2"])
    assert str(args.out_file) == "m.onnx"
    assert args.option == [("depth", 2)]
    with pytest.raises(SystemExit):
        parse(["unet"])  # -o is required


def test_bad_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--batch must be >= 1"):
        export.run(parse(["unet", "--tiny", "-o", str(tmp_path / "x.onnx"), "--batch", "0"]))
