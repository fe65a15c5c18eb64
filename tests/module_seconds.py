"""Write tests/module_seconds.json, the scheduling hint conftest.py hands modules out
by, from the log of a pytest run with ``--durations=0``:

    .venv/bin/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder tests \\
        --durations=0 > log.txt
    python tests/module_seconds.py log.txt

Each module's seconds are the sum of its tests' setup, call and teardown times. Run it
on a cold cache on CI's kind of machine (2 cores) after adding or slowing tests.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+([^\s:]+)(?:::|\s|$)")


def module_seconds(log: str) -> dict[str, float]:
    sums: Counter[str] = Counter()
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            sums[m.group(2)] += float(m.group(1))
    return {module: round(sec, 1) for module, sec in sorted(sums.items(), key=lambda kv: -kv[1])}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    sums = module_seconds(Path(argv[0]).read_text())
    if not sums:
        print(f"no durations in {argv[0]} (run pytest with --durations=0)", file=sys.stderr)
        return 1
    out = Path(__file__).with_name("module_seconds.json")
    out.write_text(json.dumps(sums, indent=1) + "\n")
    print(f"{out}: {len(sums)} modules, {sum(sums.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
