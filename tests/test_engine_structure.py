"""The engine's shared mechanisms, before any architecture uses them: MoE routing variants and
grouped experts (models/moe.py) against transformers' own router/expert modules, and the loader's
swap-by-module-type (edgeinfer/engine/loader.py) on a toy model with a MoE block, a shared
expert, a KV-shared layer and per-layer sizes.

Oracles: transformers' ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``DeepseekV3TopkRouter``,
``Qwen2MoeExperts`` and ``Qwen2MoeSparseMoeBlock`` on the same random weights (expert ids must be
identical; weights and outputs to float32 rounding, 1e-6 relative); the toy model in float32 on
CPU before quantization (the loaded F32 file: 1e-5; Q8_0: 8-bit weight rounding through three
random layers, measured 2.2e-2 with fp32 activations as with the packed kernels' bf16 ones: rel < 0.05,
the Q8_0 bound of tests/test_convert_parity.py's reasoning).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgeinfer.models.base import AttnConfig, Block, MLP, Attention, ModelArgs, RopeConfig, Transformer
from edgeinfer.models.moe import MoE, Routing, route

T = gguf.GGMLQuantizationType


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _hf_config(kind: str, **kw):
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64)
    if kind == "mixtral":
        return AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2, **base, **kw)
    if kind == "qwen2_moe":
        return AutoConfig.for_model("qwen2_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, **base, **kw)
    return AutoConfig.for_model("deepseek_v3", n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=32,
                                n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=8, **base, **kw)


CASES = {
    "mixtral": ({}, Routing(8, 2, norm_topk=True)),
    "qwen2_moe": ({"norm_topk_prob": False}, Routing(8, 3)),
    "qwen2_moe norm": ({"norm_topk_prob": True}, Routing(8, 3, norm_topk=True)),
    "deepseek_v3": ({}, Routing(8, 3, score="sigmoid", norm_topk=True, n_group=4, topk_group=2, scale=2.5,
                               norm_eps=1e-20)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_routing_matches_transformers(case):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    kw, routing = CASES[case]
    kind = case.split()[0]
    cfg = _hf_config(kind, **kw)
    router = {"mixtral": MixtralTopKRouter, "qwen2_moe": Qwen2MoeTopKRouter, "deepseek_v3": DeepseekV3TopkRouter}[kind](cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        bias = None
        if kind == "deepseek_v3":
            router.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.5)
            bias = router.e_score_correction_bias
    x = torch.randn(50, 64, generator=g)
    out = router(x)
    ref_w, ref_idx = (out[1], out[2]) if kind != "deepseek_v3" else (out[1], out[2])
    if kind == "deepseek_v3" and ref_idx.dtype.is_floating_point:  # (indices, weights) order in some versions
        ref_w, ref_idx = ref_idx, ref_w
    idx, w = route(torch.nn.functional.linear(x, router.weight), routing, bias)
    # compare as sets per token (ties aside, both use torch.topk on the same scores)
    same = torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    wa = w.gather(1, idx.argsort(-1))
    wb = ref_w.float().gather(1, ref_idx.argsort(-1))
    err = _rel(wa, wb)
    print(f"{case}: experts identical for all 50 tokens: {same}; weights rel err {err:.1e}")
    assert same and err < 1e-6


def test_experts_and_shared_gated_expert_match_qwen2_moe_block():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = _hf_config("qwen2_moe", norm_topk_prob=False)
    hf = Qwen2MoeSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for fused in (False, True):
        ours = MoE(64, 32, Routing(8, 3), "silu", fused=fused, shared_ffn=48, shared_gate=True)
        with torch.no_grad():
            ours.ffn_gate_inp.weight.copy_(hf.gate.weight)
            gu, down = hf.experts.gate_up_proj, hf.experts.down_proj  # [E, 2I, H], [E, H, I]
            if fused:
                ours.experts.ffn_gate_up_exps.weight.copy_(gu)
            else:
                ours.experts.ffn_gate_exps.weight.copy_(gu[:, :32])
                ours.experts.ffn_up_exps.weight.copy_(gu[:, 32:])
            ours.experts.ffn_down_exps.weight.copy_(down)
            ours.shared.ffn_gate_shexp.weight.copy_(hf.shared_expert.gate_proj.weight)
            ours.shared.ffn_up_shexp.weight.copy_(hf.shared_expert.up_proj.weight)
            ours.shared.ffn_down_shexp.weight.copy_(hf.shared_expert.down_proj.weight)
            ours.ffn_gate_inp_shexp.weight.copy_(hf.shared_expert_gate.weight)
        x = torch.randn(2, 9, 64, generator=g)
        with torch.no_grad():
            ref = hf(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            got = ours(x)
        err = _rel(got, ref)
        print(f"Qwen2-MoE block (fused gate_up={fused}): rel err {err:.1e}")
        assert err < 1e-6


def test_experts_touch_only_chosen_experts():
    ours = MoE(32, 16, Routing(16, 2), "silu")
    for p in ours.parameters():
        torch.nn.init.normal_(p)
    called = []
    real = ours.experts.one
    ours.experts.one = lambda e, x: called.append(e) or real(e, x)
    x = torch.randn(3, 32)
    idx, _ = ours.weights(x)
    ours(x)
    print(f"3 tokens x top-2 chose experts {sorted(set(idx.flatten().tolist()))}; computed {sorted(called)}")
    assert sorted(called) == sorted(set(idx.flatten().tolist())) and len(called) <= 6


# --------------------------------------------------------------------------- loader


class _Toy:
    """A test-only architecture: layer 0 dense (head_dim 16), layer 1 MoE + gated shared expert with
    its KV taken from layer 0, layer 2 another head dim and its own cache."""

    ARGS = ModelArgs(arch="toy", n_layer=3, dim=64, n_head=4, n_kv_head=(2, 2, 1), head_dim=(16, 16, 32),
                     ffn_dim=(96, 0, 64), vocab_size=80, qk_norm=True)

    @staticmethod
    def args_from_gguf(md, tensors, path=""):
        return _Toy.ARGS

    @staticmethod
    def build(a: ModelArgs) -> Transformer:
        layers = []
        for i in range(a.n_layer):
            hd = a.at("head_dim", i)
            c = AttnConfig(a.dim, a.n_head, a.at("n_kv_head", i), hd, RopeConfig(hd, style="neox"), qk_norm=True,
                           kv_from=0 if i == 1 else None)
            ffn = MoE(a.dim, 32, Routing(6, 2, norm_topk=True), shared_ffn=64, shared_gate=True) if i == 1 else \
                MLP(a.dim, a.at("ffn_dim", i))
            layers.append(Block(a.dim, a.norm_eps, Attention(c), ffn))
        return Transformer(a, layers)


def _float_toy():
    torch.manual_seed(0)
    m = _Toy.build(_Toy.ARGS)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.ndim > 1 else 0.05) + (1.0 if name.endswith("norm.weight") else 0))
    return m.eval()


def _write_gguf(model: Transformer, path, qtype: T, extra: dict | None = None):
    from edgeinfer.quant.quantizers import quantize

    w = gguf.GGUFWriter(str(path), "toy")
    for pname, p in model.state_dict().items():
        mod, _, attr = pname.rpartition(".")
        name = model.gguf_name(mod) + "." + attr
        x = p.detach().float().numpy()
        if x.ndim >= 2 and qtype != T.F32 and not name.startswith("blk.1.ffn_gate_inp"):
            q = quantize(x.reshape(-1, x.shape[-1]), qtype)
            w.add_tensor(name, q.reshape(*x.shape[:-1], q.shape[-1]), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype, tol", [(T.F32, 1e-5), (T.Q8_0, 0.05)])
def test_loader_swaps_by_module_type(tmp_path, monkeypatch, qtype, tol):
    import edgeinfer.engine.loader as loader
    from edgeinfer.kernels.qlinear import QuantEmbedding, QuantExpertLinear, QuantLinear

    monkeypatch.setattr(loader, "architecture", lambda name, path="": _Toy)
    ref_model = _float_toy()
    ref_model.setup(32, "cpu")
    ids = torch.tensor([[3, 17, 5, 60, 2, 9, 33, 41, 7, 11]])
    ref = ref_model(ids, 0)[0]
    path = _write_gguf(ref_model, tmp_path / "toy.gguf", qtype)
    model, report = loader.load_model(path, torch.device("cpu"), 32)
    types = {type(m).__name__ for m in model.modules()}
    got = model(ids, 0)[0]
    # step decode through the caches (layer 1 reads layer 0's): equals the full pass
    model.setup(32, "cpu")
    steps = torch.cat([model(ids[:, :4], 0)[0]] + [model(ids[:, i:i + 1], i)[0] for i in range(4, ids.shape[1])])
    err, step_err = _rel(got, ref), float((steps - got).abs().max() / got.abs().max())
    print(f"{qtype.name}: kernels {dict(report.paths)}; logits vs float model rel {err:.1e}; step decode vs "
          f"full pass {step_err:.1e}; KV bytes/token {model.cache_bytes_per_token()}")
    assert err < tol and step_err < 1e-5
    assert isinstance(model.token_embd, QuantEmbedding) and isinstance(model.layers[1].ffn.experts.ffn_up_exps,
                                                                       QuantExpertLinear)
    assert isinstance(model.layers[1].ffn.ffn_gate_inp_shexp, QuantLinear) and "ExpertLinear" not in types
    assert model.layers[1].attn.cache is model.layers[0].attn.cache and not hasattr(model.layers[1].attn, "attn_k")
    # layer 0: 2 kv heads x 16 x (k + v) x 4 bytes; layer 2: 1 x 32 x 2 x 4; layer 1 shares layer 0's
    assert model.cache_bytes_per_token() == (2 * 16 * 2 + 1 * 32 * 2) * 4


def test_loader_refuses_unknown_and_missing_tensors(tmp_path, monkeypatch):
    import edgeinfer.engine.loader as loader
    from edgeinfer.errors import InvalidModelError

    monkeypatch.setattr(loader, "architecture", lambda name, path="": _Toy)
    m = _float_toy()
    path = _write_gguf(m, tmp_path / "extra.gguf", T.F32, extra={"blk.0.mystery.weight": np.ones(4, np.float32)})
    with pytest.raises(InvalidModelError, match=r"blk\.0\.mystery\.weight are not used"):
        loader.load_model(path, torch.device("cpu"), 16)
    sd = m.state_dict()
    del sd["layers.2.attn.attn_k_norm.weight"]

    class Partial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gguf_name = m.gguf_name

        def state_dict(self):
            return sd

    path = _write_gguf(Partial(), tmp_path / "missing.gguf", T.F32)
    with pytest.raises(InvalidModelError, match=r"blk\.2\.attn_k_norm\.weight is missing"):
        loader.load_model(path, torch.device("cpu"), 16)
