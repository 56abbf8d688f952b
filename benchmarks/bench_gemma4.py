"""Gemma 4 benchmark: MoE decode speed of the torch engine vs llama.cpp, the MoE roofline, PLE memory.

    python benchmarks/bench_gemma4.py                       # Q4_K_M, physical cores, 5 interleaved runs
    python benchmarks/bench_gemma4.py --qtype Q8_0 --runs 7 --threads 1
    python benchmarks/bench_gemma4.py --skip-ple            # only the MoE part

1. **MoE decode.** A generated checkpoint with Gemma-4-26B-A4B's layout scaled to this machine
   (hidden 1024, 8 layers, 32 experts of width 512 with top-4 routing beside a dense MLP of 768,
   attention_k_eq_v full layers every 4th, sliding window 512, vocabulary 16384; bf16, ~440 M
   parameters), converted once to ``--qtype``. Both engines run the same work on the same GGUF:
   one batched prefill of ``--prompt`` tokens, then ``--gen`` single-token decode steps, no
   sampling; runs alternate between the engines and the median per-run ratio is printed
   (target >= 0.8 now, >= 1.0 once the engine-speed issue lands).
2. **Bytes per token.** The weight bytes one torch-engine decode step actually reads (every
   quantized matmul and embedding row it calls, counted while it runs) against the active-parameter
   bytes the GGUF implies (``edgeinfer inspect``'s figure: routed experts at top-k / n_expert, tables
   read by row; the MoE roofline) and the whole file; x decode tok/s = the bandwidth each engine
   achieves.
3. **Per-layer embeddings.** An E2B-shaped model with a 65536-token vocabulary (F16: a 256 MiB PLE
   table beside ~10 MiB of other weights) and its twin without PLE: peak RSS (VmHWM of the process
   holding the model, fresh: load + 16 generated tokens) in the torch engine, in edgeinfer's
   llama.cpp runner (``lazy_mode = ON``: llama.cpp reads the table by row) and in stock
   llama-cpp-python (lazy_mode AUTO: below 4 GiB the whole file is populated).

Checkpoints and GGUFs are cached in ``--workdir`` (default ``benchmarks/out/gemma4``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S, F = "sliding_attention", "full_attention"
#: 26B-A4B (hidden 2816, 30 layers, 128 experts x 704 top-8, dense 2112) scaled to a 2-core machine
MOE_SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                 global_head_dim=256, num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=768,
                 enable_moe_block=True, num_experts=32, top_k_experts=4, moe_intermediate_size=512,
                 sliding_window=512, layer_types=[S, S, S, F] * 2, max_position_embeddings=4096)


def tiny_models():
    sys.path.insert(0, str(ROOT / "tests"))
    import _tiny_models

    return _tiny_models


def make(workdir: Path, qtype: str) -> dict:
    """Build (once) the MoE checkpoint and the PLE pair, convert them; returns their GGUF paths."""
    import torch

    from edgeinfer.quant.convert import convert

    tm = tiny_models()
    out = {}
    jobs = {"moe": ("gemma4_moe", dict(MOE_SHAPE), 16384, qtype),
            "ple": ("gemma4_e2b", dict(hidden_size_per_layer_input=256), 65536, "F16"),
            "twin": ("gemma4_e2b", dict(hidden_size_per_layer_input=0), 65536, "F16")}
    for name, (arch, shape, vocab, qt) in jobs.items():
        folder = workdir / name
        gguf_path = workdir / f"{name}-{qt}.gguf"
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            tm.make_tiny_checkpoint(arch, folder, dtype=torch.bfloat16 if name == "moe" else torch.float16,
                                    n_vocab=vocab, **shape)
            print(f"built {name} checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        if not gguf_path.is_file():
            convert(folder, gguf_path, qt)
        out[name] = gguf_path
    return out


def count_read_bytes(model, ids: list[int], pos: int) -> int:
    """Weight bytes one forward of ``ids`` at ``pos`` reads: every quantized matmul it calls (each
    expert once per call), every embedding row it gathers."""
    import torch

    from edgeinfer.kernels.qlinear import FusedLinear, QuantEmbedding, QuantLinear

    seen = [0]
    real = {cls: cls.forward for cls in (QuantLinear, FusedLinear, QuantEmbedding)}

    def linear(self, x):
        seen[0] += self.nbytes()
        return real[QuantLinear](self, x)

    def fused(self, x):
        seen[0] += self.packed.nbytes()
        return real[FusedLinear](self, x)

    def embed(self, i):
        seen[0] += i.numel() * self.raw.shape[1]
        return real[QuantEmbedding](self, i)

    QuantLinear.forward, FusedLinear.forward, QuantEmbedding.forward = linear, fused, embed
    try:
        model(torch.tensor([ids]), pos, last_only=True)
    finally:
        for cls, fn in real.items():
            cls.forward = fn
    return seen[0]


def bench_moe(path: Path, threads: int, runs: int, n_prompt: int, n_gen: int) -> dict:
    import torch
    from bench_torch_engine import interleaved_runs  # this folder

    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.llama_placement import open_llama
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.gguf_check import validate_gguf
    from edgeinfer.inspect_gguf import usage

    n_ctx = n_prompt + n_gen + 8
    tb = TorchBackend(path, LoadOptions(n_ctx=n_ctx, n_threads=threads, device="cpu"))
    llm = open_llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=max(512, n_prompt),
                     n_gpu_layers=0, verbose=False)
    ids = tb.tokenize("The quick brown fox jumps over the lazy dog. " * (n_prompt // 8 + 1), add_special=False)[:n_prompt]
    steps = (ids * (n_gen // len(ids) + 1))[:n_gen]
    model = tb.model
    rows = interleaved_runs(model, torch.device("cpu"), llm, ids, steps, runs, decode=tb.decode)  # the backend's step
    model.setup(n_ctx, torch.device("cpu"), torch.float32)
    model(torch.tensor([ids]), 0, last_only=True)
    read = statistics.median(count_read_bytes(model, [steps[i]], len(ids) + i) for i in range(8))
    h = validate_gguf(path)
    use = usage(h)
    med = [statistics.median(c) for c in zip(*rows)]
    res = {"file": path.name, "threads": threads, "runs": runs, "prompt": len(ids), "gen": len(steps),
           "prefill_tok_s": {"torch": med[0], "llama.cpp": med[2]}, "decode_tok_s": {"torch": med[1], "llama.cpp": med[3]},
           "prefill_ratio": statistics.median(r[0] / r[2] for r in rows),
           "decode_ratio": statistics.median(r[1] / r[3] for r in rows),
           "file_bytes": h.file_size, "tensor_bytes": use["tensor_bytes"], "active_bytes": use["active_bytes"],
           "torch_read_bytes_per_token": int(read), "parameters": use["parameters"],
           "active_parameters": use["active_parameters"], "kernels": dict(tb.report.paths),
           "torch_decode_step": "fused C step" if tb._step is not None else "model forward"}
    llm.close()
    tb.close()
    return res


def peak_rss(how: str, path: Path) -> dict:
    """Peak RSS of the process holding the model, fresh, load + 16 tokens (tests/_gemma4.py)."""
    tiny_models()  # puts tests/ on sys.path
    import _gemma4

    return _gemma4.peak_rss(how, path)


def bench_ple(ple: Path, twin: Path, reps: int) -> dict:
    from edgeinfer.gguf_check import validate_gguf

    table = next(t.nbytes for t in validate_gguf(ple).tensors if t.name == "per_layer_token_embd.weight")
    res = {"table_bytes": table, "ple_file": ple.stat().st_size, "twin_file": twin.stat().st_size}
    labels = {"torch": "torch engine", "llama.cpp": "llama.cpp runner", "raw": "stock llama-cpp-python"}
    for how, label in labels.items():
        a = [peak_rss(how, ple)["peak"] for _ in range(reps)]
        b = [peak_rss(how, twin)["peak"] for _ in range(reps)]
        res[how] = {"ple": statistics.median(a), "twin": statistics.median(b)}
        print(f"{label:23s} peak RSS with PLE {res[how]['ple'] / 2**20:7.1f} MiB, twin {res[how]['twin'] / 2**20:7.1f} "
              f"MiB: {res[how]['ple'] / res[how]['twin']:.3f}x (target <= 1.15)", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "gemma4")
    ap.add_argument("--qtype", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--skip-ple", action="store_true")
    args = ap.parse_args()

    from edgeinfer.backends.common import default_threads
    from edgeinfer.units import fmt_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or default_threads()
    paths = make(args.workdir, args.qtype.upper())
    m = bench_moe(paths["moe"], threads, args.runs, args.prompt, args.gen)
    print(f"\n{m['file']}: {m['parameters'] / 1e6:.0f} M parameters, {m['active_parameters'] / 1e6:.0f} M active per "
          f"token; {threads} threads, prompt {m['prompt']}, {m['gen']} decode steps, {m['runs']} runs")
    print(f"median prefill: torch {m['prefill_tok_s']['torch']:.1f}, llama.cpp {m['prefill_tok_s']['llama.cpp']:.1f} "
          f"tok/s, ratio {m['prefill_ratio']:.2f}x")
    print(f"median decode:  torch {m['decode_tok_s']['torch']:.2f}, llama.cpp {m['decode_tok_s']['llama.cpp']:.2f} "
          f"tok/s, ratio {m['decode_ratio']:.2f}x (target >= 0.8)")
    rd, act, tot = m["torch_read_bytes_per_token"], m["active_bytes"], m["tensor_bytes"]
    print(f"bytes per token: torch engine reads {fmt_bytes(rd)}; active-parameter bytes {fmt_bytes(act)} "
          f"({rd / act:.2f}x); whole file {fmt_bytes(tot)} ({act / tot:.1%} of it is active)")
    for eng in ("torch", "llama.cpp"):
        print(f"  {eng:9s} {m['decode_tok_s'][eng]:.2f} tok/s x active bytes = {act * m['decode_tok_s'][eng] / 1e9:.2f} GB/s")
    print(f"torch kernels: {m['kernels']}; decode by the {m['torch_decode_step']}")
    out = {"moe": m}
    if not args.skip_ple:
        print()
        out["ple"] = bench_ple(paths["ple"], paths["twin"], reps=3)
    (args.workdir / "results.json").write_text(json.dumps(out, indent=1))
    print(f"\nfigures written to {args.workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
