"""Show what is inside a GGUF file: architecture, hyperparameters, sizes per quant type, tokenizer."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="default", help="GGUF path or model name (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor's name, shape and type")


def main(args) -> int:
    from edgeinfer.inspect_gguf import render_text, summarize
    from edgeinfer.resolve import resolve_model

    s = summarize(resolve_model(args.model), with_tensors=args.tensors)
    if args.json:
        json.dump(s, sys.stdout, indent=1, default=str)
        print()
    else:
        print(render_text(s))
    return 0
