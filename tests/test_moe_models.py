"""MoE architectures end to end (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3): routing identical to
transformers, greedy text identical between the two backends, MLA's latent cache, and configs stock
llama.cpp cannot run.

Logit parity of these architectures (F32 / Q8_0 / Q4_0, both backends vs transformers) is in the
architecture tables of tests/test_models.py and tests/test_convert_parity.py; here:

* the experts the torch engine chooses for every token of every layer equal the ones
  transformers' router chooses on the same input (F32 file: the router logits agree to ~1e-7, so
  any difference would be a routing bug, not rounding);
* on the F32 file, greedy decoding gives the same tokens in llama.cpp and in the torch engine;
* a Qwen2-MoE config llama.cpp hard-codes differently (dense layers, renormalised weights) is
  refused by default and converted with ``--torch-only`` into a file llama.cpp refuses cleanly and
  the torch engine runs to transformers' numbers (rel < 1e-4 at F32, as tests/test_models.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _fused_step
import _tiny_models

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
TOKENS = [int(t) for t in np.random.default_rng(5).integers(3, 300, size=20)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: _tiny_models.make_tiny_checkpoint(a, root / a) for a in MOE_ARCHS}


def _hf_routes(folder) -> tuple[list[torch.Tensor], np.ndarray]:
    """transformers' chosen experts per layer ([T, k] sorted) and its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    routes = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: routes.append(o[2].sort(-1).values))
             for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    for h in hooks:
        h.remove()
    return routes, logits


def _our_routes(model) -> tuple[list[torch.Tensor], np.ndarray]:
    from edgeinfer.models.moe import MoE

    routes = []
    for m in model.modules():
        if isinstance(m, MoE):
            real = m.weights
            m.weights = (lambda real: lambda x: (lambda r: routes.append(r[0].sort(-1).values) or r)(real(x)))(real)
    logits = model(torch.tensor([TOKENS]), 0)[0].double().numpy()
    return routes, logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_chosen_per_token_equal_transformers(ckpts, tmp_path, arch):
    from edgeinfer.engine.loader import load_model
    from edgeinfer.quant.convert import convert

    path = convert(ckpts[arch], tmp_path / f"{arch}.gguf", "F32")
    model, _ = load_model(path, torch.device("cpu"), 64)
    ref_routes, ref_logits = _hf_routes(ckpts[arch])
    routes, logits = _our_routes(model)
    same = [torch.equal(a, b) for a, b in zip(routes, ref_routes)]
    rel = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
    print(f"{arch}: {len(routes)} MoE layers x {len(TOKENS)} tokens, experts identical per layer {same}; "
          f"logits rel {rel:.1e}")
    assert len(routes) == len(ref_routes) > 0 and all(same) and rel < 1e-4


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_greedy_text_equal_in_both_backends(ckpts, tmp_path, arch):
    from edgeinfer.backend import LoadOptions, SamplingParams
    from edgeinfer.backends import load_backend
    from edgeinfer.quant.convert import convert

    path = convert(ckpts[arch], tmp_path / f"{arch}.gguf", "F32")
    params = SamplingParams(temperature=0, max_tokens=24)
    texts = {}
    for name in ("llama.cpp", "torch"):
        b = load_backend(name, path, LoadOptions(n_ctx=128, n_threads=1))
        try:
            done = list(b.generate("The quick brown fox", params))[-1]
            texts[name] = (done.text, done.timings.generated_tokens)
        finally:
            b.close()
    print(f"{arch}: {texts}")
    assert texts["llama.cpp"] == texts["torch"] and texts["torch"][1] > 0


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_fused_step_matches_the_forward(ckpts, tmp_path, arch, qtype):
    """The fused CPU decode step (kernels/cpu_step.py) on routed experts -- softmax top-k, renormalised
    or not, Qwen2-MoE's sigmoid-gated shared expert -- equals the model's forward at every position
    (F32: float32 summation order, ~1e-6; Q8_0: the same 8-bit activations summed in another order)."""
    from edgeinfer.engine.loader import load_model
    from edgeinfer.kernels import cpu_step, ggml_cpu
    from edgeinfer.quant.convert import convert

    if not ggml_cpu.available():
        pytest.skip("compiled kernels unavailable")
    model, _ = load_model(convert(ckpts[arch], tmp_path / f"{arch}-{qtype}.gguf", qtype), torch.device("cpu"), 64)
    step = cpu_step.build(model)
    assert step is not None
    _fused_step.step_vs_forward(model, step, TOKENS, 3, f"{arch} {qtype}")


def test_fused_step_declines_latent_attention(ckpts, tmp_path):
    from edgeinfer.engine.loader import load_model
    from edgeinfer.kernels import cpu_step
    from edgeinfer.quant.convert import convert

    model, _ = load_model(convert(ckpts["deepseek_v3"], tmp_path / "ds.gguf", "F32"), torch.device("cpu"), 64)
    assert cpu_step.build(model) is None  # MLA: the model's forward decodes


