"""segfast's imports run one way: down the layers of the README's layout.

Every ``import`` in ``segfast/`` and ``kernels/`` counts — at module level, inside a
function, or under ``TYPE_CHECKING``: a lazy import is still an arrow, and a circle
of lazy imports is still a circle. A layer imports only the layers below it (and
itself); the failure names the file, the line, the import and the rule it breaks.
No two modules may import each other, directly or round a longer circle.

The checker is this file's own (``ast``, no project code imported), and the last
tests run it on a small made-up tree to show it catches what it claims to.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom up. A module belongs to the first layer with a prefix it falls under; it
# may import modules of lower-ranked layers and of its own package (its prefix).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "leaves",
        (
            "segfast.errors",
            "segfast._io",
            "segfast._version",
            "segfast._warnings",
            "segfast.stats",
            "segfast.metrics",
            "segfast.timing",
            "segfast.outputs",
            "segfast.precision",
            "segfast.weights",
            "segfast.testing",
        ),
    ),
    ("edge", ("segfast.edge",)),
    ("kernels", ("segfast.kernels",)),
    ("models", ("segfast.models",)),
    ("compiler", ("segfast.compiler",)),
    ("export", ("segfast.export",)),
    ("backends", ("segfast.backends",)),
    ("runtime", ("segfast.runtime",)),
    ("api", ("segfast.api", "segfast.check", "segfast.int8")),
    ("face", ("segfast.cli", "segfast.commands", "segfast.bench", "segfast.demo", "segfast")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# What a layer must never import although it ranks lower: peers (kernels, models),
# the zoo (only the api resolves zoo names), and what the runtime must not reach —
# it runs any engine and builds none.
NEVER: dict[str, tuple[str, ...]] = {
    "kernels": ("models", "edge"),
    "models": ("kernels", "edge"),
    "compiler": ("models", "edge"),
    "export": ("models",),
    "backends": ("models",),
    "runtime": ("models", "compiler", "export"),
    "edge": ("torch", "triton"),  # torch-free: the edge box has neither
}
# Leaves that import torch are off limits for the torch-free edge runtime.
EDGE_LEAVES = ("segfast.errors", "segfast._io", "segfast._version")


def module_name(path: Path, root: Path) -> str:
    """``segfast/runtime/engine.py`` → ``segfast.runtime.engine``; ``kernels/`` is
    ``segfast.kernels`` and ``csrc/`` is ``segfast.edge.csrc`` (pyproject's package map)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["segfast", *parts]
    elif parts[0] == "csrc":
        parts = ["segfast", "edge", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    files = [
        p
        for d in ("segfast", "kernels", "csrc")
        if (root / d).is_dir()
        for p in (root / d).rglob("*.py")
    ]
    return {module_name(p, root): p for p in sorted(files)}


def imports(path: Path, mod: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``; ``from pkg import name``
    counts as ``pkg.name`` when that is a module of the project, else as ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in known else target))
    return out


def layer_of(mod: str) -> str | None:
    """The layer of a segfast module (longest matching prefix), None outside segfast."""
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), name)
    return best[1] if best else None


def violations(root: Path) -> list[str]:
    """Every import that runs against the layers, as ``file:line: what (why)``."""
    mods = project_modules(root)
    known = set(mods)
    out = []
    for mod, path in mods.items():
        here = layer_of(mod)
        if here is None:
            continue
        for line, target in imports(path, mod, known):
            where = f"{path.relative_to(root)}:{line}: {mod} imports {target}"
            top = target.split(".")[0]
            if here == "edge" and top in NEVER["edge"]:
                out.append(f"{where} (edge/ is torch-free: it never imports {top})")
                continue
            if top != "segfast":
                continue
            there = layer_of(target)
            if target == "segfast" and here != "face":
                out.append(
                    f"{where} (only the face imports the package itself; take it from a leaf)"
                )
            elif here == "edge" and there != "edge" and target not in EDGE_LEAVES:
                out.append(f"{where} (edge/ imports only {', '.join(EDGE_LEAVES)} and itself)")
            elif there in NEVER.get(here, ()):
                out.append(f"{where} (the {here} layer never imports {there})")
            elif there is not None and there != here and RANK[there] > RANK[here]:
                out.append(f"{where} (the {here} layer never imports {there}, a layer above it)")
    return out


