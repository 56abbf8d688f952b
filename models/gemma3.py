"""Gemma 3 text decoder: sliding-window + global layers, sandwich norms, GeGLU, q/k norms.

From the GGUF (llama.cpp ``src/models/gemma3.cpp``, HF ``Gemma3ForCausalLM``):

* embeddings are multiplied by ``sqrt(dim)``; RoPE is NEOX style;
* layers are sliding-window unless ``il % pattern == pattern - 1`` (pattern from
  ``gemma3.attention.sliding_window_pattern``, default 6, or a per-layer bool array); window
  layers use ``rope.freq_base_swa`` (default 10000, unscaled), global layers ``rope.freq_base``
  with linear ``rope.scaling.factor``; a query at p sees keys p' with ``p - p' < window``;
* q is scaled by 1/sqrt(head_dim) (llama.cpp uses 1/sqrt(dim/n_head) for the 62-layer 27B);
* norms already hold ``1 + w`` (the converter adds 1), so plain RMSNorm applies;
* optional final logit soft-capping ``c * tanh(logits / c)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeinfer.models.base import MLP, Attention, ModelArgs, RMSNorm
from edgeinfer.models.llama import common_args, hparam


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> ModelArgs:
    """Build :class:`ModelArgs` for gemma3 from GGUF metadata and tensor shapes."""
    a = common_args(md, tensors, path)
    arch = a.arch
    a.rope_style, a.qk_norm, a.post_norms, a.act = "neox", True, True, "gelu_tanh"
    a.norm_eps = float(hparam(md, arch, "attention.layer_norm_rms_epsilon", 1e-6))
    a.embed_scale = math.sqrt(a.dim)
    a.final_softcap = float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0)
    a.attn_scale = float(md.get(f"{arch}.attention.scale", 0.0) or 0.0) or (
        1.0 / math.sqrt(a.dim / a.n_head) if a.n_layer == 62 else 1.0 / math.sqrt(a.head_dim))
    a.sliding_window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
    if a.sliding_window:
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            a.swa_layers = tuple(bool(x) for x in pattern)
        else:
            n = int(pattern)
            a.swa_layers = tuple(n == 0 or (i % n < n - 1) for i in range(a.n_layer))
        a.rope_base_swa = float(md.get(f"{arch}.rope.freq_base_swa", 10000.0))
    return a


class Block(nn.Module):
    """Sandwich-norm block: ``h += post(attn(pre(h))); h += post(ffn(pre(h)))``."""

    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.attn = Attention(a, i)
        self.post_attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn = MLP(a)
        self.post_ffw_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, h: torch.Tensor, pos0: int) -> torch.Tensor:
        """h: [1, S, dim] -> [1, S, dim]."""
        h = h + self.post_attention_norm(self.attn(self.attn_norm(h), pos0))
        return h + self.post_ffw_norm(self.ffn(self.ffn_norm(h)))
