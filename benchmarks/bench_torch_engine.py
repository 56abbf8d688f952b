"""Torch engine vs llama.cpp on the same GGUF: prefill and decode tok/s, decode bandwidth.

    python benchmarks/bench_torch_engine.py                 # default model, physical cores
    python benchmarks/bench_torch_engine.py --threads 1 --runs 7
    python benchmarks/bench_torch_engine.py --kernels       # also the CPU matmul options, per layer
    python benchmarks/bench_torch_engine.py -m model.gguf --device cuda   # torch side on a GPU

Both engines run the same work at the model level: one batched prefill of ``--prompt`` tokens
(logits of the last position only), then ``--gen`` single-token decode steps; no sampling. Runs
alternate between the engines (so background load hits both alike) and the median of the
per-run ratios is printed. Decode bandwidth = bytes of weights one decode step reads (the
torch engine's packed weights incl. the LM head; for llama.cpp the GGUF's matrices, the tied
embedding counted once as the head) x decode tok/s, against a measured copy bandwidth
(``torch`` copy of a 256 MiB buffer: read + write bytes / time).
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure_bandwidth(threads: int, mib: int = 256, reps: int = 7) -> float:
    """Memory bandwidth in GB/s from a large tensor copy (read + write)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def gguf_weight_bytes(path) -> int:
    """Bytes of the 2-D weights one llama.cpp decode step reads (tied embedding = the head)."""
    from edgeinfer.gguf_check import validate_gguf

    h = validate_gguf(path)
    names = {t.name for t in h.tensors}
    total = 0
    for t in h.tensors:
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # only a few rows are read
        total += t.nbytes
    return total


def interleaved_runs(model, dev, llm, ids: list[int], steps: list[int], runs: int, decode=None) -> list[tuple]:
    """Prefill ``ids`` then decode ``steps`` one token at a time in the torch ``model`` and in the
    llama-cpp-python ``llm``, alternately, after one warm-up each; prints every run. ``decode``:
    the torch engine's per-token step ``decode(tok, pos) -> logits`` (the backend's: the fused CPU
    step where it applies); None runs the model's forward.

    Returns:
        per run ``(torch prefill, torch decode, llama.cpp prefill, llama.cpp decode)`` tok/s.
    """
    import torch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_torch():
        t = time.perf_counter()
        model(torch.tensor([ids], device=dev), 0, last_only=True)
        sync()
        tp = time.perf_counter() - t
        t = time.perf_counter()
        for i, tok in enumerate(steps):
            if decode is not None:
                decode(tok, len(ids) + i)
            else:
                model(torch.tensor([[tok]], device=dev), len(ids) + i, last_only=True)
        sync()
        return len(ids) / tp, len(steps) / (time.perf_counter() - t)

    def run_llama():
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        return len(ids) / tp, len(steps) / (time.perf_counter() - t)

    run_torch(), run_llama()  # warm-up
    rows = []
    for r in range(runs):
        (tp, td), (lp, ld) = run_torch(), run_llama()
        rows.append((tp, td, lp, ld))
        print(f"run {r + 1}: prefill torch {tp:7.1f} / llama.cpp {lp:7.1f} tok/s ({tp / lp:.2f}x)   "
              f"decode torch {td:6.2f} / llama.cpp {ld:6.2f} tok/s ({td / ld:.2f}x)", flush=True)
    return rows


