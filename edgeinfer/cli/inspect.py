"""Show what is inside a GGUF file: architecture, hyperparameters, sizes per quant type, tokenizer."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="default", help="GGUF path or model name (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor's name, shape and type")
    p.add_argument("--buffers", action="store_true",
                   help="which llama.cpp buffer type each weight would use on this machine (CPU_REPACK, AMX, CPU...) "
                        "under EDGEINFER_LLAMA_AMX / EDGEINFER_LLAMA_REPACK; nothing is loaded")


def buffer_plan(path, with_tensors: bool) -> dict:
    """The llama.cpp placement of ``path`` on this CPU: the policy line, per buffer type count and bytes."""
    from edgeinfer.backends.llama_placement import CpuReport, placement_for, predict_buffers
    from edgeinfer.gguf_check import validate_gguf

    h = validate_gguf(path)
    report = CpuReport.query()
    plan = placement_for(path, report=report)
    n_used = int(h.arch_key("{arch}.expert_used_count", 0) or 0)
    where = predict_buffers(plan, report, h.tensors, n_expert_used=n_used)
    per: dict = {}
    for t in h.tensors:
        d = per.setdefault(where[t.name], {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    out = {"cpu_extra_buffer_types": list(report.extra),
           "cpu_features": sorted(k for k, v in report.features.items() if v not in ("0", "")),
           "placement": plan.describe(), "use_extra_bufts": plan.use_extra_bufts,
           "overrides": [[o.pattern, o.buffer_type] for o in plan.overrides], "buffers": per}
    if with_tensors:
        out["tensor_buffers"] = where
    return out


def render_buffers(b: dict) -> str:
    from edgeinfer.units import fmt_bytes

    lines = ["llama.cpp buffer types on this machine:",
             f"  CPU features:       {' '.join(b['cpu_features']) or '-'}",
             f"  extra buffer types: {', '.join(b['cpu_extra_buffer_types']) or 'none'}",
             f"  placement:          {b['placement']}"]
    for name, d in sorted(b["buffers"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {name:<18}  {d['tensors']:>5} tensors  {fmt_bytes(d['bytes'], unit='MiB')}")
    return "\n".join(lines)


def main(args) -> int:
    from edgeinfer.inspect_gguf import render_text, summarize
    from edgeinfer.resolve import resolve_model

    path = resolve_model(args.model)
    s = summarize(path, with_tensors=args.tensors)
    if args.buffers:
        s["llama_cpp"] = buffer_plan(path, args.tensors)
    if args.json:
        json.dump(s, sys.stdout, indent=1, default=str)
        print()
    else:
        print(render_text(s))
        if args.buffers:
            print(render_buffers(s["llama_cpp"]))
    return 0