def test_config_llama_cpp_cannot_run_needs_torch_only(tmp_path, capsys):
    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends import load_backend
    from edgeinfer.cli import main as cli
    from edgeinfer.engine.loader import load_model
    from edgeinfer.errors import InvalidModelError
    from edgeinfer.gguf_check import validate_gguf

    folder = _tiny_models.make_tiny_checkpoint("qwen2_moe", tmp_path / "ck", num_hidden_layers=3, mlp_only_layers=[1],
                                               norm_topk_prob=True)
    out = tmp_path / "x.gguf"
    assert cli(["convert", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    assert "dense layers [1]" in err and "norm_topk_prob=True" in err and "--torch-only" in err and not out.exists()
    assert cli(["convert", str(folder), "-o", str(out), "--torch-only", "--qtype", "F32"]) == 0
    h = validate_gguf(out)
    assert h.architecture == "edgeinfer-qwen2moe" and "dense layers" in h.torch_only
    with pytest.raises(InvalidModelError, match="torch engine only.*--backend torch"):
        load_backend("llama.cpp", out, LoadOptions(n_ctx=64))
    _, ref = _hf_routes(folder)
    model, _ = load_model(out, torch.device("cpu"), 64)
    got = model(torch.tensor([TOKENS]), 0)[0].double().numpy()
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"torch-only qwen2_moe (dense layer 1, renormalised): torch engine vs transformers rel {rel:.1e}")
    assert rel < 1e-4
    b = load_backend("torch", out, LoadOptions(n_ctx=64))
    try:
        assert list(b.generate("hello world", __import__("edgeinfer.backend", fromlist=["x"]).SamplingParams(
            temperature=0, max_tokens=4)))[-1].timings.generated_tokens > 0
    finally:
        b.close()


def test_mla_caches_the_latent_only(ckpts, tmp_path):
    """DeepSeek's cache holds kv_lora_rank + qk_rope_head_dim values per token and layer; step
    decoding through it equals one full pass."""
    import json

    from edgeinfer.engine.loader import load_model
    from edgeinfer.quant.convert import convert

    cfg = json.loads((ckpts["deepseek_v3"] / "config.json").read_text())
    path = convert(ckpts["deepseek_v3"], tmp_path / "ds.gguf", "F32")
    model, _ = load_model(path, torch.device("cpu"), 64)
    per_token = model.cache_bytes_per_token()
    latent = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * cfg["num_hidden_layers"] * 4  # float32 on CPU
    plain = 2 * cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) * \
        cfg["num_hidden_layers"] * 4  # what caching full per-head K and V would cost (v padded to k's width)
    full = model(torch.tensor([TOKENS]), 0)[0]
    model.setup(64, "cpu")
    steps = torch.cat([model(torch.tensor([TOKENS[:5]]), 0)[0]] +
                      [model(torch.tensor([[t]]), i)[0] for i, t in enumerate(TOKENS[5:], start=5)])
    err = float((steps - full).abs().max() / full.abs().max())
    print(f"MLA cache: {per_token} bytes/token (latent {latent}; full K/V would be {plain}); "
          f"step decode vs full pass {err:.1e}")
    assert per_token == latent and err < 1e-5
    # inspect reads the latent size off the GGUF keys (llama.cpp's F16 cache: 2 bytes a value)
    from edgeinfer.gguf_check import validate_gguf
    from edgeinfer.inspect_gguf import kv_cache

    kv = kv_cache(validate_gguf(path))
    assert kv["latent"] and kv["bytes_per_token"] == latent // 2


def test_deepseek_rotate_half_layout_is_permuted(tmp_path):
    """rope_interleave=False (HF's rotate-half RoPE): the converter reorders the rope rows of q_b and
    kv_a into ggml's adjacent pairs, so both engines still match transformers."""
    from edgeinfer.engine.loader import load_model
    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("deepseek_v3", tmp_path / "ck", rope_interleave=False)
    _, ref = _hf_routes(folder)
    path = convert(folder, tmp_path / "ds.gguf", "F32")
    model, _ = load_model(path, torch.device("cpu"), 64)
    got = model(torch.tensor([TOKENS]), 0)[0].double().numpy()
    import test_convert_parity

    lc = test_convert_parity.llama_logits(path, TOKENS)
    r_t, r_l = (float(np.linalg.norm(x - ref) / np.linalg.norm(ref)) for x in (got, lc))
    print(f"rope_interleave=False: torch engine vs transformers rel {r_t:.1e}, llama.cpp vs transformers {r_l:.1e}")
    assert r_t < 1e-4 and r_l < 2e-3
