"""Serve models over HTTP with the OpenAI and Ollama APIs (for the openai/ollama clients, Open WebUI, oterm).

    edgeinfer serve                       # the default model on http://127.0.0.1:8080
    edgeinfer serve -m default -m qwen2.5-0.5b-instruct-q4_k_m.gguf --parallel 4

Models are loaded on first use; ``--keep-alive`` unloads an idle one (like Ollama's), and the least
recently used idle model makes room when the next one would not fit ``--memory-budget``.
"""

from __future__ import annotations

import logging
import sys

from edgeinfer.cli.args import _num, add_load_args, load_options
from edgeinfer.errors import EdgeinferError

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", action="append", default=[], metavar="MODEL",
                   help="a model to serve (repeatable): GGUF path, 'default', a name from `edgeinfer ls`, or "
                        "REPO[:QUANT] from the Hugging Face cache; clients ask for it by this name "
                        "(default: 'default')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_num(int, 0, 65535), default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every API request")
    add_load_args(p)  # --backend, --ctx (per sequence), --threads, --device, --gpu-layers, --cpu-moe / --n-cpu-moe
    p.add_argument("--parallel", type=_num(int, 1, 64), default=1,
                   help="sequences per model decoded together in one batched step (default 1)")
    p.add_argument("--queue", type=_num(int, 0), default=16,
                   help="requests per model that may wait for a slot; past that the answer is 503 (default 16)")
    p.add_argument("--seed", type=int, default=0, help="default random seed (a request's 'seed' wins)")
    p.add_argument("--keep-alive", default="5m",
                   help="unload a model after this long idle: '5m', '1h', '30s', 0 = at once, -1 = never (default 5m)")
    p.add_argument("--memory-budget", default="75%",
                   help="memory the loaded models may take together: bytes ('8G', '512M') or a percentage of RAM "
                        "(default 75%%)")
    p.add_argument("--max-loaded", type=_num(int, 0), default=0, help="at most this many models loaded (0 = no limit)")
    p.add_argument("--max-body", default="8M", help="largest request body accepted (default 8M)")
    p.add_argument("--log-requests", action="store_true", help="log every request (uvicorn's access log)")


def _size(text: str, what: str, total: int | None = None) -> int:
    s = text.strip().upper()
    if total is not None and s.endswith("%"):
        try:
            return int(total * float(s[:-1]) / 100)
        except ValueError:
            pass
    mult = 1
    for suffix, m in (("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("K", 2**10), ("M", 2**20), ("G", 2**30),
                      ("B", 1)):
        if s.endswith(suffix):
            s, mult = s[: -len(suffix)], m
            break
    try:
        v = int(float(s) * mult)
    except ValueError:
        raise EdgeinferError(f"{what} {text!r} is not a size like 8G, 512M or 75%") from None
    if v < 0:
        raise EdgeinferError(f"{what} must not be negative")
    return v


def build_pool(args):
    """Resolve every -m (offline, like ``run``) and make the :class:`~edgeinfer.server.pool.ModelPool`."""
    import psutil

    from edgeinfer.resolve import resolve_model
    from edgeinfer.server.pool import ModelPool, parse_duration
    from edgeinfer.server.request import ApiError

    names = args.model or ["default"]
    models = {}
    for name in names:
        if name in models:
            raise EdgeinferError(f"-m {name} is given twice")
        models[name] = resolve_model(name, allow_download=False)
    try:
        keep_alive = parse_duration(args.keep_alive, "--keep-alive")
    except ApiError as e:
        raise EdgeinferError(e.message) from None
    opts = load_options(args)
    budget = _size(args.memory_budget, "--memory-budget", psutil.virtual_memory().total)
    return ModelPool(models, args.backend, opts, parallel=args.parallel, max_queue=args.queue, keep_alive=keep_alive,
                     memory_budget=budget, max_loaded=args.max_loaded)


def main(args) -> int:
    import socket

    import uvicorn

    from edgeinfer.server.app import Server

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"edgeinfer serve: WARNING: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the models", file=sys.stderr, flush=True)
    pool = build_pool(args)
    max_body = _size(args.max_body, "--max-body")
    app = Server(pool, args.api_key, max_body).app()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise EdgeinferError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"edgeinfer serve: {', '.join(pool.models)} ({args.backend}, parallel {args.parallel}) on "
          f"http://{shown}:{port}  (OpenAI: /v1, Ollama: /api)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info" if args.log_requests else "warning", access_log=args.log_requests,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0

