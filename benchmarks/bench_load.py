"""Load time and resident memory: the torch engine vs llama.cpp on the same GGUF, fresh processes.

    python benchmarks/bench_load.py                       # default model
    python benchmarks/bench_load.py -m model.gguf --runs 7

Each measurement is its own Python process (so page cache is warm but nothing else is shared),
alternating between the engines: the time of the load call alone (``TorchBackend(...)``:
header check, memory map, model build, vocab; ``llama_cpp.Llama(...)``), imports excluded, and
the RSS after the load and after a 16-token generation (the pages a decode touches), against the
RSS of a process that only imported torch. Targets (issue 15): load <= llama.cpp's + 1 s; RSS <=
llama.cpp's + torch's import size. Medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = {
    "torch-import": """
import json, psutil, torch
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
""",
    "torch": """
import json, sys, time, psutil, torch
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.backends.torch_engine import TorchBackend
t = time.perf_counter()
tb = TorchBackend(sys.argv[1], LoadOptions(n_ctx=512, n_threads=int(sys.argv[2]), device="cpu"))
load = time.perf_counter() - t
rss_load = psutil.Process().memory_info().rss
list(tb.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=16)))
print(json.dumps({"load": load, "rss": rss_load, "rss_gen": psutil.Process().memory_info().rss,
                  "step": tb.info().extra["decode_step"]}))
""",
    "llama.cpp": """
import json, sys, time, psutil
import llama_cpp
t = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False)
load = time.perf_counter() - t
rss_load = psutil.Process().memory_info().rss
toks = llm.tokenize(b"The quick brown fox")
n = 0
for _ in llm.generate(toks, temp=0.0, top_k=1):
    n += 1
    if n == 16:
        break
print(json.dumps({"load": load, "rss": rss_load, "rss_gen": psutil.Process().memory_info().rss}))
""",
}


def child(kind: str, path: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD[kind], path, str(threads)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from edgeinfer.resolve import resolve_model

    path = str(resolve_model(args.model))
    rows = {k: [] for k in CHILD}
    for i in range(args.runs):
        for kind in CHILD:
            rows[kind].append(child(kind, path, args.threads))
        t, ll = rows["torch"][-1], rows["llama.cpp"][-1]
        print(f"run {i + 1}: load torch {t['load']:.2f} s / llama.cpp {ll['load']:.2f} s; RSS after generating "
              f"torch {t['rss_gen'] / 2**20:.0f} / llama.cpp {ll['rss_gen'] / 2**20:.0f} MiB "
              f"(torch import alone {rows['torch-import'][-1]['rss'] / 2**20:.0f} MiB)", flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0] if f != "step"} for k, v in rows.items()}
    t, ll, imp = med["torch"], med["llama.cpp"], med["torch-import"]["rss"]
    mib = 2**20
    print(f"\nmodel {path}, {args.threads} thread(s), {args.runs} runs, medians "
          f"(torch decode step: {rows['torch'][0]['step']})")
    print(f"load: torch {t['load']:.2f} s, llama.cpp {ll['load']:.2f} s -> {t['load'] - ll['load']:+.2f} s "
          f"(target <= +1 s: {'met' if t['load'] <= ll['load'] + 1 else 'NOT met'})")
    budget = ll["rss_gen"] + imp
    print(f"RSS after load: torch {t['rss'] / mib:.0f} MiB, llama.cpp {ll['rss'] / mib:.0f} MiB; after 16 tokens: "
          f"torch {t['rss_gen'] / mib:.0f} MiB, llama.cpp {ll['rss_gen'] / mib:.0f} MiB + torch import "
          f"{imp / mib:.0f} MiB = {budget / mib:.0f} MiB (target: {'met' if t['rss_gen'] <= budget else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
