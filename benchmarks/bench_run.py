"""Decode speed of `edgeinfer run` (llama.cpp backend) against raw llama-cpp-python.

Same GGUF (the embedded default model unless -m), same thread count, same greedy prompt,
interleaved runs; prints each run and the median ratio (target >= 0.97).

    python benchmarks/bench_run.py [-m MODEL] [--threads N] [--runs 7] [-n 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def raw_llama_cpp(path: str, threads: int, n: int, prompt_text: str) -> float:
    """Decode tok/s of a bare llama_cpp.Llama.generate loop (the reference)."""
    import llama_cpp

    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    toks = llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
    vocab = llm._model.vocab
    count, t_first = 0, None
    for tok in llm.generate(toks, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(vocab, tok) or count >= n:
            break
    dt = time.perf_counter() - t_first
    llm.close()
    return (count - 1) / dt


def edgeinfer_run(model: str, threads: int, n: int) -> tuple[float, str]:
    """Decode tok/s reported by the real CLI (`edgeinfer run --json`) in a subprocess."""
    r = subprocess.run([sys.executable, "-m", "edgeinfer", "run", "-m", model, "-p", PROMPT, "--temp", "0",
                        "-n", str(n), "--threads", str(threads), "--json"], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    return out["timings"]["decode_tok_s"], out["path"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()

    from edgeinfer.backends.llamacpp import LlamaCppBackend
    from edgeinfer.resolve import resolve_model

    path = str(resolve_model(args.model))
    b = LlamaCppBackend(path)
    prompt_text = b.format_chat([{"role": "user", "content": PROMPT}])
    b.close()
    ours, ref = [], []
    for i in range(args.runs):
        e, _ = edgeinfer_run(args.model, args.threads, args.n)
        r = raw_llama_cpp(path, args.threads, args.n, prompt_text)
        ours.append(e)
        ref.append(r)
        print(f"run {i + 1}: edgeinfer {e:7.1f} tok/s   llama-cpp-python {r:7.1f} tok/s   ratio {e / r:.3f}")
    ratios = [o / r for o, r in zip(ours, ref)]
    print(f"\nmodel {path}\nthreads {args.threads}, {args.n} tokens, {args.runs} runs")
    print(f"median decode: edgeinfer {statistics.median(ours):.1f} tok/s, "
          f"llama-cpp-python {statistics.median(ref):.1f} tok/s")
    print(f"median ratio {statistics.median(ratios):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
