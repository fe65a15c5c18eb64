"""Every registered model, in its tiny configuration: shapes, determinism,
``torch.export``, safetensors round trips and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segfast.models import count_parameters, create, get_spec, names

ALL = names()
SEGMENTATION = names("segmentation")
GENERATORS = names("generation")
SIZES = [(37, 53), (100, 130)]


def tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create(name, tiny=True).eval()


def inputs(name: str, model: nn.Module, batch: int = 2, size=(37, 53)) -> tuple[torch.Tensor, ...]:
    spec = get_spec(name)
    torch.manual_seed(1)
    if spec.task != "segmentation":
        size = spec.standard_size
    return spec.make_inputs(model, batch, size)


def test_registry_lists_the_zoo():
    assert set(ALL) == {
        "unet",
        "fcn8s",
        "fcn_resnet50",
        "segnet",
        "pspnet",
        "deeplabv3plus_resnet50",
        "deeplabv3plus_mobilenetv2",
        "dcgan_generator",
        "dcgan_discriminator",
        "cgan_generator",
    }


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("fcn", "fcn8s"),
        ("deeplabv3plus", "deeplabv3plus_resnet50"),
        ("dcgan", "dcgan_generator"),
        ("cgan", "cgan_generator"),
        ("DeepLabV3Plus-MobileNetV2", "deeplabv3plus_mobilenetv2"),
    ],
)
def test_aliases(alias, canonical):
    assert get_spec(alias).name == canonical


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(TypeError, match="takes: num_classes"):
        create("unet", widht=3)


@pytest.mark.parametrize("name", ALL)
def test_spec_is_complete(name):
    spec = get_spec(name)
    assert spec.description
    assert spec.reference is not None
    assert spec.reference.source
    assert spec.min_size >= 1
    assert set(spec.tiny) <= set(spec.options())


@pytest.mark.parametrize("name", ALL)
def test_tiny_attributes(name):
    model = tiny(name)
    spec = get_spec(name)
    assert count_parameters(model) < 1_000_000
    if spec.task == "generation":
        assert model.nz == spec.tiny["nz"]
        assert model.out_channels == 3
    else:
        assert model.in_channels == 3 or (name == "unet" and model.in_channels == 1)
        assert model.num_classes >= 1
    if name == "cgan_generator":
        assert model.num_classes == 10


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_output_shape(name, size):
    model = tiny(name)
    (x,) = inputs(name, model, 2, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, model.num_classes, *size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_output(name):
    model = tiny(name)
    with torch.no_grad():
        y = model(*inputs(name, model))
    assert y.shape == (2, model.out_channels, 64, 64)
    assert y.abs().max() <= 1.0  # tanh output


def test_generators_accept_flat_latents():
    model = tiny("dcgan_generator")
    z = torch.randn(2, model.nz)
    with torch.no_grad():
        torch.testing.assert_close(model(z), model(z[:, :, None, None]), rtol=0, atol=0)


def test_discriminator_output():
    model = tiny("dcgan_discriminator")
    with torch.no_grad():
        p = model(*inputs("dcgan_discriminator", model))
    assert p.shape == (2,)
    assert ((p >= 0) & (p <= 1)).all()


@pytest.mark.parametrize("name", ALL)
def test_eval_is_deterministic_and_batch_independent(name):
    model = tiny(name)
    args = inputs(name, model, 2)
    with torch.no_grad():
        y1 = model(*args)
        y2 = model(*args)
        first = model(*(a[:1] for a in args))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(first, y1[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_export_matches_eager(name):
    model = tiny(name)
    args = inputs(name, model, 2)
    exported = torch.export.export(model, args, strict=False)
    with torch.no_grad():
        expected = model(*args)
        got = exported.module()(*args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_export_with_dynamic_height_and_width(name):
    """Exported once at a multiple of 32, the program serves other sizes (pad-and-crop
    included: ``pad_to_multiple``/``crop_to`` stay symbolic)."""
    model = tiny(name)
    (x,) = inputs(name, model, 1, (64, 96))
    dims = {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    exported = torch.export.export(model, (x,), dynamic_shapes=(dims,), strict=False)
    (other,) = inputs(name, model, 1, (37, 53))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_safetensors_round_trip(name, tmp_path):
    model = tiny(name, seed=0)
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = tiny(name, seed=123)
    args = inputs(name, model, 2)
    with torch.no_grad():
        before = fresh(*args)
        fresh.load_state_dict(load_file(str(path)))
        expected = model(*args)
        got = fresh(*args)
    assert not torch.equal(before, expected)  # the fresh model really started elsewhere
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_min_size(name):
    model = tiny(name)
    m = get_spec(name).min_size
    assert m == model.min_size
    c = model.in_channels
    with torch.no_grad():
        assert model(torch.randn(1, c, m, m)).shape == (1, model.num_classes, m, m)
        assert model(torch.randn(1, c, m, 9)).shape == (1, model.num_classes, m, 9)
    with pytest.raises(ValueError, match=f"needs H and W >= {m}"):
        model(torch.randn(1, c, m - 1, 9))


@pytest.mark.parametrize("name", [*SEGMENTATION, "dcgan_discriminator"])
def test_bad_image_inputs(name):
    model = tiny(name)
    c = model.in_channels
    with pytest.raises(ValueError, match=f"expects {c} input channels, got {c + 1}"):
        model(torch.randn(1, c + 1, 64, 64))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(c, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, c, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("size", [(63, 64), (64, 65), (128, 128)])
def test_discriminator_takes_64x64_only(size):
    model = tiny("dcgan_discriminator")
    with pytest.raises(ValueError, match=r"64x64 images only|H and W >= 64"):
        model(torch.randn(1, 3, *size))


@pytest.mark.parametrize("name", GENERATORS)
def test_bad_latents(name):
    model = tiny(name)
    extra = (torch.zeros(1, dtype=torch.int64),) if name == "cgan_generator" else ()
    with pytest.raises(ValueError, match=rf"z of shape \[N, {model.nz}, 1, 1\]"):
        model(torch.randn(1, model.nz + 1, 1, 1), *extra)
    with pytest.raises(ValueError, match="z of shape"):
        model(torch.randn(1, model.nz, 2, 2), *extra)
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, model.nz, dtype=torch.int64), *extra)


def test_cgan_label_checks():
    model = tiny("cgan_generator")
    z = torch.randn(2, model.nz, 1, 1)
    with pytest.raises(ValueError, match="int64 or int32 class labels"):
        model(z, torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels of shape \[2\]"):
        model(z, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(IndexError):
        model(z, torch.tensor([0, model.num_classes]))


def test_cgan_label_changes_the_image():
    model = tiny("cgan_generator")
    z = torch.randn(1, model.nz, 1, 1).expand(2, -1, -1, -1)
    with torch.no_grad():
        y = model(z, torch.tensor([0, 1]))
    assert not torch.allclose(y[0], y[1])
