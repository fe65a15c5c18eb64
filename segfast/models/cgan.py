"""Conditional GAN generator (Mirza & Osindero, "Conditional Generative
Adversarial Nets", arXiv 2014) in DCGAN's convolutional form.

Written for segfast. The paper conditions both networks on a label ``y`` by
feeding it in alongside the noise; here the integer label is embedded
(``nn.Embedding(num_classes, embed_dim)``), concatenated with z on the channel
axis and decoded by the DCGAN generator stack (Radford et al. 2015) to a 64×64
image in [-1, 1].

Parameters: ``num_classes·embed_dim + 16·(nz + embed_dim)·8·ngf
+ 16·ngf²·(32 + 8 + 2) + 16·ngf·out_channels + 2·15·ngf`` — 3,986,804 at the
defaults (10 classes, nz 100, embed_dim 50, ngf 64, 3 channels).

``labels`` are checked by shape and dtype only: a value check would be a
data-dependent branch that ``torch.export`` cannot capture. An out-of-range
label raises an ``IndexError`` in ``nn.Embedding`` on the CPU (a device-side
assert on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import ModelSpec, Reference, register
from .dcgan import IMAGE_SIZE, check_latent, generator_stack, init_dcgan_weights


class CGANGenerator(nn.Module):
    """``(z [N, nz, 1, 1] or [N, nz], labels int [N])`` → image ``[N, out_channels, 64, 64]``."""

    def __init__(
        self,
        num_classes: int = 10,
        nz: int = 100,
        embed_dim: int = 50,
        ngf: int = 64,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.nz = nz
        self.embed_dim = embed_dim
        self.out_channels = out_channels
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.main = generator_stack(nz + embed_dim, ngf, out_channels)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = check_latent(z, self.nz, "CGANGenerator")  # z: [N, nz, 1, 1]
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"CGANGenerator expects int64 or int32 class labels, got dtype {labels.dtype}"
            )
        if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
            raise ValueError(
                f"CGANGenerator expects labels of shape [{z.shape[0]}] (one per z), "
                f"got {tuple(labels.shape)}"
            )
        cond = self.embed(labels).reshape(z.shape[0], self.embed_dim, 1, 1)  # [N, E, 1, 1]
        return self.main(torch.cat([z, cond], dim=1))  # [N, out_channels, 64, 64]


def cgan_generator(
    num_classes: int = 10,
    nz: int = 100,
    embed_dim: int = 50,
    ngf: int = 64,
    out_channels: int = 3,
) -> CGANGenerator:
    """Build a :class:`CGANGenerator` (defaults: 10 classes, nz 100, 50-d label embedding)."""
    return CGANGenerator(num_classes, nz, embed_dim, ngf, out_channels)


def conditional_inputs(
    model: nn.Module, batch: int, size: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """Example inputs: ``z ~ N(0, 1)`` ``[batch, nz, 1, 1]`` and uniform labels ``[batch]``."""
    del size  # the output size is fixed at 64×64
    z = torch.randn(batch, int(model.nz), 1, 1)
    labels = torch.randint(0, int(model.num_classes), (batch,))
    return z, labels


def _reference_params(num_classes: int, nz: int, embed_dim: int, ngf: int, out: int) -> int:
    convs = 16 * ((nz + embed_dim) * 8 * ngf + ngf * ngf * (32 + 8 + 2) + ngf * out)
    return num_classes * embed_dim + convs + 2 * 15 * ngf


register(
    ModelSpec(
        name="cgan_generator",
        factory=cgan_generator,
        task="generation",
        description="Conditional GAN generator (Mirza & Osindero 2014), DCGAN form, label → image",
        tiny={"nz": 16, "embed_dim": 8, "ngf": 8},
        standard_size=(IMAGE_SIZE, IMAGE_SIZE),
        standard_batch=64,
        min_size=IMAGE_SIZE,
        reference=Reference(
            params=_reference_params(10, 100, 50, 64, 3),
            options={"num_classes": 10, "nz": 100, "embed_dim": 50, "ngf": 64},
            source="this implementation (Mirza & Osindero 2014 conditioning on the DCGAN "
            "generator); formula: classes·E + 16·((nz+E)·8g + 42g² + 3g) + 30g",
            published=False,
        ),
        example_inputs=conditional_inputs,
    ),
    aliases=("cgan",),
)
