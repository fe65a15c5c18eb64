"""Feature-extractor backbones written for segfast (no classifiers).

Each returns a list of stage outputs from ``forward`` and describes them with
``out_channels`` and ``strides`` tuples.
"""

from __future__ import annotations

from .mobilenetv2 import InvertedResidual, MobileNetV2, make_divisible, mobilenet_v2
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101
from .vgg import VGG16, vgg16, vgg16_bn

__all__ = [
    "VGG16",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "make_divisible",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg16",
    "vgg16_bn",
]
