"""Measure a model's quality: perplexity, and KL-divergence / top-1 agreement against a reference."""

from __future__ import annotations

import json
import sys

from edgeinfer.cli.args import _num


def add_arguments(p) -> None:
    p.add_argument("model", help="GGUF path or model name")
    p.add_argument("--text", default="@stdlib-eval",
                   help="text file, or @stdlib-eval (default) / @stdlib-calib: Python stdlib docstrings")
    p.add_argument("--ref", help="reference: a GGUF (e.g. the F16/F32 file) or an .npz from --save-logits")
    p.add_argument("--ctx", type=_num(int, 2), default=512, help="chunk length in tokens (default 512)")
    p.add_argument("--chunks", type=_num(int, 1), default=None, help="evaluate at most N chunks")
    p.add_argument("--threads", type=_num(int, 1), default=None)
    p.add_argument("--save-logits", metavar="FILE.npz", help="save this model's log-probs to use later as --ref")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(args) -> int:
    from edgeinfer.corpus import load_text
    from edgeinfer.evaluate import LlamaCppLogits, evaluate, load_saved_logprobs
    from edgeinfer.resolve import resolve_model

    text = load_text(args.text)
    model = LlamaCppLogits(resolve_model(args.model), args.ctx, args.threads)
    ref = ref_lp = None
    if args.ref and args.ref.endswith(".npz"):
        ref_lp = load_saved_logprobs(args.ref)
    elif args.ref:
        ref = LlamaCppLogits(resolve_model(args.ref), args.ctx, args.threads)
    res = evaluate(model, text, n_ctx=args.ctx, max_chunks=args.chunks, ref=ref, ref_logprobs=ref_lp,
                   save_logprobs=args.save_logits, progress=sys.stderr.isatty())
    if args.json:
        json.dump(res.as_dict(), sys.stdout, indent=1)
        print()
        return 0
    print(f"tokens scored: {res.n_tokens} in {res.n_chunks} chunks of {res.n_ctx}")
    print(f"perplexity:    {res.perplexity:.4f}")
    if res.mean_kl is not None:
        print(f"ref perplexity {res.ref_perplexity:.4f}")
        print(f"mean KL:       {res.mean_kl:.6f}")
        print(f"p99 KL:        {res.p99_kl:.6f}")
        print(f"top-1 agree:   {res.top1_agreement * 100:.2f} %")
    return 0
