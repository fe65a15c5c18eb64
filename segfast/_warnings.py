"""Warnings PyTorch raises from its own internals while segfast drives it.

``torch.export`` (and its serialiser, and ``run_decompositions``) deep-copies its
pytree specs, and torch 2.13's copy of a ``LeafSpec`` warns
"`isinstance(treespec, LeafSpec)` is deprecated" from ``copyreg.py`` — about
PyTorch's own code, several times a compile, and nothing a segfast user can act on.
:func:`quiet_torch_internals` ignores exactly those messages (by category and
text) around the calls that trigger them; any other warning, a model's own
included, still reaches the user.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# (category, regular expression matched against the start of the message)
TORCH_INTERNAL = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)


@contextlib.contextmanager
def quiet_torch_internals() -> Iterator[None]:
    """Ignore :data:`TORCH_INTERNAL` warnings inside the block; the previous filters
    come back afterwards."""
    with warnings.catch_warnings():
        for category, message in TORCH_INTERNAL:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
