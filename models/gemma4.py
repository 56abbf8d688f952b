"""Gemma 4 text decoder: 31B (dense), 26B-A4B (MoE beside a dense MLP), E2B/E4B (per-layer
embeddings, KV sharing, double-wide MLP) -- one model, every difference read from the file.

From the GGUF (llama.cpp ``src/models/gemma4.cpp``; HF ``Gemma4TextModel`` / ``Gemma4TextDecoderLayer``):

* per layer (``attention.sliding_window_pattern``): sliding layers use ``key_length_swa`` heads,
  ``rope.freq_base_swa`` and the window; full layers ``key_length`` heads, ``rope.freq_base`` and
  the ``rope_freqs`` divisors (proportional RoPE: only the first pairs rotate); KV heads per layer
  (``attention.head_count_kv`` may be an array). RoPE is NEOX; the attention scale is 1;
* q and k have per-head RMSNorm, v an RMSNorm without weight; a full layer without ``attn_v``
  uses its raw key projection as values (``attention_k_eq_v``);
* the last ``attention.shared_kv_layers`` layers have no K/V of their own: each reads the cache of
  the last earlier layer of its own type (transformers' rule; llama.cpp's hard-coded one is the
  same for every file stock llama.cpp accepts);
* block: ``h += post_attention_norm(attn(attn_norm(h)))``, then the dense MLP (width per layer:
  ``feed_forward_length`` may be an array) and, on MoE layers, in parallel a routed FFN on the same
  residual: ``m = post_ffw_norm_1(mlp(ffn_norm(h))) + post_ffw_norm_2(moe(pre_ffw_norm_2(h)))``,
  ``h += post_ffw_norm(m)``; then the per-layer embedding ``h += post_norm(proj(gelu(inp_gate(h)) *
  ple_i))``; then ``h *= layer_output_scale``;
* router (:class:`Gemma4MoE`): logits of ``rms_norm(h) * ffn_gate_inp.scale / sqrt(dim)``, softmax
  over all experts, top-k renormalised, times ``ffn_down_exps.scale`` of the chosen experts;
* per-layer embeddings (:meth:`Gemma4.layer_inputs`): ``(norm(per_layer_model_proj(e) / sqrt(dim))
  + per_layer_token_embd[id] * sqrt(P)) / sqrt(2)`` for the scaled token embedding ``e``; the table
  stays in the memory-mapped file and only the rows of the current tokens are dequantized;
* embeddings times sqrt(dim); final logit soft-capping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeinfer.errors import InvalidModelError
from edgeinfer.models.base import MLP, Attention, AttnConfig, Block, ModelArgs, RMSNorm, RopeConfig, Scale, Step, \
    Transformer
from edgeinfer.models.cache import kv_sources
from edgeinfer.models.moe import MoE, Routing, route
from edgeinfer.models.ple import PerLayerGate, PerLayerInputs


@dataclass
class Gemma4Args(ModelArgs):
    """:class:`ModelArgs` plus what Gemma 4 sets per layer."""

    attn: tuple = ()  # AttnConfig per layer
    ple_dim: int = 0  # per-layer embedding width P (0: none)
    routing: Routing | None = None  # MoE layers (all of them when set)
    ffn_exp: int = 0
    out_scale: bool = True  # blk.N.layer_output_scale present


def _key(md: dict, arch: str, key: str, path: str, default=None):
    v = md.get(f"{arch}.{key}", default)
    if v is None:
        raise InvalidModelError(f"{path}: GGUF metadata lacks {arch}.{key}; re-convert the model")
    return v


def _per_layer(v, n: int, what: str, path: str) -> tuple:
    if isinstance(v, list):
        if len(v) != n:
            raise InvalidModelError(f"{path}: {what} has {len(v)} entries for {n} layers")
        return tuple(int(x) for x in v)
    return (int(v),) * n


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> Gemma4Args:
    """Build :class:`Gemma4Args` from GGUF metadata and tensor shapes (``tensors``: name -> ggml shape)."""
    arch = md["general.architecture"]
    n = int(_key(md, arch, "block_count", path))
    dim = int(_key(md, arch, "embedding_length", path))
    n_head = int(_key(md, arch, "attention.head_count", path))
    swa = tuple(bool(x) for x in _key(md, arch, "attention.sliding_window_pattern", path, [False] * n))
    if len(swa) != n:
        raise InvalidModelError(f"{path}: {arch}.attention.sliding_window_pattern has {len(swa)} entries for {n} layers")
    hd_full = int(_key(md, arch, "attention.key_length", path))
    hd_swa = int(_key(md, arch, "attention.key_length_swa", path, hd_full))
    kv = _per_layer(_key(md, arch, "attention.head_count_kv", path, n_head), n, "head_count_kv", path)
    ffn = _per_layer(_key(md, arch, "feed_forward_length", path), n, "feed_forward_length", path)
    eps = float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
    rope_swa = RopeConfig(int(md.get(f"{arch}.rope.dimension_count_swa", hd_swa)),
                          float(md.get(f"{arch}.rope.freq_base_swa", 10000.0)), style="neox")
    rope_full = RopeConfig(int(md.get(f"{arch}.rope.dimension_count", hd_full)),
                           float(md.get(f"{arch}.rope.freq_base", 1e6)), style="neox", factors="rope_freqs")
    sources = kv_sources(swa, int(md.get(f"{arch}.attention.shared_kv_layers", 0) or 0), path)
    attn = []
    for i in range(n):
        own = sources[i] is None
        attn.append(AttnConfig(dim, n_head, kv[i], hd_swa if swa[i] else hd_full,
                               rope_swa if swa[i] else rope_full, norm_eps=eps, qk_norm=True, v_norm=True,
                               k_eq_v=own and f"blk.{i}.attn_v.weight" not in tensors,
                               window=window if swa[i] else 0, scale=1.0, kv_from=sources[i]))
    if "token_embd.weight" not in tensors:
        raise InvalidModelError(f"{path}: tensor token_embd.weight is missing; re-convert the model")
    routing, ffn_exp = None, 0
    if (n_expert := int(md.get(f"{arch}.expert_count", 0) or 0)):
        routing = Routing(n_expert, int(_key(md, arch, "expert_used_count", path)), norm_topk=True)
        ffn_exp = int(_key(md, arch, "expert_feed_forward_length", path))
    return Gemma4Args(
        arch=arch, n_layer=n, dim=dim, n_head=n_head, n_kv_head=kv, head_dim=tuple(c.head_dim for c in attn),
        ffn_dim=ffn, vocab_size=int(tensors["token_embd.weight"][1]), norm_eps=eps, sliding_window=window,
        swa_layers=swa, qk_norm=True, act="gelu_tanh", embed_scale=math.sqrt(dim),
        final_softcap=float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0),
        ctx_train=int(md.get(f"{arch}.context_length", 4096)), attn=tuple(attn),
        ple_dim=int(md.get(f"{arch}.embedding_length_per_layer_input", 0) or 0), routing=routing, ffn_exp=ffn_exp,
        out_scale="blk.0.layer_output_scale.weight" in tensors)


class Gemma4MoE(MoE):
    """Gemma 4's routed FFN: the router normalises its input (no weight), scales it by
    ``ffn_gate_inp.scale / sqrt(dim)``, and each chosen expert's weight is multiplied by its
    ``ffn_down_exps.scale`` (HF ``Gemma4TextRouter``)."""

    def __init__(self, dim: int, ffn_dim: int, routing: Routing, eps: float):
        super().__init__(dim, ffn_dim, routing, "gelu_tanh", fused=True)
        self.dim, self.eps = dim, eps
        self.ffn_gate_inp.scale = nn.Parameter(torch.ones(dim), requires_grad=False)  # blk.N.ffn_gate_inp.scale
        self.experts.ffn_down_exps.scale = nn.Parameter(torch.ones(routing.n_expert), requires_grad=False)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x.float(), (self.dim,), None, self.eps) * (self.ffn_gate_inp.scale / math.sqrt(self.dim))
        return self.ffn_gate_inp(x)  # [T, E]

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, w = route(self.router_logits(x), self.routing)
        return idx, w * self.experts.ffn_down_exps.scale[idx]

    def routed(self, x_route: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Route on ``x_route`` (the residual), run the chosen experts on ``x_in``: [T, dim] -> [T, dim]."""
        idx, w = self.weights(x_route)
        return self.experts(x_in, idx, w)


