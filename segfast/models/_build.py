"""Build a model from a reference string: a zoo name or ``package.module:factory``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError
from ._registry import create


def build_from_reference(
    reference: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    tiny: bool = False,
    **options: Any,
) -> nn.Module:
    """The model ``reference`` names, built with the given options.

    ``reference`` is a registered zoo name or alias (``"unet"``, ``"fcn"``), built
    with :func:`~segfast.models.create`, or ``"package.module:factory"`` /
    ``"path/to/file.py:factory"`` (dotted attributes allowed after the colon), a
    callable returning an ``nn.Module`` that is called with ``options`` plus
    ``num_classes`` / ``in_channels`` when given. ``tiny`` applies to zoo models only.
    """
    if ":" not in reference:
        return create(reference, num_classes, in_channels, tiny=tiny, **options)
    module_name, _, attr_path = reference.partition(":")
    if not module_name or not attr_path:
        raise InputError(
            f"model reference must look like 'package.module:factory', got {reference!r}"
        )
    if tiny:
        raise InputError(f"tiny=True applies to zoo models only, not to {reference!r}")
    try:
        factory: Any = _import(module_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import module {module_name!r} of model {reference!r}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise InputError(f"model reference {reference!r}: {module_name!r} has no {attr_path!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise InputError(f"model reference {reference!r} is not callable")
    if num_classes is not None:
        options["num_classes"] = num_classes
    if in_channels is not None:
        options["in_channels"] = in_channels
    model = factory(**options)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model reference {reference!r} returned {type(model).__name__}, not an nn.Module"
        )
    model.segfast_spec = {"factory": reference, "options": dict(options)}  # type: ignore[assignment]
    return model


def _import(module_name: str) -> Any:
    """Import a module by dotted name, or a ``.py`` file by path."""
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name)
    if not path.is_file():
        raise ImportError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"segfast_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
