"""Every architecture in models/ on tiny random checkpoints: torch engine vs transformers vs llama.cpp.

One row per architecture (``ARCHS``), built by ``tests/_tiny_models.py`` and converted with
``edgeinfer convert`` (F32 and two quantized types). Oracles and tolerances:

* F32 GGUF vs transformers (float32 weights, float64 logits): rel. L2 error < 1e-4 -- the same
  weights, only fp32 summation order differs (measured ~1e-6).
* F32 GGUF vs llama.cpp on the same file (F32 KV cache): rel < 2e-3 (llama.cpp's kernels round
  activations a little; measured ~1e-4).
* Q8_0 / Q4_0 GGUF vs llama.cpp on the same file: both engines approximate the same dequantized
  weights, llama.cpp with 8-bit activations, the torch CPU path with bf16 activations: rel < 0.06,
  KL < 2e-3 per position (measured 3-10x lower; a wrong layout or RoPE style gives rel ~1).
* MoE architectures (``MOE``), quantized: routing is discontinuous -- where a token's two best
  experts are nearly tied, the engines' slightly different roundings can choose differently and that
  position's logits then differ by ~0.1-0.3 (measured on the tiny DeepSeek: 2 of 24 positions). So
  per position: the median rel < 0.06, at most 3 positions over 0.06, and mean KL < 2e-3.
* KV cache: prefill + step decode (and chunked prefill longer than gemma3's 4-token window, which
  goes through the ring buffer) equals one full forward pass to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _tiny_models

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3",
         "gemma4_e2b", "gemma4_dense"]  # Gemma 4's MoE variant: tests/test_gemma4_engine.py
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
TOKENS = [int(t) for t in np.random.default_rng(11).integers(3, 300, size=24)]


def rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def hf_logits(folder) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


def llama_logits(path) -> np.ndarray:
    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llm.close()


def torch_model(path, n_ctx: int = 64):
    from edgeinfer.engine.loader import load_model

    return load_model(path, torch.device("cpu"), n_ctx)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> checkpoint folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: _tiny_models.make_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_parity(tiny, tmp_path, arch):
    from edgeinfer.quant.convert import convert

    torch.set_num_threads(1)
    folder = tiny[arch]
    ref_hf = hf_logits(folder)
    lines, failures = [], []
    for qtype in ("F32", "Q8_0", "Q4_0"):
        path = convert(folder, tmp_path / f"{arch}-{qtype}.gguf", qtype)
        model, report = torch_model(path)
        got = model(torch.tensor([TOKENS]), 0)[0].double().numpy()
        ref_lc = llama_logits(path)
        r_lc, k_lc = rel(ref_lc, got), kl(ref_lc, got)
        line = f"{arch:7s} {qtype:5s} kernels {dict(report.paths)}: vs llama.cpp rel={r_lc:.2e} KL={k_lc:.2e}"
        if qtype == "F32":
            r_hf = rel(ref_hf, got)
            line += f" | vs transformers rel={r_hf:.2e}"
            if not (r_hf < 1e-4 and r_lc < 2e-3):
                failures.append(line)
        elif arch in MOE:
            per = np.linalg.norm(got - ref_lc, axis=-1) / np.linalg.norm(ref_lc, axis=-1)
            flips = int((per > 0.06).sum())
            line += f" | per position: median rel={np.median(per):.2e}, {flips} over 0.06"
            if not (np.median(per) < 0.06 and flips <= 3 and k_lc < 2e-3):
                failures.append(line)
        elif not (r_lc < 0.06 and k_lc < 2e-3):
            failures.append(line)
        lines.append(line)
        path.unlink()
    print("\n".join(lines))
    assert not failures, failures


def _cache_check(model, chunks: list[int]) -> float:
    """Run TOKENS in chunks of the given sizes through the cache; max rel diff vs one full pass."""
    full = model(torch.tensor([TOKENS]), 0)[0]
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(torch.tensor([TOKENS[pos:pos + n]]), pos)[0])
        pos += n
    assert pos == len(TOKENS)
    return float((torch.cat(outs) - full).abs().max() / full.abs().max())


@pytest.mark.parametrize("arch", ["gemma3", "qwen3", "gemma4_e2b", "gemma4_dense"])
def test_kv_cache_past_sliding_window(tiny, tmp_path, arch):
    from edgeinfer.quant.convert import convert

    path = convert(tiny[arch], tmp_path / f"{arch}.gguf", "F32")
    model, _ = torch_model(path, n_ctx=32)
    a = model.args
    rings = [layer.attn.cache.ring for layer in model.layers]
    print(f"{arch}: window {a.sliding_window}, layers with a ring-buffer cache: {rings}")
    if arch == "gemma3":
        assert a.sliding_window == 4 and any(rings) and not all(rings)
        assert all(layer.attn.cache.size == 4 for layer in model.layers if layer.attn.cache.ring)
    plans = {"prefill 3 + steps": [3] + [1] * 21,
             "prefill 10 (> window) + steps": [10] + [1] * 14,
             "chunks 5,7,1,6,5": [5, 7, 1, 6, 5]}
    for name, chunks in plans.items():
        err = _cache_check(model, chunks)
        print(f"{arch} {name}: max rel diff vs full pass {err:.2e} (tol 1e-5)")
        assert err < 1e-5


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import _gguf_files

    from edgeinfer.errors import InvalidModelError

    path = _gguf_files.write_tiny_gguf(tmp_path / "x.gguf", arch="mamba")
    with pytest.raises(InvalidModelError, match="mamba.*not supported by the torch engine"):
        torch_model(path)


def test_incomplete_gguf_is_a_clear_error(tmp_path):
    import _gguf_files

    from edgeinfer.errors import InvalidModelError

    path = _gguf_files.write_tiny_gguf(tmp_path / "x.gguf", arch="llama")
    with pytest.raises(InvalidModelError, match=r"x\.gguf.*llama\.(embedding_length|block_count)"):
        torch_model(path)


def test_gguf_names_round_trip():
    from edgeinfer.models.base import gguf_name, module_path

    for name in ["blk.3.attn_q.weight", "blk.0.ffn_down.weight", "blk.12.post_ffw_norm.weight",
                 "blk.1.attn_k_norm.weight", "output_norm.weight", "token_embd.weight"]:
        mod = module_path(name)
        assert gguf_name(mod.rsplit(".", 1)[0]) + "." + name.rsplit(".", 1)[1] == name, (name, mod)
