"""Decode speed and time to first token of `edgeinfer run` (llama.cpp runner) against raw llama-cpp-python.

Same GGUF (the embedded default model unless -m), same thread count, same greedy chat prompt,
interleaved runs; prints each run and the medians (targets: decode ratio >= 0.97, TTFT at most
50 ms more).

* cold (default): each run is a fresh process on both sides: `edgeinfer run --json` (parent +
  runner process) and a fresh Python process with a bare ``llama_cpp.Llama.generate`` loop;
* ``--warm``: one ``LlamaCppBackend`` and one ``Llama`` loaded once in this process, requests
  alternated: the cost of the runner's pipe alone.

    python benchmarks/bench_run.py [-m MODEL] [--threads N] [--runs 7] [-n 128] [--warm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


class Raw:
    """A bare llama_cpp.Llama (opened with edgeinfer's safe buffer types) and its generate loop."""

    def __init__(self, path: str, threads: int):
        from edgeinfer.backends.llama_placement import open_llama

        self.llm = open_llama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, prompt_text: str, n: int) -> tuple[float, float]:
        """(decode tok/s, TTFT s) of one greedy generation of up to ``n`` tokens."""
        import llama_cpp

        vocab = self.llm._model.vocab
        t0 = time.perf_counter()
        toks = self.llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
        count, t_first = 0, None
        for tok in self.llm.generate(toks, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
            count += 1
            if t_first is None:
                t_first = time.perf_counter()
            if llama_cpp.llama_vocab_is_eog(vocab, tok) or count >= n:
                break
        return (count - 1) / (time.perf_counter() - t_first), t_first - t0


def raw_once(path: str, threads: int, n: int, prompt_text: str) -> tuple[float, float]:
    """:class:`Raw` in a fresh Python process, like `edgeinfer run` is."""
    code = ("import json, sys; sys.path.insert(0, %r); from bench_run import Raw; "
            "r = Raw(%r, %d); print(json.dumps(r.run(%r, %d)))") % (sys.path[0], path, threads, prompt_text, n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dec, ttft = json.loads(out.strip().splitlines()[-1])
    return dec, ttft


def edgeinfer_run(model: str, threads: int, n: int) -> tuple[float, float, str]:
    """(decode tok/s, TTFT s, path) reported by the real CLI (`edgeinfer run --json`) in a subprocess."""
    r = subprocess.run([sys.executable, "-m", "edgeinfer", "run", "-m", model, "-p", PROMPT, "--temp", "0",
                        "-n", str(n), "--threads", str(threads), "--ctx", "2048", "--json"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    return out["timings"]["decode_tok_s"], out["timings"]["ttft_s"], out["path"]


def _report(ours, ref, label):
    ratios = [o[0] / r[0] for o, r in zip(ours, ref)]
    deltas = [(o[1] - r[1]) * 1000 for o, r in zip(ours, ref)]
    print(f"\n{label}: median decode: edgeinfer {statistics.median(o[0] for o in ours):.1f} tok/s, "
          f"llama-cpp-python {statistics.median(r[0] for r in ref):.1f} tok/s; "
          f"median ratio {statistics.median(ratios):.3f} (target >= 0.97)")
    print(f"{label}: median TTFT: edgeinfer {statistics.median(o[1] for o in ours) * 1000:.1f} ms, "
          f"llama-cpp-python {statistics.median(r[1] for r in ref) * 1000:.1f} ms; "
          f"median delta {statistics.median(deltas):+.1f} ms (target <= +50 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--warm", action="store_true", help="both loaded once in this process, requests alternated")
    args = ap.parse_args()

    from edgeinfer.backend import LoadOptions, SamplingParams
    from edgeinfer.backends.llamacpp import LlamaCppBackend
    from edgeinfer.resolve import resolve_model

    path = str(resolve_model(args.model))
    b = LlamaCppBackend(path, LoadOptions(n_ctx=2048, n_threads=args.threads, seed=0))
    chat = [{"role": "user", "content": PROMPT}]
    prompt_text = b.format_chat(chat)
    ours, ref = [], []
    if args.warm:
        raw = Raw(path, args.threads)
        for i in range(args.runs + 1):
            d = list(b.generate(chat, SamplingParams(temperature=0, max_tokens=args.n)))[-1].timings
            e = (d.decode_tok_s, d.ttft_s)
            r = raw.run(prompt_text, args.n)
            if i == 0:
                continue  # warm-up of both
            ours.append(e)
            ref.append(r)
            print(f"run {i}: edgeinfer {e[0]:7.1f} tok/s TTFT {e[1] * 1000:6.1f} ms   "
                  f"llama-cpp-python {r[0]:7.1f} tok/s TTFT {r[1] * 1000:6.1f} ms   ratio {e[0] / r[0]:.3f}")
    else:
        b.close()
        for i in range(args.runs):
            e = edgeinfer_run(args.model, args.threads, args.n)[:2]
            r = raw_once(path, args.threads, args.n, prompt_text)
            ours.append(e)
            ref.append(r)
            print(f"run {i + 1}: edgeinfer {e[0]:7.1f} tok/s TTFT {e[1] * 1000:6.1f} ms   "
                  f"llama-cpp-python {r[0]:7.1f} tok/s TTFT {r[1] * 1000:6.1f} ms   ratio {e[0] / r[0]:.3f}")
    b.close()
    print(f"\nmodel {path}\nthreads {args.threads}, {args.n} tokens, {args.runs} runs, "
          f"{'warm (one process)' if args.warm else 'cold (a fresh process per run)'}")
    _report(ours, ref, "warm" if args.warm else "cold")


if __name__ == "__main__":
    main()
