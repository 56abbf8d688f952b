"""Benchmark: `edgeinfer convert --qtype Q8_0` vs llama.cpp's `convert_hf_to_gguf.py --outtype q8_0`.

Both convert the same generated checkpoint (a random llama with wide layers, bf16 safetensors in
two shards, >= 1 GB, with SmolLM2's real tokenizer so llama.cpp's converter recognizes it). Each
converter runs in its own process, alternately, ``--reps`` times; wall time and peak RSS (from
``wait4``'s rusage of that very process) are reported as medians, with the ratios against the
targets (time <= 1.0x, peak RSS <= 0.5x). The two outputs' tensor data are compared too. Also
printed: encoder throughput of edgeinfer's torch quantizers vs the ``gguf`` package's numpy ones.

llama.cpp's converter is not part of edgeinfer; point ``--llama-convert`` at a copy (the
llama-cpp-python source distribution ships it under vendor/llama.cpp/).

Usage:
    python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--reps 3] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_LLAMA_CONVERT = "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"


def make_checkpoint(folder: Path, layers: int, hidden: int, ff: int) -> Path:
    """Random bf16 llama checkpoint (2 shards + index) with SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from edgeinfer.resolve import default_model_path

    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = default_model_path()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    tok.save_pretrained(folder)
    vocab, heads, kv = 49152, hidden // 128, max(1, hidden // 512)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    hd = hidden // heads
    shards: list[dict] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        s = shards[0 if i < layers // 2 else 1]
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = rnd(heads * hd, hidden)
        s[p + "self_attn.k_proj.weight"] = rnd(kv * hd, hidden)
        s[p + "self_attn.v_proj.weight"] = rnd(kv * hd, hidden)
        s[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * hd)
        s[p + "mlp.gate_proj.weight"] = rnd(ff, hidden)
        s[p + "mlp.up_proj.weight"] = rnd(ff, hidden)
        s[p + "mlp.down_proj.weight"] = rnd(hidden, ff)
        s[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        s[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shards[1]["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shards[1]["lm_head.weight"] = rnd(vocab, hidden)
    weight_map, total = {}, 0
    for k, sd in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(sd, folder / name, metadata={"format": "pt"})
        for n, t in sd.items():
            weight_map[n] = name
            total += t.numel() * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "done").write_text("ok")
    return folder


def run_measured(cmd: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def compare_outputs(a: Path, b: Path) -> str:
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    common = sorted(set(ta) & set(tb))
    same = sum(1 for n in common if ta[n].tensor_type == tb[n].tensor_type
               and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)))
    return f"{same}/{len(common)} common tensors byte-identical ({len(ta)} vs {len(tb)} tensors)"


def encoder_speed() -> None:
    import gguf
    import numpy as np
    import torch

    from edgeinfer.quant.quantizers import quantize

    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    xt = torch.from_numpy(x)
    mb = x.nbytes / 2**20
    T = gguf.GGMLQuantizationType
    for t in (T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1):
        ours, ref = [], []
        for _ in range(3):
            t0 = time.perf_counter(); quantize(xt, t); ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); gguf.quants.quantize(x, t); ref.append(time.perf_counter() - t0)
        o, r = statistics.median(ours), statistics.median(ref)
        print(f"  {t.name:5s}: edgeinfer {mb / o:7.0f} MiB/s   gguf numpy {mb / r:7.0f} MiB/s   ({r / o:.2f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--llama-convert", default=DEFAULT_LLAMA_CONVERT)
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ck = args.workdir / "ckpt"
    if args.make_only:
        make_checkpoint(ck, args.layers, args.hidden, args.ff)
        return 0
    if not Path(args.llama_convert).is_file():
        print(f"llama.cpp's converter not found at {args.llama_convert}; pass --llama-convert", file=sys.stderr)
        return 2
    # Built in a child process: Linux reports a child's peak RSS including the parent's memory it
    # inherited at fork time, so this process must stay small while it measures.
    subprocess.run([sys.executable, __file__, "--make-only", "--workdir", str(args.workdir), "--layers",
                    str(args.layers), "--hidden", str(args.hidden), "--ff", str(args.ff)], check=True)
    size = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    print(f"checkpoint: {ck} ({size / 2**30:.2f} GiB bf16, {args.layers} layers, hidden {args.hidden}, ff {args.ff})")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    ours_out, ref_out = args.workdir / "edgeinfer-q8_0.gguf", args.workdir / "llamacpp-q8_0.gguf"
    cmds = {
        "edgeinfer": [sys.executable, "-m", "edgeinfer", "convert", str(ck), "--qtype", "Q8_0", "-o", str(ours_out),
                      "--force", "--no-progress"],
        "llama.cpp": [sys.executable, args.llama_convert, str(ck), "--outtype", "q8_0", "--outfile", str(ref_out)],
    }
    res: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
    for rep in range(args.reps):
        for name, cmd in cmds.items():
            wall, rss = run_measured(cmd, env)
            res[name].append((wall, rss))
            print(f"  rep {rep + 1} {name:9s}: {wall:7.1f} s, peak RSS {rss / 2**20:7.0f} MiB", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in res.items()}
    (tw, tr), (lw, lr) = med["edgeinfer"], med["llama.cpp"]
    print(f"median edgeinfer: {tw:.1f} s, {tr / 2**20:.0f} MiB | llama.cpp: {lw:.1f} s, {lr / 2**20:.0f} MiB")
    print(f"time ratio {tw / lw:.2f}x (target <= 1.0)   peak RSS ratio {tr / lr:.2f}x (target <= 0.5)")
    print("outputs:", compare_outputs(ours_out, ref_out))
    # after the measured runs: importing the converter here would inflate the children's peak RSS
    from edgeinfer.quant.source import open_checkpoint

    largest = max(r.n_elements for r in open_checkpoint(ck).tensors.values()) * 4
    bound = 3 * largest + 2**29
    print(f"issue bound: peak RSS <= 3 x largest tensor f32 ({largest / 2**20:.0f} MiB) + 0.5 GiB = "
          f"{bound / 2**20:.0f} MiB; edgeinfer's median peak {tr / 2**20:.0f} MiB -> {'OK' if tr <= bound else 'EXCEEDED'}")
    print("encoder throughput (4096x4096 f32, median of 3):")
    encoder_speed()
    print("note: shared 2-core machine; other jobs were running, so wall times are noisy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
