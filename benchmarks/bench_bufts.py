"""Prefill and decode tok/s of llama.cpp per weight placement: repacked CPU buffers vs plain ones.

For each GGUF (default: the embedded Q4_1 model, plus any -m files, e.g. a Q4_0 and a Q4_K_M
conversion of it), loads llama.cpp three ways and times the same prompt and greedy decode,
interleaved, medians of --runs:

* ``stock``: llama.cpp's own choice (``use_extra_bufts = True``: CPU_REPACK where it fits; on
  an AMX host this would be AMX, so it is only run where AMX is absent);
* ``overrides``: what edgeinfer does on an AMX host, forced here with a capability report that
  claims AMX: ``use_extra_bufts = False`` + tensor overrides to CPU_REPACK;
* ``plain``: ``use_extra_bufts = False``, no overrides (``EDGEINFER_LLAMA_REPACK=0``).

    python benchmarks/bench_bufts.py [-m FILE]... [--threads 2] [--runs 5] [--prompt 256] [--gen 64]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _placements(path: str):
    from edgeinfer.backends.llama_placement import BufferPolicy, CpuReport, placement_for

    real = CpuReport.query()
    out = {}
    if "AMX" not in real.extra:
        out["stock"] = placement_for(path, report=real)
    out["overrides"] = placement_for(path, report=CpuReport(("AMX",) + real.extra, real.features))
    out["plain"] = placement_for(path, report=real, policy=BufferPolicy(allow_extra=False))
    return out


def _time(path: str, placement, threads: int, prompt: list[int], gen: int) -> tuple[float, float]:
    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(path, placement=placement, n_ctx=len(prompt) + gen + 8, n_batch=512, n_threads=threads,
                     n_threads_batch=threads, verbose=False)
    try:
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = len(prompt) / (time.perf_counter() - t)
        tok = prompt[-1]
        t = time.perf_counter()
        for _ in range(gen):  # teacher-forced decode: the same work whatever the model says
            llm.eval([tok])
        decode = gen / (time.perf_counter() - t)
    finally:
        llm.close()
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", default=[], help="GGUF (repeatable); default: the embedded model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()

    from edgeinfer.resolve import resolve_model

    paths = [str(resolve_model(m)) for m in (args.model or ["default"])]
    rows = []
    for path in paths:
        import llama_cpp

        voc = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        ids = voc.tokenize(b"The quick brown fox jumps over the lazy dog. " * (args.prompt // 8 + 1),
                           add_bos=False)[: args.prompt]
        voc.close()
        places = _placements(path)
        for name, p in places.items():
            print(f"{path}: {name}: {p.describe()}")
        res = {name: ([], []) for name in places}
        for r in range(args.runs):
            for name, p in places.items():
                pf, dc = _time(path, p, args.threads, ids, args.gen)
                res[name][0].append(pf)
                res[name][1].append(dc)
                print(f"  run {r + 1} {name:9s} prefill {pf:7.1f} tok/s  decode {dc:6.1f} tok/s")
        med = {n: (statistics.median(a), statistics.median(b), max(a), max(b)) for n, (a, b) in res.items()}
        rows.append((path, med))
    print(f"\nthreads {args.threads}, prompt {args.prompt} tokens, decode {args.gen} tokens, {args.runs} runs: "
          "median (best)")
    print(f"{'model':36s} {'placement':10s} {'prefill tok/s':>18s} {'decode tok/s':>16s} {'median vs plain':>18s}")
    for path, med in rows:
        base = med["plain"]
        for name, (pf, dc, pf_best, dc_best) in med.items():
            print(f"{path.rsplit('/', 1)[-1][:36]:36s} {name:10s} {pf:9.1f} ({pf_best:6.1f}) {dc:7.1f} ({dc_best:6.1f}) "
                  f"{pf / base[0]:8.2f}x {dc / base[1]:7.2f}x")


if __name__ == "__main__":
    main()
