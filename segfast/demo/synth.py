"""Procedural fluorescence-microscopy-like images of nuclei, with exact masks.

The demo model (:mod:`segfast.demo.train`) learns from these images alone, so the
generator imitates what makes real nuclear stains (DAPI, Hoechst, hematoxylin)
hard to threshold:

* **nuclei**: ellipses with a wobbly outline (radius modulated by harmonics 2-4),
  of varied size, elongation, orientation and brightness (some dim, a few bright
  "mitotic" ones); touching and partly overlapping clusters; intensities add
  where they overlap, as fluorescence does;
* **interior**: chromatin texture (band-pass noise that moves with the nucleus)
  and a radial profile that is brighter at the rim or at the centre;
* **surroundings that are not nuclei**: in some images dim cell bodies around
  the nuclei (cytoplasmic stain, autofluorescence), dark phase-contrast-like
  halos, dark regions (empty lumen) that leave the background mid-grey, or
  faint outline-less blobs of clutter at the nuclei's scale;
* **optics**: Gaussian blur (the point-spread function), a smooth multiplicative
  illumination field (vignetting, uneven excitation), an additive background
  haze with dim out-of-focus nuclei and small bright debris that are *not*
  nuclei;
* **camera**: Poisson shot noise at a random photon budget plus Gaussian read noise.

The mask is the exact geometry *before* the optics: a pixel is a nucleus when its
centre lies inside some nucleus's outline. Instance labels give every nucleus its
own id; a pixel covered by two nuclei belongs to the one whose centre it is
relatively closer to. Everything is drawn from one ``numpy.random.Generator``, so
a seed gives the same image on every machine with the same NumPy and SciPy.

Rendering is vectorised: the nuclei's patches are computed as ``[N, S, S]``
arrays (in groups of similar size) and scattered into the image with
``np.bincount``. One CPU core makes a 128×128 image in ~4 ms and a 256×256
one in ~15 ms (a video frame of 256×256 in ~10-20 ms).

:func:`synth_video` moves the same kind of nuclei slowly between frames (smooth
random drift, slow rotation, and a few divisions into two daughters), with the
instance ids kept from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

SeedLike = int | np.random.SeedSequence | np.random.Generator | None

# Default per-image range of the mean nucleus radius in pixels, sampled
# log-uniformly: from ~4 px (low magnification) to ~28 px (a 40× objective at
# 512 px); larger nuclei are reached at inference by downscaling the image.
DEFAULT_RADIUS = (3.5, 28.0)
# Period of the tiled chromatin texture, in texture pixels (a power of two).
_TEX_PERIOD = 64
# The low-frequency fields (illumination, haze, out-of-focus nuclei) are drawn
# on a grid this many times coarser and upsampled bilinearly.
_COARSE = 4


class SynthSample(NamedTuple):
    """One generated image: ``image`` float32 [H, W] in [0, 1]; ``mask`` uint8
    [H, W] (0 background, 1 nucleus); ``labels`` int32 [H, W] instance ids
    (0 background) when asked for, else ``None``."""

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray | None


class SynthVideo(NamedTuple):
    """A generated clip: ``frames`` float32 [T, H, W] in [0, 1]; ``masks`` uint8
    [T, H, W]; ``labels`` int32 [T, H, W] with ids kept across frames (a dividing
    nucleus's daughters get new ids) when asked for, else ``None``."""

    frames: np.ndarray
    masks: np.ndarray
    labels: np.ndarray | None


@dataclass
class _Nuclei:
    """Per-nucleus parameters, one array entry per nucleus."""

    cy: np.ndarray  # centre row (float, may lie outside the image)
    cx: np.ndarray  # centre column
    a: np.ndarray  # semi-axis along theta (px)
    b: np.ndarray  # semi-axis across theta (px)
    theta: np.ndarray  # orientation (rad)
    inten: np.ndarray  # brightness above background
    tex_amp: np.ndarray  # chromatin texture contrast
    tex_scale: np.ndarray  # texture pixels per image pixel
    tex_oy: np.ndarray  # texture offset (moves with the nucleus), int
    tex_ox: np.ndarray
    dome: np.ndarray  # radial profile: > 0 bright rim, < 0 bright centre
    eps: np.ndarray  # [N, 3] outline harmonics k = 2, 3, 4 (relative amplitude)
    psi: np.ndarray  # [N, 3] their phases
    ids: np.ndarray  # instance id (>= 1), int32

    def __len__(self) -> int:
        return len(self.cy)

    def take(self, index: np.ndarray) -> _Nuclei:
        return _Nuclei(**{k: v[index] for k, v in vars(self).items()})

    @staticmethod
    def concat(parts: list[_Nuclei]) -> _Nuclei:
        keys = vars(parts[0]).keys()
        return _Nuclei(**{k: np.concatenate([vars(p)[k] for p in parts]) for k in keys})


@dataclass
class _Style:
    """Per-image optics and camera: fixed for a whole video."""

    blur: float  # PSF sigma (px)
    illum: np.ndarray  # [H, W] multiplicative illumination
    background: np.ndarray  # [H, W] additive haze + out-of-focus nuclei
    photons: float  # photon count at intensity 1 (shot noise)
    read_noise: float  # Gaussian sigma
    texture: np.ndarray  # [P, P] zero-mean, unit-std periodic chromatin texture
    debris_yx: np.ndarray  # [K, 2] positions of bright specks (not nuclei)
    debris_amp: np.ndarray  # [K]
    cyto_scale: float  # cell bodies around the nuclei: size factor (0 = none) ...
    cyto_amp: float  # ... and brightness relative to the nucleus
    halo_scale: float  # dark phase-contrast-like rings: outer size factor (0 = none) ...
    halo_amp: float  # ... and depth (absolute)


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        h, w = (int(s) for s in size)
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8×8, got {h}×{w}")
    return h, w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], waves: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: ``waves`` plane waves of at most 1.5 cycles per image."""
    y = np.linspace(0.0, 1.0, shape[0])[:, None]
    x = np.linspace(0.0, 1.0, shape[1])[None, :]
    field = np.zeros(shape)
    for _ in range(waves):
        fy, fx = rng.uniform(-1.5, 1.5, 2)
        field += rng.uniform(0.3, 1.0) * np.cos(
            2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi)
        )
    return field / max(float(np.abs(field).max()), 1e-6)


def _upsample(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [h, w] grid (h, w >= 2) to ``shape``, pixel centres aligned."""

    def lerp_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
        n_in = a.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.minimum(pos.astype(np.int64), n_in - 2)
        frac = pos - lo
        frac = frac[:, None] if axis == 0 else frac[None, :]
        return np.take(a, lo, axis) * (1.0 - frac) + np.take(a, lo + 1, axis) * frac

    return lerp_axis(lerp_axis(coarse, shape[0], 0), shape[1], 1)


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Periodic band-pass noise (blobs ~2-4 texture px), zero mean, unit std."""
    p = _TEX_PERIOD
    f = np.fft.fftfreq(p)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    band = np.exp(-f2 / (2 * 0.08**2)) - np.exp(-f2 / (2 * 0.02**2))
    noise = np.fft.fft2(rng.standard_normal((p, p)))
    tex = np.fft.ifft2(noise * band).real
    return ((tex - tex.mean()) / tex.std()).astype(np.float32)


def _draw_nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radius: tuple[float, float],
) -> tuple[_Nuclei, float]:
    """Random nuclei for one field of view, and the image's mean radius."""
    h, w = shape
    r_mean = float(np.exp(rng.uniform(np.log(radius[0]), np.log(radius[1]))))
    if rng.random() < 0.03:  # an empty field: the model must not invent nuclei in noise
        return _empty_nuclei(), r_mean
    coverage = rng.uniform(0.06, 0.45)
    cluster_p = rng.uniform(0.0, 0.7)  # share of nuclei placed against another one
    n_target = max(1, int(coverage * h * w / (np.pi * r_mean**2)))

    r = r_mean * np.exp(rng.normal(0.0, 0.22, size=2 * n_target + 8))
    r = np.clip(r, 0.5 * r_mean, 1.8 * r_mean)
    cy = np.empty_like(r)
    cx = np.empty_like(r)
    n = 0
    # Random sequential placement: a free nucleus keeps 0.95·(r_i + r_j) from every
    # other; a cluster member is put against an accepted one at 0.75-1.0·(r_i + r_j)
    # (touching, up to a quarter overlapping) and keeps 0.75·(r_i + r_j) from the rest.
    for i in range(len(r)):
        if n >= n_target:
            break
        for _ in range(4):
            if n and rng.random() < cluster_p:
                j = int(rng.integers(n))
                ang = rng.uniform(0, 2 * np.pi)
                d = (r[j] + r[i]) * rng.uniform(0.75, 1.0)
                y, x = cy[j] + d * np.sin(ang), cx[j] + d * np.cos(ang)
                factor = 0.74
            else:
                y = rng.uniform(-0.5 * r[i], h + 0.5 * r[i])
                x = rng.uniform(-0.5 * r[i], w + 0.5 * r[i])
                factor = 0.95
            if n and np.any(np.hypot(cy[:n] - y, cx[:n] - x) < factor * (r[:n] + r[i])):
                continue
            r[n], cy[n], cx[n] = r[i], y, x
            n += 1
            break
    r, cy, cx = r[:n], cy[:n], cx[:n]

    elong = 1.0 + np.minimum(np.abs(rng.normal(0.0, 0.45, size=n)), 2.0)
    bright = rng.uniform(0.25, 0.75)
    inten = bright * np.exp(rng.normal(0.0, 0.3, size=n))
    kind = rng.random(n)
    inten = np.where(kind < 0.12, inten * 0.35, inten)  # dim nuclei
    inten = np.where(kind > 0.95, inten * 1.8, inten)  # bright, condensed (mitotic)
    tex = rng.uniform(0.05, 0.6)
    nuclei = _Nuclei(
        cy=cy,
        cx=cx,
        a=r * np.sqrt(elong),
        b=r / np.sqrt(elong),
        theta=rng.uniform(0, np.pi, size=n),
        inten=np.maximum(inten, 0.06),
        tex_amp=tex * rng.uniform(0.6, 1.4, size=n),
        tex_scale=np.full(n, np.clip(18.0 / r_mean, 0.4, 3.0)),
        tex_oy=rng.integers(0, _TEX_PERIOD, size=n),
        tex_ox=rng.integers(0, _TEX_PERIOD, size=n),
        dome=rng.uniform(-0.5, 0.6, size=n),
        eps=rng.uniform(0.0, 1.0, size=(n, 1)) * rng.uniform(0.0, 0.07, size=(n, 3)),
        psi=rng.uniform(0, 2 * np.pi, size=(n, 3)),
        ids=np.arange(1, n + 1, dtype=np.int32),
    )
    return nuclei, r_mean


