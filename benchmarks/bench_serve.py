"""Decode throughput of ``edgeinfer serve`` under concurrency, side by side with llama-cpp-python's server.

On the default model with 2 threads, each measured on the same streaming ``/v1/completions`` requests
(greedy, a raw prompt that does not end early), interleaved over --runs rounds, medians:

* ``edgeinfer serve --parallel 4``: one client alone, then 4 concurrent clients; the aggregate decode
  tok/s of the 4 / the one alone (target >= 2.0);
* the one client through the server / ``edgeinfer run`` on the same prompt (target >= 0.95);
* ``python -m llama_cpp.server`` (needs its extras: ``pip install sse-starlette starlette-context
  pydantic-settings fastapi`` into the venv, not into pyproject) on the same requests.

A client's decode tok/s = (tokens - 1) / (last token time - first token time), measured by the client;
the aggregate of several = sum(tokens - 1) / (last token of any - first token of any).

    python benchmarks/bench_serve.py [--threads 2] [--runs 3] [--gen 64] [--clients 4] [--no-llama-server]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not come up")


def stream_once(url: str, model: str, gen: int) -> tuple[int, float, float]:
    """One streaming completion: (tokens, first token time, last token time)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": gen, "temperature": 0, "stream": True}
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])
                if ch.get("choices") and ch["choices"][0].get("text"):
                    times.append(time.perf_counter())
    return len(times), times[0], times[-1]


def measure(url: str, model: str, gen: int, clients: int) -> float:
    """Aggregate decode tok/s of ``clients`` concurrent streams (1 = a single client)."""
    out: list = [None] * clients

    def go(i):
        out[i] = stream_once(url, model, gen)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    n = sum(o[0] - 1 for o in out)
    return n / (max(o[2] for o in out) - min(o[1] for o in out))


def run_cli(threads: int, gen: int, backend: str) -> float:
    cmd = [sys.executable, "-m", "edgeinfer", "run", "--raw", "-p", PROMPT, "--temp", "0", "-n", str(gen),
           "--threads", str(threads), "--json", "--backend", backend]
    out = subprocess.run(cmd, capture_output=True, check=True, text=True)
    return json.loads(out.stdout)["timings"]["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-llama-server", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--backend", default="llama.cpp", choices=["llama.cpp", "torch"], help="edgeinfer's engine")
    ap.add_argument("--ceiling", action="store_true",
                    help="also time llama_decode itself with 1 and --clients sequences (the kernel's own scaling)")
    args = ap.parse_args()

    from edgeinfer.resolve import default_model_path

    model_path = str(default_model_path())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = {}
    port = free_port()
    procs["edgeinfer serve"] = (subprocess.Popen(
        [sys.executable, "-m", "edgeinfer", "serve", "--port", str(port), "--threads", str(args.threads),
         "--parallel", str(args.clients), "--ctx", "1024", "--backend", args.backend], env=env, stderr=subprocess.DEVNULL),
        f"http://127.0.0.1:{port}", "default")
    if not args.no_llama_server:
        try:
            import llama_cpp.server.app  # noqa: F401 -- its extras are installed for this benchmark only
        except ImportError as e:
            raise SystemExit(f"llama_cpp.server cannot start ({e}): pip install sse-starlette starlette-context "
                             "pydantic-settings fastapi, or pass --no-llama-server")
        port2 = free_port()
        procs["llama_cpp.server"] = (subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--port", str(port2), "--n_threads",
             str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "1024"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port2}", model_path)
    try:
        for name, (p, url, model) in procs.items():
            wait_up(url, p)
            stream_once(url, model, 4)  # warm up (loads edgeinfer's model lazily)
        res: dict[str, list[float]] = {}
        for r in range(args.runs):  # interleaved: every setting once per round
            res.setdefault("edgeinfer run", []).append(run_cli(args.threads, args.gen, args.backend))
            for name, (p, url, model) in procs.items():
                res.setdefault(f"{name} x1", []).append(measure(url, model, args.gen, 1))
                res.setdefault(f"{name} x{args.clients}", []).append(measure(url, model, args.gen, args.clients))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), file=sys.stderr)
    finally:
        for p, _, _ in procs.values():
            p.terminate()
            p.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in res.items()}
    best = {k: max(v) for k, v in res.items()}
    print(f"decode tok/s, medians (and bests) of {args.runs} interleaved rounds, {args.threads} threads, {args.gen} "
          f"tokens, default model ({os.path.basename(model_path)}), edgeinfer backend {args.backend}:")
    for k, v in med.items():
        print(f"  {k:<28} {v:8.1f}  (best {best[k]:.1f})")
    b = best
    print(f"bests: edgeinfer serve x{args.clients} / x1 = {b[f'edgeinfer serve x{args.clients}'] / b['edgeinfer serve x1']:.2f}"
          f", x1 / edgeinfer run = {b['edgeinfer serve x1'] / b['edgeinfer run']:.2f}")
    c = args.clients
    print(f"edgeinfer serve: {c} clients / 1 client = {med[f'edgeinfer serve x{c}'] / med['edgeinfer serve x1']:.2f}"
          f" (target >= 2.0); 1 client / edgeinfer run = "
          f"{med['edgeinfer serve x1'] / med['edgeinfer run']:.2f} (target >= 0.95)")
    if "llama_cpp.server x1" in med:
        print(f"llama_cpp.server: {c} clients / 1 client = "
              f"{med[f'llama_cpp.server x{c}'] / med['llama_cpp.server x1']:.2f}; 1 client / edgeinfer run = "
              f"{med['llama_cpp.server x1'] / med['edgeinfer run']:.2f}; edgeinfer serve x{c} / llama_cpp.server "
              f"x{c} = {med[f'edgeinfer serve x{c}'] / med[f'llama_cpp.server x{c}']:.2f}")
    if args.ceiling:
        one, many = decode_ceiling(model_path, args.threads, args.clients)
        print(f"llama_decode alone: 1 sequence {one:.0f} tok/s, {args.clients} sequences {many:.0f} tok/s "
              f"(best of 60 steps): the kernel's own ceiling for the ratio is {many / one:.2f}")


def decode_ceiling(path: str, threads: int, n: int) -> tuple[float, float]:
    """tok/s of one ``llama_decode`` step with 1 and with ``n`` sequences (best of 60), no server, no sampling."""
    import llama_cpp as lc

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024 * n, 512, 512, n
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lc.llama_init_from_model(model, cp)
    b = lc.llama_batch_init(512, 0, 1)
    pos = [0] * n

    def step(seqs, toks=1):
        k = 0
        for s in seqs:
            for _ in range(toks):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = 200, pos[s], 1, 1
                b.seq_id[k][0] = s
                pos[s] += 1
                k += 1
        b.n_tokens = k
        t = time.perf_counter()
        if lc.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    step(range(n), 32)  # a prompt's worth of K/V in every sequence
    one = min(step([0]) for _ in range(60))
    many = min(step(range(n)) for _ in range(60))
    lc.llama_batch_free(b)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return 1 / one, n / many


if __name__ == "__main__":
    main()
