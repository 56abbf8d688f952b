"""K-quant encoder throughput vs Q8_0, and the encode time of whole-model recipes.

Usage:  python benchmarks/bench_kquants.py [--reps 3] [--threads N]

Prints (medians of ``--reps`` runs, MB/s of float32 input):
1. each K type (edgeinfer.quant.kquants, plain and with an imatrix), single-threaded and
   with ``--threads``, next to the legacy Q8_0 encoders (gguf's numpy ``quantize`` and
   edgeinfer's torch encoder) on the same [1536, 2048] matrix;
2. the encode time of every tensor of the default model (dequantized to float32) under
   the Q4_K_M, Q5_K_M and Q6_K recipes (``quant/recipes.py``, each type with the
   converter's registered encoder) vs the Q8_0 recipe and vs gguf's numpy Q8_0 encoder
   on all matrices (a baseline that does not depend on torch's thread pool).
The machine may be shared: figures vary; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def encoder_table(reps: int, threads: int) -> None:
    from edgeinfer.quant import quantizers
    from edgeinfer.quant.kquants import K_TYPES, quantize_k

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1536, 2048)) * 0.02).astype(np.float32)
    imatrix = (rng.standard_normal(2048) ** 2).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"matrix [1536, 2048] float32 = {mb:.1f} MB; threads for the multi-thread column: {threads}")
    q8_gguf = mb / _median_time(lambda: gguf.quants.quantize(x, QT.Q8_0), reps)
    q8_torch = mb / _median_time(lambda: quantizers.quantize(x, QT.Q8_0), reps)
    print(f"{'Q8_0 gguf numpy':24s} {q8_gguf:8.1f} MB/s")
    print(f"{'Q8_0 edgeinfer torch':24s} {q8_torch:8.1f} MB/s")
    for qt in K_TYPES:
        for name, im in (("", None), ("+imatrix", imatrix)):
            t1 = _median_time(lambda: quantize_k(x, qt, im, n_threads=1), reps)
            tn = _median_time(lambda: quantize_k(x, qt, im, n_threads=threads), reps)
            print(f"{qt.name + name:24s} {mb / t1:8.1f} MB/s (1 thread)  {mb / tn:8.1f} MB/s ({threads} threads)"
                  f"  Q8_0(torch)/this = {q8_torch * tn / mb:5.1f}x")


def model_table(reps: int) -> None:
    from edgeinfer.quant import quantizers
    from edgeinfer.quant.recipes import RecipeContext, plan
    from edgeinfer.resolve import default_model_path

    r = gguf.GGUFReader(str(default_model_path()))
    f = {k: r.fields[k].contents() for k in ("llama.block_count", "llama.attention.head_count",
                                             "llama.attention.head_count_kv")}
    ctx = RecipeContext(n_layer=f["llama.block_count"], n_head=f["llama.attention.head_count"],
                        n_head_kv=f["llama.attention.head_count_kv"])
    tensors = {t.name: gguf.quants.dequantize(np.asarray(t.data), QT(t.tensor_type)).astype(np.float32)
               for t in r.tensors}
    shapes = [(n, tuple(reversed(a.shape))) for n, a in tensors.items()]
    total_mb = sum(a.nbytes for a in tensors.values()) / 1e6
    print(f"\ndefault model: {len(tensors)} tensors, {total_mb:.0f} MB float32")
    mats = [a.reshape(-1, a.shape[-1]) for a in tensors.values() if a.ndim >= 2]
    base = _median_time(lambda: [gguf.quants.quantize(m, QT.Q8_0) for m in mats], reps)
    print(f"all matrices Q8_0 with gguf's numpy encoder (stable baseline): {base:.2f} s")
    times = {}
    for recipe in ("Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"):
        entries = plan(shapes, recipe, ctx)
        runs = []
        for _ in range(reps):
            per_type: dict[str, float] = {}
            for e in entries:
                a = tensors[e.name]
                if e.ggml_type in (QT.F32, QT.F16):
                    continue
                t0 = time.perf_counter()
                quantizers.quantize(a.reshape(-1, a.shape[-1]), e.ggml_type)
                per_type[e.ggml_type.name] = per_type.get(e.ggml_type.name, 0.0) + time.perf_counter() - t0
            runs.append(per_type)
        per_type = min(runs, key=lambda d: sum(d.values()))                  # the least disturbed run
        times[recipe] = sum(per_type.values())
        split = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(per_type.items()))
        print(f"{recipe:8s} encode {times[recipe]:6.2f} s  ({total_mb / times[recipe]:6.1f} MB/s)  "
              f"vs Q8_0 {times[recipe] / times['Q8_0']:5.2f}x, vs gguf Q8_0 {times[recipe] / base:5.2f}x  "
              f"by type: {split}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    encoder_table(args.reps, args.threads)
    if not args.skip_model:
        model_table(args.reps)


if __name__ == "__main__":
    main()
