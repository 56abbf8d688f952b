"""DeepSeek-V3 (GGUF ``deepseek2``): multi-head latent attention (MLA) and sigmoid group-routed MoE.

MLA (HF ``DeepseekV3Attention``; llama.cpp ``src/models/deepseek2.cpp``), per layer:

* ``q = q_b(norm(q_a(x)))`` (or ``attn_q(x)`` without a q LoRA), per head ``[nope | rope]``;
* ``kv_a(x) = [c | k_pe]``: the latent ``c = norm(...)`` (``kv_lora`` wide) and one shared rope key;
* keys/values are ``k_h = [W_kb_h^T c | k_pe]``, ``v_h = W_vb_h c`` -- never materialised here:
  the cache holds only ``[c | k_pe]`` per position (:class:`LatentCache`, ``kv_lora + rope`` values
  per token and layer, against ``2 * H * head_dim`` for plain attention), and attention runs in the
  absorbed form ``score = (W_kb_h q_nope_h) . c + q_pe_h . k_pe``, ``out_h = W_vb_h (softmax . c)``,
  which is the same sum in another order;
* the softmax scale is ``mscale^2 / sqrt(nope + rope)`` with YaRN's ``mscale = 0.1 * mscale_all_dim *
  ln(factor) + 1``; RoPE is ggml's NORM (adjacent pairs) on the rope part only.

MoE: the first ``leading_dense_block_count`` layers are dense; the others route with sigmoid scores,
the selection bias ``exp_probs_b``, ``n_group`` / ``topk_group`` group limits, renormalised weights
times ``expert_weights_scale``, plus the shared experts (:mod:`edgeinfer.models.moe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import torch
from torch import nn

from edgeinfer.errors import InvalidModelError
from edgeinfer.models.base import MLP, Block, ModelArgs, RMSNorm, RopeConfig, Step, Transformer, Yarn, yarn_mscale
from edgeinfer.models.llama import common_args, hparam
from edgeinfer.models.moe import MoE, Routing

#: ggml's expert gating functions (``gguf.ExpertGatingFuncType``): 1 softmax, 2 sigmoid.
GATING = {1: "softmax", 2: "sigmoid"}


@dataclass
class DeepseekArgs(ModelArgs):
    q_lora: int = 0
    kv_lora: int = 512
    nope: int = 128
    rope: int = 64
    v_dim: int = 128
    kq_scale: float = 0.0
    n_dense: int = 0
    routing: Routing | None = None
    ffn_exp: int = 0
    shared_ffn: int = 0


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> DeepseekArgs:
    a = common_args(md, tensors, path)
    arch = a.arch
    g = lambda k, d=None, req=False: hparam(md, arch, k, d, path=path, required=req)  # noqa: E731
    kv_lora = int(g("attention.kv_lora_rank", req=True))
    rope = int(g("rope.dimension_count", req=True))
    k_mla, v_mla = int(g("attention.key_length_mla", req=True)), int(g("attention.value_length_mla", req=True))
    gating = int(g("expert_gating_func", 1))
    if gating not in GATING:
        raise InvalidModelError(f"{path}: {arch}.expert_gating_func = {gating} is not supported by the torch engine")
    n_expert = int(g("expert_count", req=True))
    ffn_exp = int(g("expert_feed_forward_length", req=True))
    routing = Routing(n_expert, int(g("expert_used_count", req=True)), score=GATING[gating],
                      norm_topk=bool(g("expert_weights_norm", False)), n_group=int(g("expert_group_count", 1) or 1),
                      topk_group=int(g("expert_group_used_count", 1) or 1), scale=float(g("expert_weights_scale", 1.0)),
                      norm_eps=1e-20)
    log_mul = float(md.get(gguf.Keys.Rope.SCALING_YARN_LOG_MUL.format(arch=arch), 0.0) or 0.0) / 0.1  # the converter stores 0.1 x
    mscale = yarn_mscale(a.rope_yarn.factor, log_mul) if a.rope_yarn is not None and log_mul else 1.0
    a.rope_dim = rope
    return DeepseekArgs(**vars(a), q_lora=int(g("attention.q_lora_rank", 0) or 0), kv_lora=kv_lora,
                        nope=k_mla - rope, rope=rope, v_dim=v_mla, kq_scale=mscale * mscale / math.sqrt(k_mla),
                        n_dense=int(g("leading_dense_block_count", 0)), routing=routing, ffn_exp=ffn_exp,
                        shared_ffn=ffn_exp * int(g("expert_shared_count", 0)))


class HeadLinear(nn.Module):
    """One matrix per head, ``weight`` [H, out, in] (``attn_k_b`` / ``attn_v_b``), kept as floats:
    ``x`` [.., H, in] -> [.., H, out]."""

    def __init__(self, n_head: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_head, out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hoi->...ho", x.float(), self.weight.float())


class LatentCache:
    """MLA's cache: per position the normed latent ``c`` (``kv_lora``) and the roped shared key
    ``k_pe`` (``rope``), [L, kv_lora + rope]."""

    def __init__(self, kv_lora: int, rope: int, n_ctx: int, device, dtype):
        self.kv_lora, self.size = kv_lora, n_ctx
        self.ring = False
        self.buf = torch.zeros(n_ctx, kv_lora + rope, device=device, dtype=dtype)

    def bytes_per_token(self) -> int:
        return self.buf.shape[1] * self.buf.element_size()

    def update(self, c: torch.Tensor, k_pe: torch.Tensor, pos0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c [S, kv_lora], k_pe [S, rope] at pos0..; -> (latents [L, kv_lora], k_pe [L, rope]) up to now."""
        end = pos0 + c.shape[0]
        if end > self.size:
            raise IndexError(f"latent cache holds {self.size} positions, asked for {end}")
        self.buf[pos0:end] = torch.cat([c, k_pe], dim=-1).to(self.buf.dtype)
        return self.buf[:end, :self.kv_lora], self.buf[:end, self.kv_lora:]


