"""K-quant encoder throughput vs Q8_0, the encode time of whole-model recipes, and whole `convert` runs.

Usage:  python benchmarks/bench_kquants.py [--reps 3] [--threads N] [--baseline OLD_KQUANTS.py]
        python benchmarks/bench_kquants.py --convert [--reps 5] [--workdir /tmp/bench_kquants]

``--convert`` measures what the K-quant issue's speed target is about: the wall time of
``edgeinfer convert --qtype Q4_K_M`` (and Q5_K_M, Q4_K_M with an imatrix) against
``edgeinfer convert --qtype Q8_0`` of the same checkpoint, each a fresh process, the runs
interleaved, on (a) the default model exported as a Hugging Face checkpoint (its 576-wide rows
fall back to Q5_0/Q8_0 except ffn_down) and (b) a generated llama whose rows are all multiples
of 256 (every matrix a K type, as in real 1B-70B models), with the compiled group searches and,
for comparison, with ``EDGEINFER_KQUANTS=numpy``.

Without ``--convert`` it prints:

(medians of ``--reps`` runs, MB/s of float32 input)
1. each K type (edgeinfer.quant.kquants, plain and with an imatrix), single-threaded and
   with ``--threads``, next to the legacy Q8_0 encoders (gguf's numpy ``quantize`` and
   edgeinfer's torch encoder) on the same [1536, 2048] matrix;
2. the encode time of every tensor of the default model (dequantized to float32) under
   the Q4_K_M, Q5_K_M and Q6_K recipes (``quant/recipes.py``, each type with the
   converter's registered encoder) vs the Q8_0 recipe and vs gguf's numpy Q8_0 encoder
   on all matrices (a baseline that does not depend on torch's thread pool);
3. the same K types encoded by llama.cpp's own quantizer (``llama_model_quantize``, pure
   recipe) on the same floats, side by side.
With ``--baseline`` (a self-contained older copy of ``kquants.py``, e.g. from
``git show eed80db:quant/kquants.py``) both tables also time that copy, interleaved run
by run with the current one (table 1 first checks that both write identical bytes).
The machine may be shared: figures vary (the load average is printed); compare the
ratios within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def _load_baseline(path: str):
    """Import an older kquants.py from a file (it must only need numpy and gguf)."""
    spec = importlib.util.spec_from_file_location("kquants_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _median_times(fns: list, reps: int) -> list[float]:
    """Median wall time of each function, the functions interleaved within each repetition."""
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


def encoder_table(reps: int, threads: int, baseline: str | None) -> None:
    from edgeinfer.quant import quantizers
    from edgeinfer.quant.kquants import K_TYPES, quantize_k

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1536, 2048)) * 0.02).astype(np.float32)
    imatrix = (rng.standard_normal(2048) ** 2).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"matrix [1536, 2048] float32 = {mb:.1f} MB; threads for the multi-thread column: {threads}; "
          f"load average {os.getloadavg()[0]:.1f}")
    q8_gguf = mb / _median_time(lambda: gguf.quants.quantize(x, QT.Q8_0), reps)
    q8_torch = mb / _median_time(lambda: quantizers.quantize(x, QT.Q8_0), reps)
    print(f"{'Q8_0 gguf numpy':24s} {q8_gguf:8.1f} MB/s")
    print(f"{'Q8_0 edgeinfer torch':24s} {q8_torch:8.1f} MB/s")
    old = _load_baseline(baseline) if baseline else None
    if old:
        print(f"MB/s, medians of {reps} interleaved runs: baseline {baseline} -> current")
    for qt in K_TYPES:
        for name, im in (("", None), ("+imatrix", imatrix)):
            fns = [lambda: quantize_k(x, qt, im, n_threads=1), lambda: quantize_k(x, qt, im, n_threads=threads)]
            if old:
                same = np.array_equal(old.quantize_k(x[:64], qt, im), quantize_k(x[:64], qt, im))
                fns += [lambda: old.quantize_k(x, qt, im, n_threads=1),
                        lambda: old.quantize_k(x, qt, im, n_threads=threads)]
            t = _median_times(fns, reps)
            line = f"{qt.name + name:14s}"
            if old:
                line += (f" 1 thread {mb / t[2]:6.1f} -> {mb / t[0]:6.1f} ({t[2] / t[0]:4.2f}x)   {threads} threads "
                         f"{mb / t[3]:6.1f} -> {mb / t[1]:6.1f} ({t[3] / t[1]:4.2f}x)  bytes identical: {same}")
            else:
                line += f" {mb / t[0]:8.1f} MB/s (1 thread)  {mb / t[1]:8.1f} MB/s ({threads} threads)"
            print(line + f"  Q8_0(torch)/this = {q8_torch * t[1] / mb:5.1f}x")
        if old:
            print(f"  (load average {os.getloadavg()[0]:.1f})")


def model_table(reps: int, baseline: str | None) -> None:
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
    print(f"\ndefault model: {len(tensors)} tensors, {total_mb:.0f} MB float32; load average "
          f"{os.getloadavg()[0]:.1f}")
    mats = [a.reshape(-1, a.shape[-1]) for a in tensors.values() if a.ndim >= 2]
    base = _median_time(lambda: [gguf.quants.quantize(m, QT.Q8_0) for m in mats], reps)
    print(f"all matrices Q8_0 with gguf's numpy encoder (stable baseline): {base:.2f} s")
    from edgeinfer.quant import kquants

    current = kquants.quantize_k
    old = _load_baseline(baseline).quantize_k if baseline else None
    runs_of = [("Q8_0", "Q8_0", current), ("Q4_K_M", "Q4_K_M", current)]
    runs_of += [("Q4_K_M baseline", "Q4_K_M", old)] if old else []
    runs_of += [("Q5_K_M", "Q5_K_M", current), ("Q6_K", "Q6_K", current)]
    plans = {recipe: plan(shapes, recipe, ctx) for _, recipe, _ in runs_of}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in runs_of}
    try:
        for _ in range(reps):                                   # recipes interleaved per repetition
            for label, recipe, encoder in runs_of:
                kquants.quantize_k = encoder                    # the registered K encoders call this
                per_type: dict[str, float] = {}
                for e in plans[recipe]:
                    a = tensors[e.name]
                    if e.ggml_type in (QT.F32, QT.F16):
                        continue
                    t0 = time.perf_counter()
                    quantizers.quantize(a.reshape(-1, a.shape[-1]), e.ggml_type)
                    per_type[e.ggml_type.name] = per_type.get(e.ggml_type.name, 0.0) + time.perf_counter() - t0
                runs[label].append(per_type)
    finally:
        kquants.quantize_k = current
    times = {}
    print(f"medians of {reps} runs (load average now {os.getloadavg()[0]:.1f})")
    for label, _, _ in runs_of:
        by_total = sorted(runs[label], key=lambda d: sum(d.values()))
        per_type = by_total[len(by_total) // 2]                                # the median run
        times[label] = sum(per_type.values())
        split = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(per_type.items()))
        print(f"{label:16s} encode {times[label]:6.2f} s  ({total_mb / times[label]:6.1f} MB/s)  "
              f"vs Q8_0 {times[label] / times['Q8_0']:5.2f}x, vs gguf Q8_0 {times[label] / base:5.2f}x  "
              f"by type: {split}")


def _convert_time(ckpt, qtype: str, out, env: dict, extra: list[str]) -> float:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "edgeinfer", "convert", str(ckpt), "--qtype", qtype, "-o", str(out),
           "--force", "--no-progress", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def convert_table(reps: int, workdir: str) -> None:
    """Wall time of whole `edgeinfer convert` runs per recipe vs Q8_0 (see the module docstring)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    sys.path.insert(0, str(root / "benchmarks"))
    import _hf_export
    from bench_convert import make_checkpoint

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpts = {"default model (576-wide)": _hf_export.export_default_checkpoint(work / "hf-default"),
             "llama 8x1024, ff 2816 (256-multiples)": make_checkpoint(work / "llama-1024", 8, 1024, 2816)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from edgeinfer.resolve import default_model_path

    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():                       # statistics of the default model's own text
        subprocess.run([sys.executable, "-m", "edgeinfer", "imatrix", str(default_model_path()), "--text",
                        "@stdlib-calib", "--chunks", "4", "-o", str(imatrix)], env=env, check=True,
                       capture_output=True)
    runs = [("Q8_0", "native", []), ("Q4_K_M", "native", []), ("Q5_K_M", "native", []),
            ("Q4_K_M", "numpy", [])]
    for name, ckpt in ckpts.items():
        cases = runs + ([("Q4_K_M+imatrix", "native", ["--imatrix", str(imatrix)])]
                        if name.startswith("default") else [])
        times: dict[str, list[float]] = {f"{q} {impl}": [] for q, impl, _ in cases}
        for _ in range(reps):
            for q, impl, extra in cases:
                e = dict(env, EDGEINFER_KQUANTS=impl)
                times[f"{q} {impl}"].append(_convert_time(ckpt, q.split("+")[0], work / "out.gguf", e, extra))
        size = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")) / 2**20
        print(f"\n{name}: {ckpt} ({size:.0f} MiB safetensors), medians of {reps} interleaved runs, "
              f"load average {os.getloadavg()[0]:.1f}")
        base = statistics.median(times["Q8_0 native"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"  convert {label:24s} {med:6.2f} s   vs Q8_0 {med / base:5.2f}x   "
                  f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")
        print("  " + _same_as_llama_cpp(ckpt, work, env))


def _same_as_llama_cpp(ckpt, work, env: dict) -> str:
    """Our Q4_K_M file vs llama.cpp's Q4_K_M quantization of our F32 file: tensor bytes compared."""
    import gguf

    import _llama_quant as lq                      # tests/ is on sys.path (convert_table)

    f32, ours, ref = work / "f32.gguf", work / "ours-q4km.gguf", work / "llama-q4km.gguf"
    _convert_time(ckpt, "F32", f32, env, [])
    _convert_time(ckpt, "Q4_K_M", ours, env, [])
    lq.llama_quantize(f32, ref, "Q4_K_M", nthread=os.cpu_count() or 1)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    differ = [n for n in b if n not in a or a[n].tensor_type != b[n].tensor_type
              or not np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))]
    for p in (f32, ours, ref):
        p.unlink()
    return (f"Q4_K_M tensors identical to llama.cpp's quantization of our F32 file: {len(b) - len(differ)}/{len(b)}"
            + (f" (differ: {', '.join(differ[:5])})" if differ else ""))


def llama_table(reps: int, threads: int) -> None:
    """K-type encode time: edgeinfer's quantize_k vs llama.cpp's llama_model_quantize, same floats.

    Both quantize the same eight [2048, 2048] float32 matrices (pure recipe: every matrix the
    K type), interleaved run by run; llama.cpp's time includes reading and writing its GGUFs
    (tmpfs-cached, ~2 x 134 MB), ours only the encoding, so the ratio slightly favours us.
    """
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import _llama_quant as lq

    from edgeinfer.quant.kquants import quantize_k

    rng = np.random.default_rng(0)
    tensors = {f"blk.{i}.ffn_up.weight": (rng.standard_normal((2048, 2048)) * 0.02).astype(np.float32)
               for i in range(8)}
    mb = sum(a.nbytes for a in tensors.values()) / 1e6
    print(f"\nvs llama.cpp's quantizer: 8 x [2048, 2048] float32 = {mb:.0f} MB, {threads} threads, "
          f"medians of {reps}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        src = lq.write_f32_gguf(Path(d) / "in.gguf", tensors, lq.Hparams(n_layer=8))
        for qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
            ours = lambda: [quantize_k(a, qt, n_threads=threads) for a in tensors.values()]
            ref = lambda: lq.llama_quantize(src, Path(d) / "out.gguf", lq.PURE_FTYPE[qt], pure=True,
                                            nthread=threads)
            t_ours, t_ref = _median_times([ours, ref], reps)
            print(f"{qt.name}: edgeinfer {mb / t_ours:7.1f} MB/s   llama.cpp {mb / t_ref:7.1f} MB/s   "
                  f"time ratio edgeinfer/llama.cpp {t_ours / t_ref:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--convert", action="store_true", help="time whole convert runs per recipe (the target)")
    ap.add_argument("--workdir", default="/tmp/bench_kquants")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--baseline", help="an older, self-contained kquants.py to time against")
    args = ap.parse_args()
    from edgeinfer.quant import searches

    print(f"group searches: {searches.implementation()}")
    if args.convert:
        convert_table(args.reps, args.workdir)
        return
    encoder_table(args.reps, args.threads, args.baseline)
    llama_table(args.reps, args.threads)
    if not args.skip_model:
        model_table(args.reps, args.baseline)


if __name__ == "__main__":
    main()
