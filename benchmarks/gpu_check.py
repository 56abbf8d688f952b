"""The model part of ``benchmarks/gpu_check.sh``: a generated Llama-shaped model, converted to Q4_K_M
and Q4_0, decoded by the torch engine, next to the bandwidth roofline.

    python benchmarks/gpu_check.py --device cuda                 # 1B-class: hidden 2048, 16 layers
    python benchmarks/gpu_check.py --device cpu --small          # the same steps on a small model

Steps (each printed with its wall time; ``--budget`` seconds in all, checked between steps and
inside the decode loop, so the script ends in time with what it measured so far):

1. a random bf16 Llama checkpoint with SmolLM2's tokenizer (``bench_convert.make_checkpoint``:
   hidden 2048, ffn 8192, 16 layers, 16 heads of 128, 4 KV heads, vocab 49152: 1.17 B parameters,
   every row a multiple of 256, so Q4_K_M is all K blocks); ``--small``: hidden 256, 2 layers;
2. ``edgeinfer convert --qtype Q4_K_M`` and ``--qtype Q4_0`` (subprocesses, as a user runs them);
3. the device's copy bandwidth: a ``torch`` copy of a 1 GiB buffer (256 MiB on CPU), read + write
   bytes / time, median of 9;
4. per file: the torch engine (``--backend torch``'s loader) on ``--device``, a 64-token prefill,
   then one-token decode steps for ``--seconds`` (device synchronized), median tok/s of 3 blocks;
   bytes per token = the weights one decode step reads (the engine's on-device weight bytes, the
   LM head included, the embedding table excluded: it stays in host memory and only one row is read);
   roofline = bandwidth / bytes per token.

Prints one table: file, kernel paths, bytes/token, decode tok/s, roofline tok/s, % of roofline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Budget:
    """Seconds left of the whole check; :meth:`left` < 0 means stop."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def step(name: str):
    """Print ``name`` and, when the block ends, its wall time."""
    class _Step:
        def __enter__(self):
            self.t = time.perf_counter()
            print(f"-- {name}", flush=True)

        def __exit__(self, *exc):
            print(f"   {name}: {time.perf_counter() - self.t:.1f} s", flush=True)

    return _Step()


def copy_bandwidth(device, mib: int) -> float:
    """GB/s of a device-to-device tensor copy (read + write bytes), median of 9."""
    import torch

    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(9):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(path: Path, device, seconds: float, budget: Budget, threads: int) -> dict:
    """Load ``path`` in the torch engine, prefill 64 tokens, decode for ``seconds``: figures."""
    import torch

    from edgeinfer.engine.loader import load_model

    if device.type == "cpu":
        torch.set_num_threads(threads)
    t = time.perf_counter()
    model, report = load_model(path, device, 1024)
    load_s = time.perf_counter() - t
    ids = [(7 * i + 3) % 1000 + 10 for i in range(64)]
    model(torch.tensor([ids], device=device), 0, last_only=True)
    sync(device)
    pos, tok, rates = len(ids), 42, []
    per_block = max(0.5, min(seconds, budget.left() - 5) / 3)
    for _ in range(3):  # three timed blocks of decode steps
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < per_block and pos < 1000:
            model(torch.tensor([[tok]], device=device), pos, last_only=True)
            pos, n = pos + 1, n + 1
            if n % 8 == 0:
                sync(device)
        sync(device)
        rates.append(n / (time.perf_counter() - t))
        if budget.left() < 5 or pos >= 1000:
            break
    out = {"load_s": load_s, "tok_s": statistics.median(rates), "bytes": report.weight_bytes,
           "paths": ", ".join(f"{k} x{v}" for k, v in sorted(report.paths.items()))}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="a small model (the --cpu dry run of gpu_check.sh)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything (default 420)")
    ap.add_argument("--seconds", type=float, default=6.0, help="decode seconds per file (default 6)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    ap.add_argument("--qtypes", default="Q4_K_M,Q4_0")
    ap.add_argument("--workdir", default=None, help="keep the checkpoint and GGUFs here (default: a temp dir)")
    a = ap.parse_args(argv)
    budget = Budget(a.budget)

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); "
              "use --device cpu for the dry run", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    sys.path.insert(0, str(HERE))
    from bench_convert import make_checkpoint

    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="edgeinfer-gpu-check-")
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    layers, hidden, ff = (2, 256, 512) if a.small else (16, 2048, 8192)
    rows = []
    try:
        with step(f"checkpoint: random llama, {layers} layers, hidden {hidden}, ffn {ff}"):
            ckpt = make_checkpoint(work / f"llama-{layers}x{hidden}", layers, hidden, ff)
        ggufs = []
        for q in a.qtypes.split(","):
            if budget.left() < 30:
                print(f"   budget: {budget.left():.0f} s left, skipping the {q} conversion")
                break
            out = work / f"llama-{layers}x{hidden}-{q}.gguf"
            with step(f"edgeinfer convert --qtype {q}"):
                if not out.exists():
                    subprocess.run([sys.executable, "-m", "edgeinfer", "convert", str(ckpt), "-o", str(out),
                                    "--qtype", q], check=True, timeout=max(10, budget.left() - 20))
            ggufs.append((q, out))
        with step(f"copy bandwidth on {device}"):
            bw = copy_bandwidth(device, 256 if device.type == "cpu" else 1024)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {a.threads} thread(s)"
            print(f"   {name}: {bw:.1f} GB/s")
        for q, path in ggufs:
            if budget.left() < 10:
                print(f"   budget: {budget.left():.0f} s left, skipping {path.name}")
                break
            with step(f"torch engine decode, {path.name}"):
                r = decode_rate(path, device, a.seconds, budget, a.threads)
                r.update(q=q, name=path.name, size=os.path.getsize(path))
                rows.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\ntorch engine decode on {device} (copy bandwidth {bw:.1f} GB/s):" if rows else "no figures: out of time")
    if rows:
        print("| file | MiB | kernel paths | MiB read / token | decode tok/s | roofline tok/s | % of roofline | load s |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        roof = bw * 1e9 / r["bytes"]
        print(f"| {r['name']} | {r['size'] / 2**20:.0f} | {r['paths']} | {r['bytes'] / 2**20:.0f} | {r['tok_s']:.1f} | "
              f"{roof:.1f} | {100 * r['tok_s'] / roof:.0f} % | {r['load_s']:.1f} |")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
