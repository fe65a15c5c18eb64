"""Classical post-processing of segmentation masks, on SciPy and scikit-image.

Connected components, removal of small objects, keeping the largest objects,
hole filling and Otsu's threshold — the "traditional" segmentation steps that
clean up a network's mask (or, on their own, segment an image: the Otsu
baseline of the demo figures). Every function takes numpy arrays (torch tensors
are converted; the result is always numpy) holding one image ``[H, W]`` or a
batch ``[N, H, W]`` processed image by image; nothing connects across the batch.

Masks are bool or integer arrays; 0 is background. A nonzero value is a class
(a mask from ``Engine(output="mask")``) or an instance id (labels from
:func:`connected_components`): the object operations treat each value on its
own — an object is a connected region of *equal* value (``skimage.measure.label``
semantics) — so the same call cleans a binary mask, a multi-class mask and an
instance labelling. Removed pixels become 0; kept pixels keep their value and
the result keeps the input's dtype.

``connectivity``: 1 (or 4) = pixels touching by an edge; 2 (or 8) = by an edge
or a corner. The default 1 keeps two nuclei that touch at one corner apart.

As a pipeline: :func:`apply` runs a list of :class:`Op` in order, and
:func:`add_arguments` / :func:`ops_from_args` give the ``segfast run`` options

    --otsu              threshold the foreground probability with Otsu's method
                        (instead of argmax / 0.5)
    --min-size N        remove objects smaller than N pixels
    --fill-holes        fill holes inside objects
    --keep-largest N    keep the N largest objects (per class)
    --connectivity 4|8  pixel connectivity of objects (default 4)

applied in that order (Otsu first, as it turns probabilities into a mask).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from skimage import filters, measure

from segfast.errors import InputError

# The operations :func:`apply` knows, in the order :func:`ops_from_args` applies them.
OP_NAMES = ("otsu", "min_size", "fill_holes", "keep_largest")
# connectivity argument -> scikit-image / SciPy connectivity (1 = edges, 2 = edges + corners)
_CONNECTIVITY = {1: 1, 4: 1, 2: 2, 8: 2}


class Op(NamedTuple):
    """One post-processing step: ``name`` in :data:`OP_NAMES`, its integer ``value``
    (``min_size``: pixels; ``keep_largest``: how many; unused by the others)."""

    name: str
    value: int = 0


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise InputError(
            f"{what} must be one image [H, W] or a batch [N, H, W], got shape {x.shape}"
        )
    if x.size == 0:
        raise InputError(f"{what} is empty (shape {x.shape})")
    return x


def _mask(x: Any, what: str = "mask") -> np.ndarray:
    m = _to_numpy(x, what)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.integer):
        raise InputError(
            f"{what} must be bool or integer (0 = background), got {m.dtype}; threshold "
            f"probabilities first (otsu_threshold, or > 0.5)"
        )
    if np.issubdtype(m.dtype, np.signedinteger) and m.min() < 0:
        raise InputError(f"{what} has negative values (min {m.min()}); labels must be >= 0")
    return m


def _connectivity(connectivity: int) -> int:
    if connectivity not in _CONNECTIVITY:
        raise InputError(
            f"connectivity must be 1 or 4 (edges), 2 or 8 (edges + corners), got {connectivity!r}"
        )
    return _CONNECTIVITY[connectivity]


def _per_image(fn: Callable[[np.ndarray], np.ndarray], m: np.ndarray) -> np.ndarray:
    """Apply ``fn`` to each [H, W] image of a 2-D or [N, H, W] array."""
    if m.ndim == 2:
        return fn(m)
    return np.stack([fn(img) for img in m])


def _objects(m: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected regions of equal nonzero value: ([H, W] int labels, count)."""
    return measure.label(m, background=0, connectivity=connectivity, return_num=True)


def connected_components(mask: Any, connectivity: int = 1) -> tuple[np.ndarray, int | np.ndarray]:
    """Label the objects of ``mask``: ``(labels, count)``.

    ``labels``: int32, same shape, 0 background and 1..count per object (an
    object is a connected region of equal nonzero value); ``count``: an int for
    one image, an int64 array [N] for a batch (labels restart at 1 per image).
    """
    m = _mask(mask)
    c = _connectivity(connectivity)
    if m.ndim == 2:
        labels, n = _objects(m, c)
        return labels.astype(np.int32), int(n)
    out = np.empty(m.shape, np.int32)
    counts = np.empty(len(m), np.int64)
    for i, img in enumerate(m):
        labels, counts[i] = _objects(img, c)
        out[i] = labels
    return out, counts


