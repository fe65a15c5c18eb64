"""DCGAN generator and discriminator (Radford, Metz, Chintala, "Unsupervised
Representation Learning with Deep Convolutional Generative Adversarial
Networks", ICLR 2016, arXiv 2015), for 64×64 images.

Written for segfast from the paper's guidelines (§3: strided convs instead of
pooling, BatchNorm except at the generator output and the discriminator
input, ReLU + tanh in the generator, LeakyReLU(0.2) in the discriminator, no
fully connected hidden layers) with the widths of the paper's Fig. 1
(1024→512→256→128 at ``ngf=128``; the common ``ngf=64`` halves them).

* Generator: z ``[N, nz, 1, 1]`` → ConvTranspose2d(nz → 8·ngf, 4, 1, 0) →
  (4·ngf) → (2·ngf) → (ngf), each ConvTranspose2d(4, 2, 1, no bias) + BN + ReLU,
  → ConvTranspose2d(ngf → out_channels, 4, 2, 1, no bias) → tanh: 4→8→16→32→64.
  3,576,704 parameters at nz=100, ngf=64, 3 channels.
* Discriminator: 64×64 image → Conv(4, 2, 1, no bias) + LeakyReLU (no BN on the
  first layer) → three Conv(4, 2, 1, no bias) + BN + LeakyReLU → Conv(8·ndf → 1,
  4, 1, 0) → sigmoid: one real/fake probability per image, shape ``[N]``.
  2,765,568 parameters at ndf=64.

Weights start as in the paper: conv weights ~ N(0, 0.02), BN scale ~ N(1, 0.02).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_image_input
from ._registry import ModelSpec, Reference, register

IMAGE_SIZE = 64


def init_dcgan_weights(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) conv weights, N(1, 0.02) BN scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def generator_stack(in_ch: int, ngf: int, out_channels: int) -> nn.Sequential:
    """The DCGAN generator body: ``[N, in_ch, 1, 1]`` → ``[N, out_channels, 64, 64]`` in [-1, 1]."""
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(in_ch, ngf * 8, 4, 1, 0, bias=False),
        nn.BatchNorm2d(ngf * 8),
        nn.ReLU(inplace=True),
    ]
    for mult in (8, 4, 2):
        layers += [
            nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * mult // 2),
            nn.ReLU(inplace=True),
        ]
    layers += [nn.ConvTranspose2d(ngf, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def check_latent(z: torch.Tensor, nz: int, name: str) -> torch.Tensor:
    """Validate a latent batch ``[N, nz, 1, 1]`` or ``[N, nz]``; return it as ``[N, nz, 1, 1]``."""
    if not z.is_floating_point():
        raise ValueError(f"{name} expects a floating-point latent z, got dtype {z.dtype}")
    if z.dim() == 2 and z.shape[1] == nz:
        return z.reshape(z.shape[0], nz, 1, 1)
    if z.dim() == 4 and z.shape[1] == nz and z.shape[2] == 1 and z.shape[3] == 1:
        return z
    raise ValueError(
        f"{name} expects z of shape [N, {nz}, 1, 1] or [N, {nz}], got {tuple(z.shape)}"
    )


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``z [N, nz, 1, 1]`` or ``[N, nz]`` → ``[N, out_channels, 64, 64]`` image."""

    def __init__(self, nz: int = 100, ngf: int = 64, out_channels: int = 3) -> None:
        super().__init__()
        self.nz = nz
        self.out_channels = out_channels
        self.main = generator_stack(nz, ngf, out_channels)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = check_latent(z, self.nz, "DCGANGenerator")  # z: [N, nz, 1, 1]
        return self.main(z)  # [N, out_channels, 64, 64]


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: image ``[N, in_channels, 64, 64]`` → probability ``[N]``."""

    num_classes = 1

    def __init__(self, in_channels: int = 3, ndf: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for mult in (1, 2, 4):
            layers += [
                nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in_channels, 64, 64] -> [N]
        check_image_input(x, self.in_channels, IMAGE_SIZE, "DCGANDiscriminator")
        if x.shape[-2] != IMAGE_SIZE or x.shape[-1] != IMAGE_SIZE:
            raise ValueError(
                f"DCGANDiscriminator takes {IMAGE_SIZE}x{IMAGE_SIZE} images only, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        return self.main(x).reshape(-1)  # [N, 1, 1, 1] -> [N]


def dcgan_generator(nz: int = 100, ngf: int = 64, out_channels: int = 3) -> DCGANGenerator:
    """Build a :class:`DCGANGenerator` (defaults: nz 100, ngf 64, RGB)."""
    return DCGANGenerator(nz, ngf, out_channels)


def dcgan_discriminator(in_channels: int = 3, ndf: int = 64) -> DCGANDiscriminator:
    """Build a :class:`DCGANDiscriminator` (defaults: RGB, ndf 64)."""
    return DCGANDiscriminator(in_channels, ndf)


def latent_inputs(model: nn.Module, batch: int, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Example inputs of a DCGAN generator: ``z ~ N(0, 1)`` of shape ``[batch, nz, 1, 1]``."""
    del size  # the output size is fixed at 64×64
    return (torch.randn(batch, int(model.nz), 1, 1),)


register(
    ModelSpec(
        name="dcgan_generator",
        factory=dcgan_generator,
        task="generation",
        description="DCGAN generator (Radford et al. 2015), z → 64×64 image",
        tiny={"nz": 16, "ngf": 8},
        standard_size=(IMAGE_SIZE, IMAGE_SIZE),
        standard_batch=64,
        min_size=IMAGE_SIZE,
        reference=Reference(
            params=3_576_704,
            options={"nz": 100, "ngf": 64, "out_channels": 3},
            source="Radford et al. 2015 architecture at ngf=64 (PyTorch's DCGAN example "
            "generator): 3,576,704 parameters",
        ),
        example_inputs=latent_inputs,
    ),
    aliases=("dcgan",),
)

register(
    ModelSpec(
        name="dcgan_discriminator",
        factory=dcgan_discriminator,
        task="discrimination",
        description="DCGAN discriminator (Radford et al. 2015), 64×64 image → real/fake",
        tiny={"ndf": 8},
        standard_size=(IMAGE_SIZE, IMAGE_SIZE),
        standard_batch=64,
        min_size=IMAGE_SIZE,
        reference=Reference(
            params=2_765_568,
            options={"in_channels": 3, "ndf": 64},
            source="Radford et al. 2015 architecture at ndf=64 (PyTorch's DCGAN example "
            "discriminator): 2,765,568 parameters",
        ),
    ),
)
