"""MoE decode: torch engine vs llama.cpp on the same GGUF, with and without --cpu-moe, and the
MoE roofline; DeepSeek MLA's KV-cache bytes per token against a plain-attention twin.

    python benchmarks/bench_moe.py                      # Qwen3-MoE-shaped, hidden 1024, 32 experts, top-4
    python benchmarks/bench_moe.py --qtype Q4_K_M --threads 1 --runs 7
    python benchmarks/bench_moe.py --device cuda        # torch side on a GPU (--cpu-moe then offloads)

The checkpoint is generated with transformers (random weights, seeded; kept under
benchmarks/out/) and converted with ``edgeinfer convert``. Decode runs ``--gen`` single-token
steps after a ``--prompt``-token prefill, alternating the engines; medians of the per-run ratios.
Roofline: a decode step must read the dense weights plus ``top_k`` of ``n_expert`` experts per
layer (the active parameters); "read/token" is that byte count, the figure to set against the copy
bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_checkpoint(folder: Path, arch: str, **cfg) -> Path:
    import _tiny_models  # the tests' generator: tokenizer + seeded random weights

    if not (folder / "config.json").exists():
        _tiny_models.make_tiny_checkpoint(arch, folder, **cfg)
    return folder


def active_bytes(path) -> tuple[int, int]:
    """(bytes of all 2-D/3-D weights, bytes a decode step reads: dense + top_k/n_expert of the experts)."""
    from edgeinfer.gguf_check import validate_gguf

    h = validate_gguf(path)
    arch = h.architecture
    n_exp = int(h.metadata.get(f"{arch}.expert_count", 0) or 0)
    top_k = int(h.metadata.get(f"{arch}.expert_used_count", 0) or 0)
    names = {t.name for t in h.tensors}
    total = active = 0
    for t in h.tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        total += t.nbytes
        active += t.nbytes * top_k // n_exp if "_exps." in t.name else t.nbytes
    return total, active


def decode_rates(path, threads: int, device: str, n_cpu_moe: int, prompt: int, gen: int, runs: int):
    import torch

    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.backends.llama_placement import expert_overrides, open_llama, placement_for

    n_ctx = prompt + gen + 8
    tb = TorchBackend(path, LoadOptions(n_ctx=n_ctx, n_threads=threads, device=device, n_cpu_moe=n_cpu_moe))
    n_gpu = 0 if device == "cpu" else -1
    llm = open_llama(str(path), placement=placement_for(path, n_gpu, expert_overrides(n_cpu_moe)), n_ctx=n_ctx,
                     n_threads=threads, n_threads_batch=threads, verbose=False, n_gpu_layers=n_gpu)
    ids = tb.tokenize("The quick brown fox jumps over the lazy dog. " * 40, add_special=False)[:prompt]
    steps = (ids * (gen // len(ids) + 1))[:gen]
    model, dev = tb.model, tb.device

    def run_torch():
        model(torch.tensor([ids], device=dev), 0, last_only=True)
        t = time.perf_counter()
        for i, tok in enumerate(steps):
            tb.decode(tok, len(ids) + i)  # the backend's step: the fused CPU step where the model allows
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return len(steps) / (time.perf_counter() - t)

    def run_llama():
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        return len(steps) / (time.perf_counter() - t)

    run_torch(), run_llama()
    pairs = [(run_torch(), run_llama()) for _ in range(runs)]
    llm.close()
    tb.close()
    return pairs


def kv_bytes(tmp: Path) -> tuple[int, int]:
    """KV bytes per token of a DeepSeek-shaped model (latent) and of its plain-attention twin."""
    import torch

    from edgeinfer.engine.loader import load_model
    from edgeinfer.quant.convert import convert

    ds = make_checkpoint(tmp / "deepseek", "deepseek_v3", hidden_size=512, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=256, q_lora_rank=256,
                         qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, intermediate_size=1024)
    twin = make_checkpoint(tmp / "twin", "qwen3", hidden_size=512, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=16, head_dim=96, intermediate_size=1024)
    out = []
    for folder in (ds, twin):
        path = convert(folder, tmp / f"{folder.name}.gguf", "Q8_0", force=True)
        model, _ = load_model(path, torch.device("cpu"), 64)
        out.append(model.cache_bytes_per_token())
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qtype", default="Q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=48)
    args = ap.parse_args()

    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.quant.convert import convert

    OUT.mkdir(exist_ok=True)
    ck = make_checkpoint(OUT / "moe-1024x32", "qwen3_moe", hidden_size=1024, intermediate_size=2048,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                         num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512)
    path = OUT / f"moe-1024x32-{args.qtype}.gguf"
    if not path.exists():
        convert(ck, path, args.qtype)
    total, active = active_bytes(path)
    print(f"model {path.name}: weights {total / 2**20:.0f} MiB, read per decode step {active / 2**20:.0f} MiB "
          f"({active / total:.0%}: dense + 4 of 32 experts)")
    result = {}
    for label, n_cpu_moe in (("resident", 0), ("--cpu-moe", ALL_LAYERS)):
        pairs = decode_rates(path, args.threads, args.device, n_cpu_moe, args.prompt, args.gen, args.runs)
        ratio = statistics.median(t / ll for t, ll in pairs)
        t_med, l_med = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        result[label] = (t_med, l_med, ratio)
        print(f"{label:10s} decode: torch {t_med:6.1f} tok/s, llama.cpp {l_med:6.1f} tok/s, torch/llama.cpp "
              f"{ratio:.2f}x  (runs: {', '.join(f'{t:.1f}/{ll:.1f}' for t, ll in pairs)}); "
              f"torch reads {active * t_med / 1e9:.2f} GB/s of active weights")
    r, c = result["resident"], result["--cpu-moe"]
    print(f"--cpu-moe / resident: torch {c[0] / r[0]:.2f}x, llama.cpp {c[1] / r[1]:.2f}x "
          f"(device {args.device}: {'experts in host memory either way' if args.device == 'cpu' else 'offloaded'})")
    lat, plain = kv_bytes(OUT)
    print(f"KV cache per token (4 layers, 16 heads, f32 cache): DeepSeek MLA latent {lat} B vs plain attention twin "
          f"{plain} B ({plain / lat:.1f}x smaller)")
    print(json.dumps({"active_bytes": active, "total_bytes": total, **{k: v for k, v in result.items()},
                      "kv_latent": lat, "kv_plain": plain}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
