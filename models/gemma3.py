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

from edgeinfer.models.base import MLP, Attention, Block, ModelArgs, Transformer
from edgeinfer.models.llama import common_args, hparam


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> ModelArgs:
    """Build :class:`ModelArgs` for gemma3 from GGUF metadata and tensor shapes."""
    a = common_args(md, tensors, path)
    arch = a.arch
    a.rope_style, a.qk_norm, a.act = "neox", True, "gelu_tanh"
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


def build(a: ModelArgs) -> Transformer:
    """The model (on whatever device is current, normally ``meta``): sandwich-norm blocks."""
    return Transformer(a, [Block(a.dim, a.norm_eps, Attention(a.attn_config(i)), MLP(a.dim, a.at("ffn_dim", i), a.act),
                                 sandwich=True) for i in range(a.n_layer)])
