"""``segfast models``: the zoo with parameter counts against the published ones."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    import torch

    from segfast import models

    rows = []
    for name in models.names():
        spec = models.get_spec(name)
        opts = spec.reference.options if spec.reference else {}
        with torch.device("meta"):
            model = models.create(name, **opts)
        n = models.count_parameters(model)
        ref = spec.reference
        if ref is not None and not ref.published:
            refs = "(no published count)"
        elif ref is not None:
            dev = 100.0 * (n - ref.params) / ref.params
            refs = f"{ref.params / 1e6:8.2f}M ({dev:+.2f}%)"
        else:
            refs = "-"
        rows.append((name, spec.task, f"{n / 1e6:8.2f}M", refs, spec.description))
    header = ("model", "task", "params", "published", "description")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=False)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, [*widths, 0], strict=False)))
    if args.verbose:
        for name in models.names():
            ref = models.get_spec(name).reference
            if ref is not None:
                print(f"\n{name}: reference options {ref.options}\n  source: {ref.source}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter counts")
    p.add_argument("-v", "--verbose", action="store_true", help="also print reference sources")
    p.set_defaults(func=run)