def bench_kernels(threads: int) -> None:
    """Per-layer CPU matmul options for the default model's shapes (M=1 decode and M=128 prefill)."""
    import gguf
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edgeinfer.kernels import cpu_packed
    from edgeinfer.kernels.dequant import dequantize

    torch.set_num_threads(threads)
    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)

    def timeit(fn, n=20):
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    print(f"\nCPU matmul options ({threads} threads), ms per call (median of 20):")
    print(f"{'shape':>18s} {'type':>5s} {'M':>4s} {'packed int4':>12s} {'int8/32-col':>12s} {'dequant+fp32':>13s} "
          f"{'fp32 cached':>12s} {'bf16 cached':>12s}")
    for (n, k), qtype in [((1536, 576), T.Q4_1), ((576, 1536), T.Q8_0), ((49152, 576), T.Q8_0)]:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        raw = torch.from_numpy(gguf.quants.quantize(w, qtype))
        packed = cpu_packed.PackedCPU(raw, qtype, n, k)
        wf = dequantize(raw, qtype)
        wb = wf.to(torch.bfloat16)
        i8 = None
        if qtype == T.Q8_0:
            b = raw.numpy().reshape(n, k // 32, 34)
            codes = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:].transpose(1, 0, 2)).view(np.int8))
            sc = torch.from_numpy(np.ascontiguousarray(b[:, :, :2]).view(np.float16)[..., 0].T.astype(np.float32))
            i8 = (codes, sc.to(torch.bfloat16))
        for m in (1, 128):
            x = torch.randn(m, k)
            xb = x.to(torch.bfloat16)

            def int8_blocks():
                y = None
                for j in range(k // 32):
                    p = torch._weight_int8pack_mm(xb[:, j * 32:(j + 1) * 32], i8[0][j], i8[1][j]).float()
                    y = p if y is None else y.add_(p)
                return y

            cols = [timeit(lambda: packed.matmul(x)),
                    timeit(int8_blocks) if i8 else float("nan"),
                    timeit(lambda: cpu_packed.dequant_linear(x, raw, qtype, n), n=5),
                    timeit(lambda: F.linear(x, wf)), timeit(lambda: F.linear(xb, wb))]
            print(f"{str((n, k)):>18s} {qtype.name:>5s} {m:>4d} " + " ".join(f"{c:>12.3f}" for c in cols))
    print("('cached' = a dequantized float copy of every weight: not allowed as the engine's default, "
          "shown as the reference point)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: physical cores)")
    ap.add_argument("--device", default="cpu", help="torch engine device (cpu, cuda, mps, auto)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="decode steps")
    ap.add_argument("--kernels", action="store_true", help="also time the CPU matmul options per layer")
    ap.add_argument("--llama-gpu-layers", type=int, default=None,
                    help="llama.cpp layers on the GPU (default: 0 with --device cpu, else all)")
    args = ap.parse_args()

    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.llama_placement import open_llama
    from edgeinfer.backends.common import default_threads
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.resolve import resolve_model

    path = resolve_model(args.model)
    threads = args.threads or default_threads()
    n_ctx = args.prompt + args.gen + 8
    tb = TorchBackend(path, LoadOptions(n_ctx=n_ctx, n_threads=threads, device=args.device))
    llm = open_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     n_batch=max(512, args.prompt), verbose=False,
                     n_gpu_layers=args.llama_gpu_layers if args.llama_gpu_layers is not None
                     else (0 if args.device == "cpu" else -1))
    ids = tb.tokenize("The quick brown fox jumps over the lazy dog. " * (args.prompt // 8 + 1),
                      add_special=False)[: args.prompt]
    steps = (ids * (args.gen // len(ids) + 1))[: args.gen]
    model, dev = tb.model, tb.device

    rows = interleaved_runs(model, dev, llm, ids, steps, args.runs, decode=tb.decode)
    med = [statistics.median(c) for c in zip(*rows)]
    pr = statistics.median(r[0] / r[2] for r in rows)
    dr = statistics.median(r[1] / r[3] for r in rows)
    bw = measure_bandwidth(threads)
    tbytes, lbytes = tb.report.weight_bytes, gguf_weight_bytes(path)
    print(f"\nmodel {path.name}, {threads} threads, torch device {tb.device_label()}, "
          f"prompt {len(ids)} tok, {len(steps)} decode steps, {args.runs} runs")
    print(f"median prefill: torch {med[0]:.1f} tok/s, llama.cpp {med[2]:.1f} tok/s, median ratio {pr:.2f}x")
    print(f"median decode:  torch {med[1]:.1f} tok/s, llama.cpp {med[3]:.1f} tok/s, median ratio {dr:.2f}x")
    print(f"memory bandwidth (copy, {threads} threads): {bw:.1f} GB/s")
    print(f"decode bandwidth: torch {tbytes / 2**20:.1f} MiB/token x {med[1]:.1f} = {tbytes * med[1] / 1e9:.2f} GB/s "
          f"({tbytes * med[1] / 1e9 / bw:.0%} of copy bw); llama.cpp {lbytes / 2**20:.1f} MiB/token x {med[3]:.1f} "
          f"= {lbytes * med[3] / 1e9:.2f} GB/s ({lbytes * med[3] / 1e9 / bw:.0%})")
    print(f"torch kernels: {dict(tb.report.paths)} ({tb.info().extra['decode_step']} decode step); "
          f"load {tb.load_s:.2f} s; memory {tb.memory_bytes()}")
    if args.kernels:
        bench_kernels(threads)
    llm.close()
    tb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