def _empty_nuclei() -> _Nuclei:
    z = np.zeros(0)
    zi = np.zeros(0, dtype=np.int64)
    return _Nuclei(
        cy=z,
        cx=z,
        a=z,
        b=z,
        theta=z,
        inten=z,
        tex_amp=z,
        tex_scale=z,
        tex_oy=zi,
        tex_ox=zi,
        dome=z,
        eps=np.zeros((0, 3)),
        psi=np.zeros((0, 3)),
        ids=np.zeros(0, dtype=np.int32),
    )


def _draw_style(
    rng: np.random.Generator, shape: tuple[int, int], r_mean: float, bright: float
) -> _Style:
    """Optics and camera for one field; ``bright``: the nuclei's typical intensity."""
    h, w = shape
    coarse = (max(2, -(-h // _COARSE)), max(2, -(-w // _COARSE)))
    # Additive background: a flat offset, smooth haze and dim, very blurred
    # out-of-focus nuclei (not in the mask), all on the coarse grid.
    halo = rng.random() < 0.2
    level = rng.uniform(0.25, 0.45) if halo else rng.uniform(0.0, 0.22)
    bg = level + rng.uniform(0.0, 0.12) * (
        0.5 + 0.5 * _smooth_field(rng, coarse, int(rng.integers(1, 4)))
    )
    if rng.random() < 0.25:
        # Dark regions (empty lumen, a scratch in the stain): the background is then
        # not the darkest thing in the field, so it is not mapped to 0 by normalize().
        bg = bg + (rng.uniform(0.1, 0.3) if level < 0.2 else 0.0)
        field = _smooth_field(rng, coarse, int(rng.integers(2, 6)))
        dark = np.clip((field - rng.uniform(0.0, 0.6)) * rng.uniform(3.0, 10.0), 0.0, 1.0)
        bg = bg * (1.0 - rng.uniform(0.6, 1.0) * dark)
    n_ghost = int(rng.integers(0, 9))
    if n_ghost:
        gy = (np.arange(coarse[0])[:, None, None] + 0.5) * (h / coarse[0]) - 0.5
        gx = (np.arange(coarse[1])[None, :, None] + 0.5) * (w / coarse[1]) - 0.5
        py, px = rng.uniform(0, h, n_ghost), rng.uniform(0, w, n_ghost)
        sig = r_mean * rng.uniform(1.2, 3.0, n_ghost)
        amp = rng.uniform(0.02, 0.15, n_ghost)
        # Floor the exponent: subnormal floats slow every later operation on the field.
        expo = np.maximum(-((gy - py) ** 2 + (gx - px) ** 2) / (2 * sig**2), -30.0)
        bg = bg + (amp * np.exp(expo)).sum(-1)
    background = _upsample(bg, shape)
    if rng.random() < 0.35:
        # Structured clutter at the nuclei's scale (out-of-focus debris, uneven
        # stain): faint blobs with no outline, which are not nuclei either.
        cell = max(1.0, r_mean / 2.0)
        grid = rng.standard_normal((max(2, int(h / cell) + 1), max(2, int(w / cell) + 1)))
        background = background + rng.uniform(0.05, 0.2) * bright * _upsample(grid, shape)
    illum = 1.0 + rng.uniform(0.0, 0.45) * _smooth_field(rng, coarse, int(rng.integers(1, 4)))
    n_debris = int(rng.integers(0, 12))
    return _Style(
        blur=float(min(rng.uniform(0.4, 2.0), 0.45 * r_mean)),
        illum=_upsample(illum, shape).astype(np.float32),
        background=background.astype(np.float32),
        photons=float(np.exp(rng.uniform(np.log(15.0), np.log(1000.0)))),
        read_noise=float(rng.uniform(0.002, 0.04)),
        texture=_texture(rng),
        debris_yx=rng.uniform(0, 1, (n_debris, 2)) * (h, w),
        debris_amp=rng.uniform(0.15, 0.8, n_debris),
        cyto_scale=float(rng.uniform(1.5, 2.3)) if rng.random() < 0.4 else 0.0,
        cyto_amp=float(rng.uniform(0.06, 0.25)),
        halo_scale=float(rng.uniform(1.2, 1.6)) if halo else 0.0,
        halo_amp=float(rng.uniform(0.1, 0.25)),
    )


# Nuclei are rendered in groups of similar size, each group on patches just
# large enough for its largest member (one patch size for all would be set by
# the largest nucleus and waste most of the work on small ones).
_GROUP = 48


def _patches(
    nuc: _Nuclei, shape: tuple[int, int], texture: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rendered patch pixels of ``nuc``, flattened to the in-image ones with any signal.

    Returns (flat pixel index, value, inside the outline, normalised radius q,
    nucleus index), each 1-D.
    """
    h, w = shape
    reach = nuc.a * (1.0 + nuc.eps.sum(1)) + 2.0  # outline bound + the soft edge
    half = int(np.ceil(reach.max()))
    d = np.arange(-half, half + 1, dtype=np.float32)  # patch offsets, S = 2·half + 1
    iy0 = np.round(nuc.cy).astype(np.int64)
    ix0 = np.round(nuc.cx).astype(np.int64)
    # Coordinates relative to each centre: y [N, S, 1], x [N, 1, S].
    y = (iy0 - nuc.cy).astype(np.float32)[:, None, None] + d[None, :, None]
    x = (ix0 - nuc.cx).astype(np.float32)[:, None, None] + d[None, None, :]
    cos = np.cos(nuc.theta).astype(np.float32)[:, None, None]
    sin = np.sin(nuc.theta).astype(np.float32)[:, None, None]
    u = (x * cos + y * sin) / nuc.a.astype(np.float32)[:, None, None]
    v = (y * cos - x * sin) / nuc.b.astype(np.float32)[:, None, None]
    rho = np.sqrt(u * u + v * v)  # [N, S, S]
    # Harmonics 2, 3, 4 of the outline radius, cos(kφ + ψ) = cos kφ cos ψ − sin kφ sin ψ,
    # with cos kφ and sin kφ from powers of (u + iv)/ρ: no arctan2 or cos per pixel.
    safe = np.where(rho > 0, rho, 1.0)
    c1, s1 = np.where(rho > 0, u / safe, 1.0), v / safe
    c2, s2 = c1 * c1 - s1 * s1, 2.0 * c1 * s1
    c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
    c4, s4 = c2 * c2 - s2 * s2, 2.0 * c2 * s2
    outline = np.ones_like(rho)
    for k, (ck, sk) in enumerate(((c2, s2), (c3, s3), (c4, s4))):
        e = nuc.eps[:, k].astype(np.float32)[:, None, None]
        p = nuc.psi[:, k].astype(np.float32)[:, None, None]
        outline += e * (ck * np.cos(p) - sk * np.sin(p))
    q = rho / outline  # < 1 inside the nucleus
    # Anti-aliased edge centred on the outline: ~1 px wide (dq/dr ≈ 1/radius).
    r_px = np.sqrt(nuc.a * nuc.b).astype(np.float32)[:, None, None]
    edge = np.clip(0.5 + (1.0 - q) * r_px, 0.0, 1.0)
    py = iy0[:, None, None] + d.astype(np.int64)[None, :, None]  # [N, S, 1]
    px = ix0[:, None, None] + d.astype(np.int64)[None, None, :]  # [N, 1, S]
    sel = (edge > 0) & (py >= 0) & (py < h) & (px >= 0) & (px < w)  # [N, S, S]
    value = (nuc.inten.astype(np.float32)[:, None, None] * edge)[sel]
    qs = q[sel]
    if np.any(nuc.dome):
        dome = np.broadcast_to(nuc.dome.astype(np.float32)[:, None, None], sel.shape)[sel]
        value *= 1.0 + dome * (np.minimum(qs, 1.0) ** 2 - 0.5)
    if np.any(nuc.tex_amp):
        # Chromatin texture, sampled in the nucleus's own frame so it moves with it
        # (the period is a power of two: "& (P - 1)" is the modulo).
        wrap = texture.shape[0] - 1
        ts = nuc.tex_scale.astype(np.float32)[:, None, None]
        ty = (np.floor(y * ts).astype(np.int32) + nuc.tex_oy[:, None, None].astype(np.int32)) & wrap
        tx = (np.floor(x * ts).astype(np.int32) + nuc.tex_ox[:, None, None].astype(np.int32)) & wrap
        amp = np.broadcast_to(nuc.tex_amp.astype(np.float32)[:, None, None], sel.shape)[sel]
        value *= np.maximum(1.0 + amp * texture[ty, tx][sel], 0.0)
    which = np.broadcast_to(np.arange(len(nuc))[:, None, None], sel.shape)[sel]
    return (py * w + px)[sel], value, qs < 1.0, qs, which


def _render_nuclei(
    nuc: _Nuclei, shape: tuple[int, int], texture: np.ndarray, want_labels: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Noise-free nuclear signal [H, W], mask [H, W] and optional labels [H, W]."""
    h, w = shape
    if len(nuc) == 0:
        labels = np.zeros(shape, np.int32) if want_labels else None
        return np.zeros(shape, np.float32), np.zeros(shape, np.uint8), labels
    by_size = np.argsort(nuc.a * (1.0 + nuc.eps.sum(1)), kind="stable")
    parts = []
    for start in range(0, len(nuc), _GROUP):
        group = by_size[start : start + _GROUP]
        flat, value, inside, q, which = _patches(nuc.take(group), shape, texture)
        parts.append((flat, value, inside, q, group[which]))
    flat, value, inside, q, which = (np.concatenate(p) for p in zip(*parts, strict=True))
    signal = np.bincount(flat, weights=value, minlength=h * w)
    pix = flat[inside]
    mask = np.bincount(pix, minlength=h * w) > 0
    labels = None
    if want_labels:
        # Overlaps go to the nucleus whose (relative) centre is nearest: sort the
        # covered pixels by (pixel, q) and keep the first of each pixel.
        ids = nuc.ids[which[inside]]
        order = np.lexsort((q[inside], pix))
        pix, ids = pix[order], ids[order]
        first = np.ones(len(pix), bool)
        first[1:] = pix[1:] != pix[:-1]
        lab = np.zeros(h * w, np.int32)
        lab[pix[first]] = ids[first]
        labels = lab.reshape(shape)
    return signal.reshape(shape).astype(np.float32), mask.reshape(shape).astype(np.uint8), labels


def _typical(nuc: _Nuclei) -> float:
    """Median nucleus brightness (0.4 for an empty field)."""
    return float(np.median(nuc.inten)) if len(nuc) else 0.4


def _headroom(style: _Style) -> float:
    """Dimmer nuclei over a bright background, so that most of them stay below saturation."""
    return max(0.4, 1.0 - float(style.background.mean()))


def _scaled(nuc: _Nuclei, factor: float, inten: np.ndarray, tex_amp: float | None) -> _Nuclei:
    """A copy of ``nuc`` grown by ``factor`` with new brightness (and texture contrast)."""
    out = nuc.take(np.arange(len(nuc)))
    out.a, out.b, out.inten = nuc.a * factor, nuc.b * factor, inten
    out.dome = np.zeros(len(nuc))
    if tex_amp is not None:
        out.tex_amp = np.full(len(nuc), tex_amp)
        out.tex_scale = nuc.tex_scale / factor
    return out


def _render(
    nuc: _Nuclei, shape: tuple[int, int], style: _Style, want_labels: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nuclei plus what surrounds them but is not nucleus: cell bodies, dark halos."""
    signal, mask, labels = _render_nuclei(nuc, shape, style.texture, want_labels)
    if len(nuc) and style.cyto_scale:
        body = _scaled(nuc, style.cyto_scale, nuc.inten * style.cyto_amp, 0.5)
        glow = _render_nuclei(body, shape, style.texture, False)[0]
        # Overlapping cell bodies do not pile up: saturate softly at a typical body's level.
        cap = float(np.mean(body.inten)) * 1.5
        signal += cap * np.tanh(glow / cap)
    if len(nuc) and style.halo_scale:
        flat = np.full(len(nuc), style.halo_amp)
        ring = _render_nuclei(
            _scaled(nuc, style.halo_scale, flat, 0.0), shape, style.texture, False
        )[0]
        core = _render_nuclei(_scaled(nuc, 1.0, flat, 0.0), shape, style.texture, False)[0]
        signal -= np.clip(ring - core, 0.0, style.halo_amp)
    return signal, mask, labels


def _photograph(signal: np.ndarray, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Optics and camera: debris, PSF blur, background, illumination, noise, clip."""
    h, w = signal.shape
    if len(style.debris_yx):
        iy = np.clip(style.debris_yx[:, 0].astype(np.int64), 0, h - 1)
        ix = np.clip(style.debris_yx[:, 1].astype(np.int64), 0, w - 1)
        signal = signal.copy()
        np.add.at(signal, (iy, ix), style.debris_amp.astype(np.float32) * 3.0)
    optical = ndimage.gaussian_filter(signal, style.blur, mode="reflect", truncate=3.0)
    clean = style.illum * (style.background + optical)
    counts = rng.poisson(np.maximum(clean, 0.0) * style.photons)
    noisy = counts / style.photons + rng.normal(0.0, style.read_noise, size=clean.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def synth_image(
    size: int | tuple[int, int] = 256,
    seed: SeedLike = 0,
    *,
    labels: bool = False,
    radius: tuple[float, float] = DEFAULT_RADIUS,
) -> SynthSample:
    """One fluorescence-like image of nuclei with its exact mask (see the module docstring).

    ``size``: ``H`` or ``(H, W)``, at least 8. ``seed``: an int, a ``SeedSequence``
    or a ``numpy.random.Generator`` (consumed); the same seed gives the same
    sample. ``labels=True`` also returns instance ids. ``radius``: the range
    (px) of the per-image mean nucleus radius, sampled log-uniformly.
    """
    shape = _shape(size)
    if not 0 < radius[0] <= radius[1]:
        raise ValueError(f"radius must be (low, high) with 0 < low <= high, got {radius!r}")
    rng = _rng(seed)
    nuclei, r_mean = _draw_nuclei(rng, shape, radius)
    style = _draw_style(rng, shape, r_mean, _typical(nuclei))
    nuclei.inten = nuclei.inten * _headroom(style)
    signal, mask, lab = _render(nuclei, shape, style, labels)
    return SynthSample(_photograph(signal, style, rng), mask, lab)


def synth_batch(
    n: int,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    *,
    radius: tuple[float, float] = DEFAULT_RADIUS,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` independent samples stacked: images float32 [n, H, W], masks uint8 [n, H, W].

    Sample ``i`` uses ``SeedSequence([seed, i])``, so a batch is reproducible and
    any of its images can be regenerated alone with ``synth_image(size, SeedSequence([seed, i]))``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    h, w = _shape(size)
    images = np.empty((n, h, w), np.float32)
    masks = np.empty((n, h, w), np.uint8)
    for i in range(n):
        images[i], masks[i], _ = synth_image(
            (h, w), np.random.SeedSequence([seed, i]), radius=radius
        )
    return images, masks


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def synth_video(
    frames: int,
    size: int | tuple[int, int] = 256,
    seed: SeedLike = 0,
    *,
    labels: bool = False,
    radius: tuple[float, float] = (6.0, 11.0),
    speed: float = 0.5,
    divisions: float = 0.15,
) -> SynthVideo:
    """A clip of nuclei drifting and dividing slowly under one microscope setting.

    The optics (blur, illumination, background, noise level) are drawn once;
    each frame gets fresh camera noise. Nuclei drift with smoothly varying
    velocities (``speed`` px/frame typical), rotate slowly and bounce off the
    borders; ``divisions`` × (nuclei) × (frames / 100) of them divide: each splits
    along its long axis into two daughters of half its area that move apart over
    ten frames, glow brighter while condensed and then slowly grow.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    shape = _shape(size)
    h, w = shape
    rng = _rng(seed)
    nuc, r_mean = _draw_nuclei(rng, shape, radius)
    while len(nuc) == 0:  # an empty field makes a dull demo; draw again
        nuc, r_mean = _draw_nuclei(rng, shape, radius)
    style = _draw_style(rng, shape, r_mean, _typical(nuc))
    nuc.inten = nuc.inten * _headroom(style)
    style.photons = max(style.photons, 60.0)  # a watchable clip, not the noisiest case
    n = len(nuc)
    vel = rng.normal(0.0, speed, size=(n, 2))
    size0 = np.sqrt(nuc.a * nuc.b)  # each nucleus grows back towards this radius
    boost = np.ones(n)  # brightness multiplier while condensed after division
    # Divisions: (frame, index into the initial nuclei), at most one per nucleus.
    div_frames = 10
    n_div = min(n, round(divisions * n * frames / 100))
    if frames <= div_frames:
        n_div = 0
    dividers = rng.choice(n, size=n_div, replace=False) if n_div else np.zeros(0, np.int64)
    start = rng.integers(0, max(1, frames - div_frames), size=n_div)
    schedule = dict(zip(start.tolist(), [[] for _ in start], strict=True))
    for s, i in zip(start.tolist(), dividers.tolist(), strict=True):
        schedule[s].append(int(nuc.ids[i]))
    next_id = int(nuc.ids.max()) + 1
    # Ongoing divisions: daughter id pair -> (midpoint y, x, axis angle, start frame, radius).
    ongoing: dict[tuple[int, int], tuple[float, float, float, int, float]] = {}

    out_frames = np.empty((frames, h, w), np.float32)
    out_masks = np.empty((frames, h, w), np.uint8)
    out_labels = np.empty((frames, h, w), np.int32) if labels else None
    for t in range(frames):
        for pid in schedule.get(t, []):
            (row,) = np.flatnonzero(nuc.ids == pid)
            r_d = float(np.sqrt(nuc.a[row] * nuc.b[row]) / np.sqrt(2.0))
            kids = nuc.take(np.array([row, row]))
            kids.a = np.full(2, r_d * 1.15)
            kids.b = np.full(2, r_d / 1.15)
            kids.ids = np.array([next_id, next_id + 1], np.int32)
            kids.tex_oy = rng.integers(0, _TEX_PERIOD, size=2)
            kids.tex_ox = rng.integers(0, _TEX_PERIOD, size=2)
            ongoing[(next_id, next_id + 1)] = (
                float(nuc.cy[row]),
                float(nuc.cx[row]),
                float(nuc.theta[row]),
                t,
                r_d,
            )
            next_id += 2
            keep = np.arange(len(nuc)) != row
            nuc = _Nuclei.concat([nuc.take(keep), kids])
            vel = np.concatenate([vel[keep], np.repeat(vel[row : row + 1], 2, 0)])
            size0 = np.concatenate([size0[keep], np.full(2, r_d * np.sqrt(2.0) * 0.85)])
            boost = np.concatenate([boost[keep], np.full(2, 1.6)])
        # Daughters of ongoing divisions sit at midpoint ± half their separation.
        for (ia, ib), (my, mx, ang, t0, r_d) in list(ongoing.items()):
            prog = _smoothstep(np.array((t - t0) / div_frames))
            half_sep = float(0.5 * r_d * (0.6 + 1.8 * prog))
            for sign, cid in ((1.0, ia), (-1.0, ib)):
                (row,) = np.flatnonzero(nuc.ids == cid)
                nuc.cy[row] = my + sign * half_sep * np.sin(ang)
                nuc.cx[row] = mx + sign * half_sep * np.cos(ang)
                nuc.theta[row] = ang
            if t - t0 >= div_frames:
                del ongoing[(ia, ib)]
        inten = nuc.inten
        nuc.inten = inten * boost
        signal, out_masks[t], lab = _render(nuc, shape, style, labels)
        nuc.inten = inten
        out_frames[t] = _photograph(signal, style, rng)
        if out_labels is not None and lab is not None:
            out_labels[t] = lab
        # Motion for the next frame (Ornstein-Uhlenbeck velocities, reflecting borders).
        vel = 0.9 * vel + rng.normal(0.0, 0.45 * speed, size=vel.shape)
        busy = np.isin(nuc.ids, [i for pair in ongoing for i in pair])
        nuc.cy = np.where(busy, nuc.cy, nuc.cy + vel[:, 0])
        nuc.cx = np.where(busy, nuc.cx, nuc.cx + vel[:, 1])
        for pos, lim, k in ((nuc.cy, h, 0), (nuc.cx, w, 1)):
            low, high = pos < 0, pos > lim - 1
            pos[low] = -pos[low]
            pos[high] = 2 * (lim - 1) - pos[high]
            vel[low | high, k] *= -1
        nuc.theta = nuc.theta + rng.normal(0.0, 0.02, size=len(nuc))
        boost = 1.0 + (boost - 1.0) * 0.93
        grow = np.minimum(1.004, size0 / np.sqrt(nuc.a * nuc.b))
        nuc.a, nuc.b = nuc.a * np.maximum(grow, 1.0), nuc.b * np.maximum(grow, 1.0)
    return SynthVideo(out_frames, out_masks, out_labels)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8 (rounded), e.g. to encode generated frames."""
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
