"""Full-size parameter counts against the published ones (built on the meta
device: no memory, no init cost)."""

from __future__ import annotations

import pytest
import torch

from segfast.models import count_parameters, create, get_spec, names
from segfast.models.backbones import (
    mobilenet_v2,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    vgg16,
    vgg16_bn,
)

# Exact counts of this implementation at each reference's options, so a change
# to any architecture shows up here even when it stays inside the 2 % band.
EXACT = {
    "unet": 31_030_658,
    "fcn8s": 134_489_759,
    "fcn_resnet50": 35_322_218,
    "segnet": 29_446_220,
    "pspnet": 46_592_597,
    "deeplabv3plus_resnet50": 26_679_633,
    "deeplabv3plus_mobilenetv2": 4_380_561,
    "dcgan_generator": 3_576_704,
    "dcgan_discriminator": 2_765_568,
    "cgan_generator": 3_986_804,
}


def test_every_model_has_an_exact_count():
    assert set(EXACT) == set(names())


@pytest.mark.parametrize("name", names())
def test_full_size_count_matches_reference(name):
    ref = get_spec(name).reference
    assert ref is not None
    with torch.device("meta"):
        model = create(name, **ref.options)
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    assert n == EXACT[name]
    assert abs(n - ref.params) <= 0.02 * ref.params, f"{name}: {n:,} vs reference {ref.params:,}"


def test_unet_matches_the_paper_network_exactly():
    ref = get_spec("unet").reference
    with torch.device("meta"):
        model = create("unet", **ref.options)
    assert count_parameters(model) == ref.params == 31_030_658


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (resnet18, 11_176_512),
        (resnet34, 21_284_672),
        (resnet50, 23_508_032),
        (resnet101, 42_500_160),
        (vgg16, 14_714_688),
        (vgg16_bn, 14_723_136),
        (mobilenet_v2, 2_223_872),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_backbone_counts(builder, expected):
    with torch.device("meta"):
        model = builder()
    assert count_parameters(model) == expected
