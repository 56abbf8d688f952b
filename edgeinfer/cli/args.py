"""Argument types and option groups shared by several subcommands."""

from __future__ import annotations

import argparse

from edgeinfer.backend import SAMPLING_BOUNDS, Bound
from edgeinfer.errors import EdgeinferError


def bounded(b: Bound):
    """An argparse ``type`` that converts to ``b.kind`` and refuses values outside ``b``."""

    def conv(s: str):
        try:
            v = b.kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {b.kind.__name__}") from None
        problem = b.problem(v)
        if problem:
            raise argparse.ArgumentTypeError(f"{s} {problem}")
        return v

    return conv


def _num(kind, lo=None, hi=None, lo_open=False):
    """:func:`bounded` for options that are not sampling parameters (--ctx, --threads, --chunks)."""
    return bounded(Bound(kind, lo, hi, lo_open))


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="default",
                   help="GGUF path, 'default' (embedded SmolLM2-135M-Instruct), a name from `edgeinfer ls`, "
                        "or REPO[:QUANT] from the Hugging Face cache")


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading")
    g.add_argument("--backend", default="llama.cpp", choices=["llama.cpp", "torch"], help="inference engine")
    g.add_argument("--ctx", type=_num(int, 1), default=4096, help="context size in tokens (default 4096)")
    g.add_argument("--threads", type=_num(int, 1), default=None, help="CPU threads (default: physical cores)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="device for the torch engine; llama.cpp offloads to a GPU unless 'cpu'")
    g.add_argument("--gpu-layers", type=int, default=-1, help="llama.cpp: layers to offload (-1 = all)")
    moe = g.add_mutually_exclusive_group()
    moe.add_argument("--cpu-moe", action="store_true",
                     help="MoE models: keep every expert in host memory, the rest on the GPU (saves VRAM)")
    moe.add_argument("--n-cpu-moe", type=_num(int, 0), default=0, metavar="N",
                     help="MoE models: keep the experts of the first N layers in host memory")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", metavar="MODEL", default=None,
                   help="torch engine: a small draft model with the same vocabulary (path, name or REPO[:QUANT]) "
                        "that proposes tokens the model verifies in one batch")
    g.add_argument("--draft-n", type=_num(int, 1, 64), default=None, metavar="K",
                   help="tokens drafted per step (default 8)")
    g.add_argument("--prompt-lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt and the text so far (no draft model; both backends; "
                        "pays off when the output copies from the input, e.g. code editing)")


def speculative_options(args):
    """The :class:`~edgeinfer.backend.SpeculativeOptions` of ``--draft`` / ``--prompt-lookup`` (None: off);
    resolves the draft model like ``--model``."""
    from edgeinfer.backend import SpeculativeOptions

    draft, lookup = getattr(args, "draft", None), getattr(args, "prompt_lookup", False)
    if not draft and not lookup:
        if getattr(args, "draft_n", None) is not None:
            raise EdgeinferError("--draft-n needs --draft MODEL or --prompt-lookup")
        return None
    if draft:
        from edgeinfer.resolve import resolve_model

        draft = str(resolve_model(draft, allow_download=True))
    k = args.draft_n or 8
    return SpeculativeOptions(draft=draft or None, n_draft=k, prompt_lookup=lookup and not draft)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    b = SAMPLING_BOUNDS  # the ranges (and what special values mean) the TUI's settings screen uses too
    g.add_argument("-n", "--max-tokens", type=bounded(b["max_tokens"]), default=512,
                   help=f"tokens to generate ({b['max_tokens'].note})")
    g.add_argument("--temp", type=bounded(b["temperature"]), default=0.8, help=f"temperature ({b['temperature'].note})")
    g.add_argument("--top-k", type=bounded(b["top_k"]), default=40, help=f"top-k ({b['top_k'].note})")
    g.add_argument("--top-p", type=bounded(b["top_p"]), default=0.95, help=f"top-p ({b['top_p'].note})")
    g.add_argument("--min-p", type=bounded(b["min_p"]), default=0.05, help=f"min-p ({b['min_p'].note})")
    g.add_argument("--repeat-penalty", type=bounded(b["repeat_penalty"]), default=1.0,
                   help=f"repeat penalty ({b['repeat_penalty'].note})")
    g.add_argument("--seed", type=b["seed"].kind, default=0, help="random seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="reasoning models (Qwen3, Gemma 4): turn thinking on or off in the chat template "
                        "(default: the template's own default)")


def load_options(args):
    from edgeinfer.backend import LoadOptions

    from edgeinfer.backend import ALL_LAYERS

    return LoadOptions(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                       device=args.device, seed=args.seed,
                       n_cpu_moe=ALL_LAYERS if getattr(args, "cpu_moe", False) else getattr(args, "n_cpu_moe", 0),
                       speculative=speculative_options(args))


def sampling_params(args):
    from edgeinfer.backend import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, max_tokens=args.max_tokens,
                          stop=tuple(args.stop), seed=args.seed, think=getattr(args, "think", None))
