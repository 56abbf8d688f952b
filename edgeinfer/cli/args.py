"""Argument types and option groups shared by several subcommands."""

from __future__ import annotations

import argparse


def _num(kind, lo=None, hi=None, lo_open=False):
    def conv(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {kind.__name__}") from None
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{s} must be <= {hi}")
        return v

    return conv


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


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=_num(int, -1), default=512, help="tokens to generate (-1 = until the context is full)")
    g.add_argument("--temp", type=_num(float, 0.0), default=0.8, help="temperature (0 = greedy)")
    g.add_argument("--top-k", type=_num(int, 0), default=40, help="top-k (0 = off)")
    g.add_argument("--top-p", type=_num(float, 0.0, 1.0, lo_open=True), default=0.95, help="top-p (1 = off)")
    g.add_argument("--min-p", type=_num(float, 0.0, 1.0), default=0.05, help="min-p (0 = off)")
    g.add_argument("--repeat-penalty", type=_num(float, 0.0, lo_open=True), default=1.0, help="repeat penalty (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def load_options(args):
    from edgeinfer.backend import LoadOptions

    return LoadOptions(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                       device=args.device, seed=args.seed)


def sampling_params(args):
    from edgeinfer.backend import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, max_tokens=args.max_tokens,
                          stop=tuple(args.stop), seed=args.seed)
