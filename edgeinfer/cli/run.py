"""Generate text from a prompt and stream it to stdout."""

from __future__ import annotations

import json
import sys

from edgeinfer.cli.args import (add_load_args, add_model_arg, add_sampling_args, add_speculative_args, load_options,
                                sampling_params)
from edgeinfer.errors import EdgeinferError
from edgeinfer.units import fmt_bytes_short


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("-p", "--prompt", help="the user message (or the raw text with --raw); '-' reads stdin")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_sampling_args(p)
    add_load_args(p)
    add_speculative_args(p)
    p.add_argument("--stats", action="store_true", help="print load time, TTFT, prefill and decode tok/s to stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and timings")


def _buffers_line(extra: dict) -> str:
    """``\nweights: CPU_REPACK 57 MiB, CPU_Mapped 86 MiB (llama.cpp's choice...)`` for llama.cpp, else ''."""
    bufs = extra.get("buffers")
    if not bufs:
        return ""
    sizes = ", ".join(f"{name} {fmt_bytes_short(n)}" for name, n in sorted(bufs.items(), key=lambda kv: -kv[1]))
    return f"\nweights: {sizes}" + (f" ({extra['placement']})" if extra.get("placement") else "")


def _speculative_line(extra: dict, t) -> str:
    """``speculative (draft model, 8 drafts): 120/160 drafts accepted (75.0 %), 2.9 tok per verify step``, or ''."""
    if not extra.get("speculative"):
        return ""
    per_step = t.generated_tokens / t.verify_steps if t.verify_steps else 0.0
    return (f"speculative ({extra['speculative']}): {t.draft_accepted}/{t.draft_tokens} drafts accepted "
            f"({t.acceptance:.1%}), {per_step:.2f} tok per verify step\n")


def main(args) -> int:
    from edgeinfer.backend import DoneEvent
    from edgeinfer.backends import load_backend
    from edgeinfer.resolve import resolve_model

    prompt = args.prompt
    if prompt is None:
        raise EdgeinferError("no prompt: pass -p TEXT (or -p - to read stdin); `edgeinfer chat` for a conversation")
    if prompt == "-":
        prompt = sys.stdin.read()
    path = resolve_model(args.model, allow_download=True)
    backend = load_backend(args.backend, path, load_options(args))
    try:
        if args.raw:
            request = prompt
        else:
            request = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
        done = None
        for ev in backend.generate(request, sampling_params(args)):
            if isinstance(ev, DoneEvent):
                done = ev
            elif not args.json and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        if not args.json:
            sys.stdout.write("\n")
        info = backend.info()
        mem = backend.memory_bytes()
        t = done.timings
        if args.json:
            json.dump({"text": done.text, "finish_reason": done.finish_reason, "timings": t.as_dict(),
                       "model": info.name, "path": info.path, "backend": info.backend, "device": info.device,
                       "load_s": info.load_s, "memory": mem, "extra": info.extra}, sys.stdout, ensure_ascii=False,
                      default=str)
            sys.stdout.write("\n")
        if args.stats:
            print(f"[{info.backend} on {info.device}] model {info.name} ({info.quant}), load {info.load_s:.2f} s\n"
                  f"prompt {t.prompt_tokens} tok, TTFT {t.ttft_s * 1000:.0f} ms, prefill {t.prefill_tok_s:.1f} tok/s\n"
                  f"generated {t.generated_tokens} tok, decode {t.decode_tok_s:.1f} tok/s, "
                  f"finish: {done.finish_reason}\n"
                  + _speculative_line(info.extra, t)
                  + f"memory: RSS {fmt_bytes_short(mem.get('rss', 0))}"
                  + (f", device {fmt_bytes_short(mem['device'])}" if mem.get("device") else "")
                  + (f", peak {fmt_bytes_short(mem['peak'])}" if mem.get("peak") else "")
                  + (" (runner process)" if info.extra.get("runner_pid") else "")
                  + _buffers_line(info.extra),
                  file=sys.stderr)
    finally:
        backend.close()
    return 0
