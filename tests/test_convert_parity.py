"""Math parity: tiny random HF checkpoints -> edgeinfer convert -> llama.cpp logits vs transformers logits.

For every architecture and type the GGUF is loaded in llama-cpp-python (all logits, F32 KV cache so
the float types are not blurred by an F16 cache) and compared on the same 24 tokens with the
transformers model loaded from the same checkpoint. Printed: relative L2 error of the logits and
mean KL(transformers || llama.cpp) per token.

Quantized types are checked twice: against the original float model (loose tolerances, below), and
against an oracle that removes the weight error entirely: transformers run with every weight
replaced by ``dequantize(quantize(W))`` through the ``gguf`` package's reference quantizers, with
the type the converter's plan chose for that tensor. What is left there is llama.cpp's own 8-bit
quantization of activations in quantized matmuls (≈0.4% per value), so that bound is tight
(rel < 0.06, KL < 1e-3); a wrong block layout, scale, row order or fix-up gives rel. errors near 1.

Tolerances against the original model (rel. error / KL), with the reasons:
* F32: 2e-3 / 1e-5 — same weights; what is left is float32 summation order and llama.cpp's
  activation rounding in its matmul kernels (measured ~1e-4..1e-3).
* F16/BF16: weights rounded to 11/8 significant bits: relative weight error ~2^-12 / 2^-9, which
  passes through a few layers nearly linearly: 1e-2 / 4e-2 (measured several times lower).
* Q8_0 / Q5_x / Q4_x: block quantization with per-weight relative RMS error of roughly 0.3% / 1.5%
  / 3% of the block range for 8 / 5 / 4 bits, plus llama.cpp's 8-bit activation quantization in the
  quantized matmuls. Random tiny models are badly conditioned (no outlier structure, every weight
  matters), so the bounds are wide: 0.1 / 0.35 / 0.6 rel and 3e-3 / 3e-2 / 0.1 KL (1.3-3x the
  measured values); the oracle comparison above is the sharp one.
"""

from __future__ import annotations

import numpy as np
import pytest

import _tiny_models

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
TOL = {"F32": (2e-3, 1e-5), "F16": (1e-2, 1e-4), "BF16": (4e-2, 1e-3), "Q8_0": (0.1, 3e-3),
       "Q5_0": (0.35, 3e-2), "Q5_1": (0.35, 3e-2), "Q4_0": (0.6, 0.1), "Q4_1": (0.6, 0.1)}
ORACLE_TOL = (0.06, 1e-3)
# MoE: where a token's best experts nearly tie, 8-bit activation rounding can route it differently from the
# oracle, and that position alone then differs by ~0.1-0.3 (see tests/test_models.py): judged per position.
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
TOKENS = [int(t) for t in np.random.default_rng(7).integers(3, 300, size=24)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (checkpoint folder, transformers float64 logits [24, vocab])."""
    root = tmp_path_factory.mktemp("tiny_parity")
    out = {}
    for arch in ARCHS:
        folder = _tiny_models.make_tiny_checkpoint(arch, root / arch)
        out[arch] = (folder, hf_logits(folder))
    return out


def hf_logits(folder, qtype: str | None = None) -> np.ndarray:
    """transformers logits on TOKENS; with ``qtype``, every weight goes through the gguf package's
    reference quantize -> dequantize round trip in the type the converter's plan gives it."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from edgeinfer.quant.convert import plan_conversion

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if qtype is not None:
        plan = plan_conversion(folder, qtype)
        types = {t.source.name: t.ggml_type for t in plan.tensors if t.source.name}
        by_gguf = {t.gguf_name: t.ggml_type for t in plan.tensors}
        quantized = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = types.get(name)
                if t is None and name == "lm_head.weight":  # tied: the embedding's type
                    t = types.get("model.embed_tokens.weight")
                if t is None and ".experts." in name:  # transformers holds experts fused: [E, 2I, H] / [E, H, I]
                    stem = "ffn_down_exps" if name.endswith("down_proj") else "ffn_gate_exps"
                    t = by_gguf.get(f"blk.{name.split('.')[2]}.{stem}.weight")
                if t is None or t == gguf.GGMLQuantizationType.F32:
                    continue
                w = p.detach().numpy()
                if name.endswith("kv_b_proj.weight"):  # DeepSeek: stored per head as attn_k_b (transposed) + attn_v_b
                    p.copy_(torch.from_numpy(_mla_kv_b_round_trip(w, folder, name, by_gguf)))
                else:
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)))
                quantized += 1
        assert quantized > 0
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