def import_circles(root: Path) -> list[list[str]]:
    """Strongly connected groups of two or more modules in the import graph (Tarjan)."""
    mods = project_modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for _, target in imports(path, mod, known):
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != mod:
                graph[mod].add(".".join(parts))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        # iterative Tarjan: (node, iterator over its successors)
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, succ = work[-1]
            for w in succ:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == node:
                            break
                    if len(group) > 1:
                        circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


# -- the project --------------------------------------------------------------------------


def test_every_module_has_a_layer():
    missing = [m for m in project_modules(ROOT) if layer_of(m) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_imports_follow_the_layers():
    broken = violations(ROOT)
    assert not broken, f"{len(broken)} import(s) against the layering:\n" + "\n".join(broken)


def test_no_import_circles():
    circles = import_circles(ROOT)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


# -- the checker itself, on a made-up tree -------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("rel", "text", "expect"),
    [
        # a lazy import inside a function is an arrow too
        (
            "segfast/runtime/engine.py",
            "def f():\n    from segfast.compiler import patterns\n",
            "segfast/runtime/engine.py:2: segfast.runtime.engine imports segfast.compiler.patterns"
            " (the runtime layer never imports compiler)",
        ),
        (
            "segfast/compiler/api.py",
            "import segfast.backends\n",
            "segfast/compiler/api.py:1: segfast.compiler.api imports segfast.backends",
        ),
        ("segfast/export/onnx.py", "import segfast\n", "only the face imports the package"),
        ("segfast/export/onnx.py", "from segfast import models\n", "never imports models"),
        ("segfast/edge/trt.py", "import torch\n", "edge/ is torch-free"),
        ("segfast/edge/trt.py", "from segfast.stats import x\n", "edge/ imports only"),
        (
            "kernels/conv.py",
            "from segfast.models import unet\n",
            "kernels layer never imports models",
        ),
        ("segfast/runtime/video.py", "from ..check import check\n", "imports segfast.check"),
    ],
)
def test_the_checker_names_file_line_and_rule(tmp_path, rel, text, expect):
    root = _tree(
        tmp_path,
        {
            rel: text,
            "segfast/__init__.py": "",
            "segfast/models/__init__.py": "",
            "segfast/models/unet.py": "",
            "segfast/compiler/patterns.py": "",
            "segfast/backends/__init__.py": "",
            "segfast/check.py": "",
            "segfast/stats.py": "",
        },
    )
    found = violations(root)
    assert any(expect in v for v in found), found


def test_the_checker_accepts_downward_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "segfast/__init__.py": "from segfast.api import compile\n",
            "segfast/api.py": "from segfast.runtime.engine import Engine\nimport segfast.check\n",
            "segfast/check.py": "from segfast.metrics import compare\n",
            "segfast/metrics.py": "import torch\n",
            "segfast/runtime/engine.py": "from segfast.backends.base import Runner\n",
            "segfast/backends/base.py": "from segfast.export import onnx\nfrom segfast.edge import trt\n",
            "segfast/export/onnx.py": "from . import rewrites\nfrom segfast.compiler import graph\n",
            "segfast/export/rewrites.py": "",
            "segfast/compiler/graph.py": "from segfast.errors import InputError\n",
            "segfast/edge/trt.py": "from segfast.errors import InputError\nimport numpy\n",
            "segfast/errors.py": "",
        },
    )
    assert violations(root) == []
    assert import_circles(root) == []


def test_the_checker_finds_circles_of_lazy_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "segfast/runtime/a.py": "def f():\n    from segfast.runtime import b\n",
            "segfast/runtime/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from segfast.runtime.c import C\n",
            "segfast/runtime/c.py": "import segfast.runtime.a\n",
            "segfast/runtime/d.py": "from segfast.runtime import a\n",
        },
    )
    assert import_circles(root) == [["segfast.runtime.a", "segfast.runtime.b", "segfast.runtime.c"]]
