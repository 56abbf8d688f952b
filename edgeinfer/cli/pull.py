"""Download a GGUF (REPO:QUANT) or a whole checkpoint from the Hugging Face Hub into its cache."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("name", metavar="REPO[:QUANT]", help="e.g. bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M")


def main(args) -> int:
    from edgeinfer.hub import pull

    path = pull(args.name)
    print(path)
    return 0