def _mla_kv_b_round_trip(w: np.ndarray, folder, name: str, types: dict) -> np.ndarray:
    """kv_b [H*(nope+v), kv_lora] through the types and layouts of the file's attn_k_b (each head's
    nope rows transposed, so blocks run along nope) and attn_v_b."""
    import json

    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    h, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    bid = name.split(".")[2]
    rt = lambda x, t: gguf.quants.dequantize(gguf.quants.quantize(x, t), t).reshape(x.shape)  # noqa: E731
    kv = w.reshape(h, nope + v, -1).copy()
    kv[:, :nope] = rt(np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1)), types[f"blk.{bid}.attn_k_b.weight"]
                      ).transpose(0, 2, 1)
    kv[:, nope:] = rt(np.ascontiguousarray(kv[:, nope:]), types[f"blk.{bid}.attn_v_b.weight"])
    return kv.reshape(w.shape)


def llama_logits(path, tokens) -> np.ndarray:
    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return rel, kl


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_all_types(tiny, tmp_path, arch):
    from edgeinfer.quant.convert import convert

    folder, ref = tiny[arch]
    failures = []
    for qtype, (tol_rel, tol_kl) in TOL.items():
        path = convert(folder, tmp_path / f"{arch}-{qtype}.gguf", qtype)
        got = llama_logits(path, TOKENS)
        rel, kl = compare(ref, got)
        line = f"{arch:8s} {qtype:5s} vs float: rel={rel:.3e} (tol {tol_rel:g}) KL={kl:.3e} (tol {tol_kl:g})"
        if not (rel < tol_rel and kl < tol_kl):
            failures.append(f"{qtype}: rel={rel:.3e} kl={kl:.3e}")
        if qtype.startswith("Q"):
            oracle = hf_logits(folder, qtype)
            orel, okl = compare(oracle, got)
            line += f" | vs dequantized oracle: rel={orel:.3e} KL={okl:.3e}"
            if arch in MOE:  # a near-tie of two experts may route differently: judge per position
                per = np.linalg.norm(got - oracle, axis=-1) / np.linalg.norm(oracle, axis=-1)
                flips = int((per > ORACLE_TOL[0]).sum())
                line += f", median per position {np.median(per):.3e}, {flips} over {ORACLE_TOL[0]}"
                ok = np.median(per) < ORACLE_TOL[0] and flips <= 3 and okl < ORACLE_TOL[1]
            else:
                ok = orel < ORACLE_TOL[0] and okl < ORACLE_TOL[1]
            if not ok:
                failures.append(f"{qtype} vs oracle: rel={orel:.3e} kl={okl:.3e}")
        print(line)
        path.unlink()
    assert not failures, f"{arch}: " + "; ".join(failures)


def test_bf16_and_sharded_sources_give_the_same_file(tmp_path):
    """A bf16 checkpoint saved in shards converts to the same GGUF as the same weights in one file."""
    import torch

    from edgeinfer.quant.convert import convert

    # same folder name, so general.name (taken from the folder) is the same too
    a = _tiny_models.make_tiny_checkpoint("qwen2", tmp_path / "one" / "m", dtype=torch.bfloat16)
    b = _tiny_models.make_tiny_checkpoint("qwen2", tmp_path / "sharded" / "m", dtype=torch.bfloat16,
                                          max_shard_size="40KB")
    assert (b / "model.safetensors.index.json").is_file()
    assert len(list(b.glob("*.safetensors"))) > 2
    fa = convert(a, tmp_path / "a.gguf", "Q8_0").read_bytes()
    fb = convert(b, tmp_path / "b.gguf", "Q8_0").read_bytes()
    print(f"single-file vs sharded bf16 source: {len(fa)} vs {len(fb)} bytes, identical={fa == fb}")
    assert fa == fb
