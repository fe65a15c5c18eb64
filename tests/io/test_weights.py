"""Weights: safetensors and PyTorch state dicts, mismatch and corruption errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import segfast
from segfast import WeightsError, load_state_dict, load_weights, save_weights
from segfast.models import create


def _model() -> nn.Module:
    return create("unet", tiny=True, num_classes=3, in_channels=3)


def test_safetensors_round_trip(tmp_path):
    a, b = _model(), _model()
    path = save_weights(a, tmp_path / "w.safetensors")
    load_weights(b, path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


def test_torch_state_dict_and_wrappers(tmp_path):
    a = _model()
    for i, obj in enumerate(
        [
            a.state_dict(),
            {"state_dict": a.state_dict(), "epoch": 3},
            {f"module.{k}": v for k, v in a.state_dict().items()},
        ]
    ):
        path = tmp_path / f"w{i}.pt"
        torch.save(obj, path)
        b = load_weights(_model(), path)
        x = torch.randn(1, 3, 20, 24)
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_data_parallel_prefix_in_safetensors_too(tmp_path):
    """The ``module.`` prefix was unwrapped from .pt files only: a DataParallel model's
    safetensors file listed every key as missing."""
    from safetensors.torch import save_file

    a = _model()
    path = tmp_path / "dp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b = load_weights(_model(), path)
    x = torch.randn(1, 3, 20, 24)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_integer_tensors_for_float_weights_are_refused():
    """load_state_dict casts them silently: a state dict of int64 ones loaded as weights."""
    m = _model()
    state = {k: torch.ones_like(v, dtype=torch.int64) if v.is_floating_point() else v
             for k, v in m.state_dict().items()}  # fmt: skip
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(WeightsError, match=r"(?s)dtype mismatches .*int64 for float32"):
        load_weights(m, state)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    half = {k: v.half() if v.is_floating_point() else v for k, v in before.items()}
    load_weights(m, half)  # fp16 → fp32 is a precision, not a kind: taken


def test_format_detected_from_content(tmp_path):
    a = _model()
    path = save_weights(a, tmp_path / "weights.bin")  # safetensors under another name
    assert set(load_state_dict(path)) == set(a.state_dict())


def test_mismatch_lists_keys_and_shapes(tmp_path):
    state = _model().state_dict()
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    key = "head.weight" if "head.weight" in state else next(k for k in state if "weight" in k)
    state[key] = torch.zeros(7, 7)
    path = tmp_path / "bad.safetensors"
    save_weights(state, path)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(model, path)
    msg = str(err.value)
    assert "keys missing" in msg
    assert "unexpected keys" in msg
    assert "extra.weight" in msg
    assert "shape mismatches" in msg
    assert key in msg
    assert "(7, 7)" in msg
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mismatch_list_is_truncated(tmp_path):
    state = {f"junk.{i}": torch.zeros(1) for i in range(40)}
    with pytest.raises(WeightsError, match=r"40 unexpected keys in the file \(and 30 more\)"):
        load_weights(_model(), state)


def test_non_strict_tolerates_missing_but_not_shapes():
    model = _model()
    state = dict(model.state_dict())
    state.pop(next(iter(state)))
    load_weights(model, state, strict=False)
    key = next(iter(state))
    state[key] = torch.zeros(2, 2, 2)
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_weights(model, state, strict=False)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_weights(_model(), path)
    else:
        torch.save(_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_state_dict(path)


def test_garbage_empty_missing_and_directory(tmp_path):
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(WeightsError):
        load_state_dict(garbage)
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict(empty)
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="directory"):
        load_state_dict(tmp_path)
    fake = tmp_path / "f.safetensors"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError):
        load_state_dict(fake)


class _Evil:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"w": torch.zeros(1), "evil": _Evil()}, fh)
    with pytest.raises(WeightsError, match="refuses to unpickle"):
        load_state_dict(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError):
        load_state_dict(raw)


def test_random_bytes_are_called_corrupt_not_objects(tmp_path):
    """A stream that is no pickle of objects (random bytes, a plain pickle protocol torch
    cannot read) was reported as "holds Python objects other than tensors"."""
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file") as err:
        load_state_dict(garbage)
    assert "refuses to unpickle" not in str(err.value)
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "evil": _Evil()}, evil)
    with pytest.raises(WeightsError, match=r"refuses to unpickle.*Detail: Unsupported global"):
        load_state_dict(evil)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    target = tmp_path / "w.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_weights(_model(), target)
    assert list(tmp_path.iterdir()) == []


def test_shared_tensors_are_saved(tmp_path):
    lin = nn.Linear(4, 4)
    state = {"a": lin.weight, "b": lin.weight, "c": lin.weight.t()}
    path = save_weights(state, tmp_path / "s.safetensors")
    loaded = load_state_dict(path)
    assert torch.equal(loaded["a"], loaded["b"])
    assert torch.equal(loaded["c"], lin.weight.t())


def test_public_api_exports():
    assert segfast.load_weights is load_weights


def test_saving_is_byte_deterministic(tmp_path):
    model = _model()
    a = save_weights(model, tmp_path / "a.safetensors", metadata={"z": 1, "a": [1, 2], "m": "x"})
    b = save_weights(model, tmp_path / "b.safetensors", metadata={"m": "x", "a": [1, 2], "z": 1})
    assert a.read_bytes() == b.read_bytes()
