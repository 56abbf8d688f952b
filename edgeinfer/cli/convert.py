"""Convert a Hugging Face checkpoint (folder or hub repo id) to a GGUF file, one tensor at a time.

Examples:
  edgeinfer convert ./SmolLM2-135M-Instruct --qtype Q8_0
  edgeinfer convert Qwen/Qwen2.5-0.5B-Instruct --qtype Q4_0 -o qwen.gguf --offline
  edgeinfer convert ./model --qtype Q5_1 --dry-run
  edgeinfer convert ./model --qtype Q4_K_M --imatrix imatrix.gguf   (from `edgeinfer imatrix` or llama-imatrix)
"""

from __future__ import annotations

import argparse
import sys

from edgeinfer.cli.args import _num
from edgeinfer.units import fmt_bytes

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="Hugging Face model folder, or a hub repo id (owner/name)")
    p.add_argument("-o", "--output", metavar="OUT", default=None,
                   help="output .gguf file or folder (default: <Name>-<Size>-<QTYPE>.gguf in the current folder)")
    p.add_argument("--qtype", default="Q8_0", type=str.upper, metavar="QTYPE",
                   help=f"tensor type: {', '.join(QTYPES)}, or a llama.cpp mix such as Q4_K_M, Q5_K_M, Q6_K "
                        f"(default Q8_0)")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama.cpp's GGUF or .dat format, e.g. from `edgeinfer imatrix`): "
                        "weights the quantization error per input column, as llama-quantize --imatrix")
    p.add_argument("--torch-only", action="store_true",
                   help="convert a config stock llama.cpp cannot run correctly (it hard-codes something the config "
                        "changes) into a file only edgeinfer's torch engine runs; llama.cpp, Ollama and LM Studio "
                        "refuse it")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensor -> type, size, bits/weight) and exit")
    p.add_argument("--threads", type=_num(int, 1), default=None, help="CPU threads for encoding (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_plan(plan, out) -> None:
    """The --dry-run table: every tensor, its type, output size and bits per weight."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{plan.spec.name} -> {plan.arch_name} GGUF, {plan.qtype}: {out}")
    cols = ("tensor", "shape", "type", "size", "bpw") + (("imatrix",) if plan.imatrix_path else ()) + ("note",)
    for col in cols:
        table.add_column(col, justify="right" if col in ("size", "bpw") else "left")
    for t in plan.tensors:
        bpw = 8 * t.nbytes / max(t.n_elements, 1)
        im = (t.imatrix_note,) if plan.imatrix_path else ()
        table.add_row(t.gguf_name, "x".join(map(str, t.shape)), t.ggml_type.name, fmt_bytes(t.nbytes),
                      f"{bpw:.2f}", *im, t.decision.reason)
    console = Console(width=max(120, Console().width))
    console.print(table)
    total_bpw = 8 * plan.nbytes / max(plan.n_params, 1)
    console.print(f"{len(plan.tensors)} tensors, {plan.n_params / 1e6:.1f} M parameters, "
                  f"{fmt_bytes(plan.nbytes)} of tensor data ({total_bpw:.2f} bits/weight); "
                  f"vocabulary {len(plan.vocab)} tokens ({plan.vocab.model}"
                  f"{', pre=' + plan.vocab.pre if plan.vocab.pre else ''}); skipped: {len(plan.skipped)}")
    if plan.torch_only:
        console.print(f"torch-only file ({plan.arch_name}): stock llama.cpp cannot run this config correctly: "
                      f"{'; '.join(plan.torch_only)}")
    if plan.imatrix_path:
        used = sum(t.importance is not None for t in plan.tensors)
        missing = sum(t.imatrix_note == "no entry" for t in plan.tensors)
        console.print(f"imatrix {plan.imatrix_path}: {used} tensors quantized with importance weights, "
                      f"{missing} without an entry (plain encoder)")


def main(args) -> int:
    from pathlib import Path

    from edgeinfer.quant.convert import default_output_name, plan_conversion, write_gguf

    plan = plan_conversion(args.src, args.qtype, offline=getattr(args, "offline", None) or None,
                           imatrix=args.imatrix, torch_only=args.torch_only)
    out = Path(args.output) if args.output else Path.cwd()
    if out.is_dir():
        out = out / default_output_name(plan)
    if args.dry_run:
        print_plan(plan, out)
        return 0
    show = not args.no_progress and sys.stderr.isatty()
    path = write_gguf(plan, out, force=args.force, progress=show, n_threads=args.threads)
    print(f"wrote {path} ({fmt_bytes(path.stat().st_size)}, {plan.qtype}, {len(plan.tensors)} tensors)")
    return 0
