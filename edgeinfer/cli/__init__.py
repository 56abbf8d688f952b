"""The ``edgeinfer`` command line.

Each subcommand lives in its own module (``edgeinfer/cli/<name>.py``) exposing
``add_arguments(parser)`` and ``main(args) -> int``. Those modules import heavy libraries
(torch, llama.cpp) only inside ``main``, so ``edgeinfer --help`` stays instant.

User errors (:class:`edgeinfer.errors.EdgeinferError`) print one line and exit with code 2; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from edgeinfer import __version__
from edgeinfer.errors import EdgeinferError

# name -> one-line help. Order is the order shown by --help.
COMMANDS = {
    "run": "generate text from a prompt (streams to stdout)",
    "chat": "chat with a model in the terminal UI",
    "serve": "serve models over HTTP (OpenAI and Ollama APIs)",
    "convert": "convert a Hugging Face checkpoint to GGUF",
    "inspect": "show what is inside a GGUF file",
    "ls": "list the models edgeinfer can find",
    "pull": "download a GGUF or checkpoint from the Hugging Face Hub",
    "eval": "measure perplexity and KL-divergence against a reference",
    "imatrix": "compute an importance matrix from calibration text",
}


def _available_commands() -> dict[str, str]:
    out = {}
    for name, help_ in COMMANDS.items():
        if importlib.util.find_spec(f"edgeinfer.cli.{name}") is not None:
            out[name] = help_
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeinfer",
        description="Local, offline, quantized LLM inference (llama.cpp or PyTorch).",
    )
    parser.add_argument("--version", action="version", version=f"edgeinfer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network (same as HF_HUB_OFFLINE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in _available_commands().items():
        mod = importlib.import_module(f"edgeinfer.cli.{name}")
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--offline", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._module.main(args) or 0)
    except EdgeinferError as e:
        if debug:
            raise
        print(f"edgeinfer: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("edgeinfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