def remove_small(mask: Any, min_size: int, *, connectivity: int = 1) -> np.ndarray:
    """``mask`` with every object of fewer than ``min_size`` pixels set to 0.

    Works on binary masks, class masks and instance labels alike (see the module
    docstring). ``scikit-image``'s ``remove_small_objects`` is not used because
    it treats an integer array as instance labels — a whole class would be one
    object — and renamed its size argument in 0.26; the objects are labelled with
    ``skimage.measure.label`` and their sizes counted with ``np.bincount``.
    """
    m = _mask(mask)
    c = _connectivity(connectivity)
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise InputError(f"min_size must be an integer >= 0, got {min_size!r}")

    def one(img: np.ndarray) -> np.ndarray:
        labels, _ = _objects(img, c)
        small = np.bincount(labels.ravel()) < min_size
        small[0] = False
        out = img.copy()
        out[small[labels]] = 0
        return out

    return _per_image(one, m)


def keep_largest(mask: Any, n: int = 1, *, connectivity: int = 1) -> np.ndarray:
    """``mask`` with only the ``n`` largest objects of each value kept, the rest set to 0.

    For a binary mask: the ``n`` largest connected components; for a class mask:
    the ``n`` largest of each class; equal sizes are broken by label order
    (scan order of the object's first pixel).
    """
    m = _mask(mask)
    c = _connectivity(connectivity)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"keep_largest needs n >= 1, got {n!r}")

    def one(img: np.ndarray) -> np.ndarray:
        labels, count = _objects(img, c)
        if count <= n:
            return img.copy()
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        value = np.zeros(count, img.dtype)
        value[labels[labels > 0] - 1] = img[labels > 0]  # each object's value
        # Rank objects within their value by size (largest first, ties by label).
        order = np.lexsort((np.arange(count), -sizes, value))
        grouped = value[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        rank = np.arange(count) - np.repeat(starts, np.diff(np.r_[starts, count]))
        keep = np.zeros(count + 1, bool)
        keep[order[rank < n] + 1] = True
        out = img.copy()
        out[~keep[labels]] = 0
        return out

    return _per_image(one, m)


def fill_holes(mask: Any) -> np.ndarray:
    """``mask`` with the holes of each object filled (``scipy.ndimage.binary_fill_holes``).

    A hole is background (0) that the region of one value encloses completely
    (background connects through edges only, so a ring closed at a corner
    encloses); it takes that value. Background enclosed by two different values
    together (a gap between touching nuclei of different labels) is not a hole
    of either and stays 0.
    """
    m = _mask(mask)

    def one(img: np.ndarray) -> np.ndarray:
        if img.dtype == np.bool_:
            return ndimage.binary_fill_holes(img)
        out = img.copy()
        values = np.unique(img)
        values = values[values != 0]
        if len(values) == 1:
            out[ndimage.binary_fill_holes(img != 0) & (img == 0)] = values[0]
            return out
        # One bounding box per value: find_objects gives them in one pass (values >= 1).
        boxes = ndimage.find_objects(img.astype(np.intp, copy=False))
        for v in values:
            box = boxes[int(v) - 1]
            region = img[box] == v
            holes = ndimage.binary_fill_holes(region) & (img[box] == 0)
            out[box][holes] = v
        return out

    return _per_image(one, m)


def otsu_threshold(image: Any, *, nbins: int = 256) -> tuple[float | np.ndarray, np.ndarray]:
    """Otsu's threshold (``skimage.filters.threshold_otsu``) and the mask ``image > t``.

    ``image``: a foreground probability map or a grey-level image, [H, W] or
    [N, H, W] (one threshold per image), any real dtype. Returns ``(t, mask)``:
    ``t`` a float (an array [N] for a batch) and ``mask`` uint8 0/1. A constant
    image has no two classes: its threshold is its value and its mask is empty.
    Otsu always splits a non-constant image in two: on a probability map with no
    foreground it splits the background noise, unlike a fixed 0.5.
    """
    a = _to_numpy(image, "image")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(
            f"otsu_threshold expects a real-valued image or probability map, got {a.dtype}"
        )
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InputError("otsu_threshold got NaN or Inf values")
    if a.dtype == np.float16:  # e.g. an fp16 engine's probabilities; histogram in fp32
        a = a.astype(np.float32)

    def one(img: np.ndarray) -> float:
        lo, hi = img.min(), img.max()
        if lo == hi:
            return float(lo)
        return float(filters.threshold_otsu(img, nbins=nbins))

    if a.ndim == 2:
        t = one(a)
        return t, (a > t).astype(np.uint8)
    ts = np.array([one(img) for img in a])
    return ts, (a > ts[:, None, None]).astype(np.uint8)


def apply(
    x: Any, ops: Sequence[Op | tuple[str, int] | str], *, connectivity: int = 1
) -> np.ndarray:
    """Run ``ops`` on ``x`` in order and return the mask.

    ``ops``: :class:`Op` values, ``(name, value)`` tuples or bare names, e.g.
    ``apply(probs, ["otsu", ("min_size", 30), "fill_holes", ("keep_largest", 1)])``.
    With ``otsu`` first, ``x`` is a foreground probability map or grey-level image
    (for a 2-class softmax ``[N, 2, H, W]`` pass ``probs[:, 1]``); otherwise a mask.
    An empty ``ops`` returns ``x`` as numpy.
    """
    steps = [_as_op(op) for op in ops]
    for i, op in enumerate(steps):
        if op.name == "otsu" and i != 0:
            raise InputError(
                f"'otsu' turns probabilities into a mask and must come first, got it at position {i}"
            )
    out = _to_numpy(x, "input")
    for op in steps:
        if op.name == "otsu":
            _, out = otsu_threshold(out)
        elif op.name == "min_size":
            out = remove_small(out, op.value, connectivity=connectivity)
        elif op.name == "fill_holes":
            out = fill_holes(out)
        else:
            out = keep_largest(out, op.value, connectivity=connectivity)
    return out


def _as_op(op: Op | tuple[str, int] | str) -> Op:
    if isinstance(op, str):
        op = Op(op)
    elif not isinstance(op, Op):
        if not isinstance(op, tuple) or len(op) not in (1, 2):
            raise InputError(f"a post-processing op is a name or (name, value), got {op!r}")
        op = Op(*op)
    if op.name not in OP_NAMES:
        raise InputError(f"unknown post-processing op {op.name!r}; known: {', '.join(OP_NAMES)}")
    if op.name == "keep_largest" and op.value < 1:
        raise InputError(f"keep_largest needs a count >= 1, got {op.value!r}")
    if op.name == "min_size" and op.value < 0:
        raise InputError(f"min_size needs a size >= 0, got {op.value!r}")
    return op


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the post-processing options (see the module docstring) to ``parser``."""
    g = parser.add_argument_group("post-processing (classical, applied to the mask)")
    g.add_argument(
        "--otsu",
        action="store_true",
        help="threshold the foreground probability with Otsu's method",
    )
    g.add_argument(
        "--min-size", type=int, default=0, metavar="N", help="remove objects smaller than N pixels"
    )
    g.add_argument("--fill-holes", action="store_true", help="fill holes inside objects")
    g.add_argument(
        "--keep-largest",
        type=int,
        default=0,
        metavar="N",
        help="keep the N largest objects (per class)",
    )
    g.add_argument(
        "--connectivity",
        type=int,
        choices=(4, 8),
        default=4,
        help="pixel connectivity of objects (default 4)",
    )


def ops_from_args(args: argparse.Namespace) -> list[Op]:
    """The :class:`Op` list the options of :func:`add_arguments` ask for, in the fixed order."""
    if args.min_size < 0:
        raise InputError(f"--min-size must be >= 0, got {args.min_size}")
    if args.keep_largest < 0:
        raise InputError(f"--keep-largest must be >= 1 (or 0 = off), got {args.keep_largest}")
    ops = []
    if args.otsu:
        ops.append(Op("otsu"))
    if args.min_size:
        ops.append(Op("min_size", args.min_size))
    if args.fill_holes:
        ops.append(Op("fill_holes"))
    if args.keep_largest:
        ops.append(Op("keep_largest", args.keep_largest))
    return ops
