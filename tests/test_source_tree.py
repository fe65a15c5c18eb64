"""segfast from a bare source checkout (``PYTHONPATH=.``, not installed): the folders
pyproject.toml maps into the package import under their package names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from segfast import _source_tree

ROOT = Path(__file__).resolve().parent.parent


def test_the_mapped_folders_import_from_a_bare_checkout():
    # -S: no site-packages, so no installed (or editable) segfast to resolve them first
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; "
        "print(u.find_spec('segfast.kernels').origin)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"


def test_the_finder_maps_only_pyprojects_names():
    finder = _source_tree._CheckoutFinder(ROOT)
    assert finder.find_spec("segfast.edge.csrc").origin == str(ROOT / "csrc" / "__init__.py")
    assert finder.find_spec("segfast.kernels").submodule_search_locations == [str(ROOT / "kernels")]
    assert finder.find_spec("segfast.models") is None
    assert finder.find_spec("kernels") is None
