"""List the models edgeinfer can find: the default, GGUFs in the Hugging Face cache, the models folder."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list")


def main(args) -> int:
    from edgeinfer.resolve import list_models, models_dir
    from edgeinfer.units import fmt_bytes

    models = list_models()
    if args.json:
        json.dump([{"name": m.name, "path": str(m.path), "source": m.source, "size": m.size} for m in models],
                  sys.stdout, indent=1)
        print()
        return 0
    w = max([len(m.name) for m in models] + [4])
    print(f"{'NAME':<{w}}  {'SIZE':>10}  {'SOURCE':<13}  PATH")
    for m in models:
        print(f"{m.name:<{w}}  {fmt_bytes(m.size):>10}  {m.source:<13}  {m.path}")
    print(f"\n(models folder: {models_dir()})", file=sys.stderr)
    return 0