class MLAttention(nn.Module):
    """Multi-head latent attention, absorbed (see the module docstring). Batch size 1."""

    def __init__(self, a: DeepseekArgs):
        super().__init__()
        self.a = a
        h, qk = a.n_head, a.nope + a.rope
        if a.q_lora:
            self.attn_q_a = nn.Linear(a.dim, a.q_lora, bias=False)
            self.attn_q_a_norm = RMSNorm(a.q_lora, 1e-6)  # HF: DeepseekV3RMSNorm's default eps
            self.attn_q_b = nn.Linear(a.q_lora, h * qk, bias=False)
        else:
            self.attn_q = nn.Linear(a.dim, h * qk, bias=False)
        self.attn_kv_a_mqa = nn.Linear(a.dim, a.kv_lora + a.rope, bias=False)
        self.attn_kv_a_norm = RMSNorm(a.kv_lora, 1e-6)
        self.attn_k_b = HeadLinear(h, a.nope, a.kv_lora)  # q_nope -> latent space
        self.attn_v_b = HeadLinear(h, a.kv_lora, a.v_dim)  # latent -> value
        self.attn_output = nn.Linear(h * a.v_dim, a.dim, bias=False)
        self.rope = None
        self.cache: LatentCache | None = None

    def setup_cache(self, n_ctx: int, device, dtype, model: Transformer) -> None:
        a = self.a
        self.rope = model.rope(RopeConfig(a.rope, a.rope_base, a.rope_freq_scale, "norm", yarn=a.rope_yarn),
                               n_ctx, device)
        self.cache = LatentCache(a.kv_lora, a.rope, n_ctx, device, dtype)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x: [1, S, dim] -> [1, S, dim]."""
        a, s, pos0 = self.a, x.shape[1], step.pos0
        q = self.attn_q_b(self.attn_q_a_norm(self.attn_q_a(x))) if a.q_lora else self.attn_q(x)
        q = q.view(1, s, a.n_head, a.nope + a.rope)
        q_nope, q_pe = q[..., :a.nope], self.rope(q[..., a.nope:], pos0)  # [1, S, H, nope / rope]
        kv = self.attn_kv_a_mqa(x)[0]  # [S, kv_lora + rope]
        c = self.attn_kv_a_norm(kv[:, :a.kv_lora])
        k_pe = self.rope(kv[None, :, None, a.kv_lora:], pos0)[0, :, 0]  # [S, rope]
        lat, kpe = self.cache.update(c, k_pe, pos0)  # [L, kv_lora], [L, rope]
        q_abs = self.attn_k_b(q_nope[0])  # [S, H, kv_lora]
        scores = (torch.einsum("shc,lc->hsl", q_abs, lat.float()) +
                  torch.einsum("shr,lr->hsl", q_pe[0].float(), kpe.float())) * a.kq_scale  # [H, S, L]
        end = pos0 + s
        if s > 1:
            mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(pos0, end, device=x.device)[:, None]
            scores = scores.masked_fill(~mask, float("-inf"))
        o_lat = torch.einsum("hsl,lc->shc", torch.softmax(scores, dim=-1), lat.float())  # [S, H, kv_lora]
        o = self.attn_v_b(o_lat)  # [S, H, v]
        return self.attn_output(o.reshape(1, s, a.n_head * a.v_dim))


def build(a: DeepseekArgs) -> Transformer:
    def ffn(i: int):
        if i < a.n_dense:
            return MLP(a.dim, a.at("ffn_dim", i), "silu")
        return MoE(a.dim, a.ffn_exp, a.routing, "silu", shared_ffn=a.shared_ffn, selection_bias=True)

    return Transformer(a, [Block(a.dim, a.norm_eps, MLAttention(a), ffn(i)) for i in range(a.n_layer)])
