"""The command line: `segfast models`, `segfast info`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segfast.cli import main, parse_size
from segfast.models import names


def test_parse_size():
    assert parse_size("512x1024") == (512, 1024)
    assert parse_size("256") == (256, 256)
    import argparse

    for bad in ("axb", "0x5", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_models_lists_every_model_with_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in names():
        assert name in out
    assert "31.03M" in out  # the paper U-Net
    assert "+0.00%" in out  # exact reference matches are shown as such


def test_info_model(capsys):
    assert main(["info", "unet", "--tiny", "--size", "64x48", "--in-channels", "3"]) == 0
    out = capsys.readouterr().out
    assert "1×3×64×48" in out
    assert "GFLOPs" in out
    assert "activations" in out


def test_info_environment(capsys):
    from segfast.backends.cpu import native

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    ok, why = native.status()
    assert f"CPU kernels (torch backend on the CPU): {'loaded' if ok else 'not used'}: {why}" in out


def test_info_user_model_file(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=2):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(8, num_classes, 1))\n"
    )
    assert main(["info", f"{f}:build", "--size", "32x32"]) == 0
    assert "parameters:  242" in capsys.readouterr().out


def test_errors_are_one_line(capsys):
    assert main(["info", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err
    assert "unet" in err
    assert main(["info", "unet", "-o", "nonsense=1"]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "segfast.cli", "models"], capture_output=True, text=True, check=True
    )
    assert "deeplabv3plus_mobilenetv2" in out.stdout


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["bench", "unet", "--tiny", "--backends", "torch", "--batch", "0"], "--batch"),
        (["bench", "unet", "--tiny", "--backends", "torch", "--iters", "0"], "--iters"),
        (["bench", "unet", "--tiny", "--backends", "torch", "--warmup", "-1"], "--warmup"),
        (["info", "unet", "--tiny", "--batch", "0"], "--batch"),
        (["build", "unet", "--tiny", "--batch", "-2", "-o", "never.plan"], "--batch"),
    ],
)
def test_counts_below_their_minimum_are_refused(argv, flag, capsys):
    """`bench --batch 0` used to run and report 0 GFLOP/s and a NaN mask agreement;
    `info --batch 0` silently used batch 1."""
    assert main(argv) == 2
    assert f"{flag} must be >= " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "unet", "--tiny", "--json", "{file}/r.json"], "is not a folder"),
        (["bench", "unet", "--tiny", "--plot", "{tmp}"], "is a directory"),
        (
            [
                "run",
                "unet",
                "--tiny",
                "--input",
                "{tmp}",
                "--output",
                "{tmp}/o",
                "--stats-json",
                "{file}/deeper/s.json",
            ],
            "is not a folder",
        ),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_first(argv, says, tmp_path, capsys):
    """It was refused only when written, after the whole benchmark or video."""
    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=tmp_path / "afile", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "unet", "--tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["name", "file"])
def test_serve_checks_the_model_before_starting_ray(what, tmp_path, capsys):
    """A bad name or a corrupt engine file failed every replica, and the command line saw
    only Ray's "Deploying application failed" ~25 s later."""
    pytest.importorskip("ray")
    bad = tmp_path / "empty.segfast"
    bad.write_bytes(b"")
    model = "no_such_model" if what == "name" else str(bad)
    assert main(["serve", model]) == 2
    err = capsys.readouterr().err
    assert ("unknown model" if what == "name" else "not a readable engine file") in err
    import ray

    assert not ray.is_initialized()