class Gemma4Block(Block):
    """One Gemma 4 layer (see the module docstring for the order of operations)."""

    def __init__(self, a: Gemma4Args, i: int):
        super().__init__(a.dim, a.norm_eps, Attention(a.attn[i]), MLP(a.dim, a.at("ffn_dim", i), a.act), sandwich=True)
        self.i, self.dim = i, a.dim
        if a.routing is not None:
            self.moe = Gemma4MoE(a.dim, a.ffn_exp, a.routing, a.norm_eps)
            self.pre_ffw_norm_2 = RMSNorm(a.dim, a.norm_eps)
            self.post_ffw_norm_1 = RMSNorm(a.dim, a.norm_eps)
            self.post_ffw_norm_2 = RMSNorm(a.dim, a.norm_eps)
        if a.ple_dim:
            self.ple = PerLayerGate(a.dim, a.ple_dim, a.norm_eps, a.act)
        if a.out_scale:
            self.layer_output_scale = Scale(1)

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """h: [1, S, dim] -> [1, S, dim]."""
        h = h + self.post_attention_norm(self.attn(self.attn_norm(h), step))
        m = self.ffn(self.ffn_norm(h))
        if hasattr(self, "moe"):
            r = h.reshape(-1, self.dim).float()  # [T, dim]: the router and the experts read the residual
            e = self.moe.routed(r, self.pre_ffw_norm_2(r)).reshape(h.shape)
            m = self.post_ffw_norm_1(m) + self.post_ffw_norm_2(e)
        h = h + self.post_ffw_norm(m)
        if step.layer_inputs is not None:
            h = h + self.ple(h, step.layer_inputs[:, :, self.i])
        if hasattr(self, "layer_output_scale"):
            h = self.layer_output_scale(h)
        return h


class Gemma4(Transformer):
    """The decoder plus, with per-layer embeddings, the PLE table (kept in the memory map) and its
    context projection (:class:`~edgeinfer.models.ple.PerLayerInputs`)."""

    def __init__(self, a: Gemma4Args):
        super().__init__(a, [Gemma4Block(a, i) for i in range(a.n_layer)])
        self.ple = PerLayerInputs(a.vocab_size, a.n_layer, a.dim, a.ple_dim, a.norm_eps) if a.ple_dim else None

    def layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """ids [1, S], h [1, S, dim] (the scaled embedding) -> per-layer inputs [1, S, n_layer, P], or None."""
        return self.ple(ids, h) if self.ple is not None else None


def build(a: Gemma4Args) -> Transformer:
    """The model (on whatever device is current, normally ``meta``)."""
    return Gemma4(a)
