"""``build_from_reference``: zoo names, aliases and ``module:factory`` strings."""

from __future__ import annotations

import pytest
from torch import nn

from segfast.errors import InputError
from segfast.models import SegNet, UNet, build_from_reference


def test_zoo_name_and_alias():
    model = build_from_reference("UNet", num_classes=3, tiny=True)
    assert isinstance(model, UNet)
    assert model.num_classes == 3
    assert model.segfast_spec == {
        "name": "unet",
        "options": {"base": 8, "depth": 3, "num_classes": 3},
    }
    assert isinstance(build_from_reference("segnet", width=8), SegNet)


def test_module_factory():
    model = build_from_reference("segfast.models.unet:unet", 4, 3, base=4, depth=2)
    assert isinstance(model, UNet)
    assert (model.num_classes, model.in_channels, model.depth) == (4, 3, 2)
    assert isinstance(build_from_reference("torch.nn:Identity"), nn.Identity)


@pytest.mark.parametrize(
    ("reference", "kwargs", "message"),
    [
        ("no_such_module_xyz:f", {}, "cannot import module"),
        ("segfast.models.unet:nope", {}, "has no 'nope'"),
        ("segfast.models.unet:_PAIR_LOSS", {}, "not callable"),
        ("segfast.models.unet:unet_valid_margin", {"depth": 2}, "returned int"),
        ("segfast.models.unet:unet", {"tiny": True}, "zoo models only"),
        (":unet", {}, "package.module:factory"),
    ],
)
def test_bad_references(reference, kwargs, message):
    with pytest.raises(InputError, match=message):
        build_from_reference(reference, **kwargs)


def test_unknown_zoo_name():
    with pytest.raises(InputError, match="known models"):
        build_from_reference("unet3d")


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("unett", "did you mean 'unet'"),
        ("deeplabv3plus_mobilenet", "did you mean 'deeplabv3plus_mobilenetv2'"),
        ("segent", "did you mean 'segnet'"),
    ],
)
def test_a_misspelt_zoo_name_is_a_bad_argument_with_close_matches(name, hint):
    """``create("unett")`` raised a bare KeyError; it is an InputError (a ValueError, like
    every bad argument to segfast) naming what is close."""
    from segfast import models

    with pytest.raises(InputError, match=hint) as info:
        models.create(name)
    assert isinstance(info.value, ValueError)
    assert "known models: " in str(info.value)
    with pytest.raises(InputError, match="unknown model 'zzz'; known models"):
        models.get_spec("zzz")
    assert models.find_spec(name) is None
    assert models.find_spec("UNet").name == "unet"
