"""segfast.edge is torch-free: it imports with PyTorch blocked, and its modules import
nothing beyond numpy, the standard library, cuda-python, TensorRT and segfast's own
torch-free modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import segfast.edge

EDGE = Path(segfast.edge.__file__).parent
ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "hashlib",
    "importlib",
    "json",
    "math",
    "os",
    "pathlib",
    "re",
    "types",
    "typing",
    "numpy",
    "cuda",  # cuda-python (cuda.bindings)
    "tensorrt",
}
ALLOWED_SEGFAST = {"segfast.edge", "segfast.errors", "segfast._io"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_edge_modules_import_only_torch_free_code():
    files = sorted(EDGE.glob("*.py"))
    assert {f.stem for f in files} >= {
        "__init__",
        "engine",
        "kernels",
        "reference",
        "sidecar",
        "trt",
    }
    for f in files:
        for name in _imports(f):
            if name.startswith("segfast"):
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED_SEGFAST), (
                    f"{f.name} imports {name}"
                )
            else:
                assert name.split(".")[0] in ALLOWED, f"{f.name} imports {name}"
    for name in ALLOWED_SEGFAST - {"segfast.edge"}:
        mod = EDGE.parent / (name.split(".")[1] + ".py")
        assert not any(n.split(".")[0] == "torch" for n in _imports(mod)), mod


def test_edge_imports_with_torch_blocked():
    """The real thing: a fresh interpreter where `import torch` fails."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import segfast.edge\n"
        "from segfast.edge import EdgeEngine, engine, kernels, reference, sidecar, trt\n"
        "import numpy as np\n"
        "reference.preprocess(np.zeros((4, 4, 3), np.uint8), (2, 2))\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert loaded == ['torch'] and sys.modules['torch'] is None, loaded\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
