"""Regenerate the README's results section from ``benchmarks/results/*.json``.

    python -m segfast.bench.readme            # rewrites README.md between the markers

Every number in that section comes from a results file, with its device and date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from segfast.bench.report import markdown_table
from segfast.bench.suite import load_results

START, END = "<!-- results:start -->", "<!-- results:end -->"


def render(results_dir: Path) -> str:
    parts = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name.endswith("-kernels.json"):
            continue
        results = load_results(path)
        if not results:
            continue
        env = results[0].environment
        parts.append(
            f"**{env.get('device_name')}** (`{path.as_posix()}`; torch {env.get('torch')}, "
            f"{env.get('cpu_threads')} CPU threads, {env.get('date', '')[:10]}):\n\n"
            + markdown_table(results)
        )
    return "\n\n".join(parts) if parts else "_No results files yet._"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=".", help="the repository (README.md, benchmarks/)")
    root = Path(ap.parse_args(argv).root)
    readme = root / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme} has no {START} … {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = render(root / "benchmarks" / "results")
    readme.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
