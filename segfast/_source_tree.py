"""Running segfast from a source checkout without installing it (``PYTHONPATH=.``).

``pyproject.toml`` maps two top-level folders into the package — ``kernels/`` is
``segfast.kernels`` and ``csrc/`` is ``segfast.edge.csrc`` — and an install (regular or
editable) carries out that mapping. A bare checkout on ``sys.path`` does not, and the
``triton`` backend, the frame runtime and the edge runtime then failed with
``ModuleNotFoundError: No module named 'segfast.kernels'``. :func:`install` adds a finder
for just those two names, consulted after every other (an installed segfast resolves
them first), and only where the folders sit beside ``segfast/``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_MAPPED = {"segfast.kernels": "kernels", "segfast.edge.csrc": "csrc"}  # pyproject's package-dir


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.dirs = {name: root / folder for name, folder in _MAPPED.items()}

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        d = self.dirs.get(name)
        if d is None or not (d / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, d / "__init__.py", submodule_search_locations=[str(d)]
        )


def install() -> None:
    """Add the finder once, where this package is a source checkout's ``segfast/``."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels").is_dir():
        return
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder(root))
