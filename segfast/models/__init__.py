"""Reference PyTorch models, registered by name.

``create("unet", num_classes=3)`` builds one; ``names()`` lists them;
``build_from_reference`` also takes ``"package.module:factory"`` strings;
``get_spec(name)`` gives its defaults, tiny test configuration, standard
benchmark size and the published parameter count it is checked against.
Every model is a plain ``nn.Module`` of standard layers that ``torch.export``
captures, written for segfast from its paper.
"""

from __future__ import annotations

from . import cgan, dcgan, deeplabv3plus, fcn, pspnet, segnet, unet
from ._build import build_from_reference
from ._registry import (
    ModelSpec,
    Reference,
    count_parameters,
    create,
    find_spec,
    get_spec,
    names,
)
from .cgan import CGANGenerator
from .dcgan import DCGANDiscriminator, DCGANGenerator
from .deeplabv3plus import DeepLabV3Plus
from .fcn import FCN8s, FCNResNet50
from .pspnet import PSPNet
from .segnet import SegNet
from .unet import UNet, unet_valid_geometry, unet_valid_margin

__all__ = [
    "CGANGenerator",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DeepLabV3Plus",
    "FCN8s",
    "FCNResNet50",
    "ModelSpec",
    "PSPNet",
    "Reference",
    "SegNet",
    "UNet",
    "build_from_reference",
    "cgan",
    "count_parameters",
    "create",
    "dcgan",
    "deeplabv3plus",
    "fcn",
    "find_spec",
    "get_spec",
    "names",
    "pspnet",
    "segnet",
    "unet",
    "unet_valid_geometry",
    "unet_valid_margin",
]
