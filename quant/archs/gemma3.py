"""Gemma 3 text model (``Gemma3ForCausalLM``, and the text part of ``Gemma3ForConditionalGeneration``).

* RMSNorm weights are stored as ``1 + w`` (``Gemma3RMSNorm`` computes ``x * (1 + w)``; llama.cpp
  multiplies by the stored weight);
* embeddings are trimmed to the tokenizer's size;
* the sliding/global layer pattern is written per layer;
* a ``query_pre_attn_scalar`` that differs from what llama.cpp assumes is folded into ``attn_q_norm``.
"""

from __future__ import annotations

import math

import gguf

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import Map, RowSource
from edgeinfer.quant.spec import ArchContext, ArchSpec, common_hparams, rope_params

M = gguf.MODEL_TENSOR


def plus_one(x):
    """``1 + w`` (Gemma's RMSNorm offset)."""
    return x + 1.0


def layer_types(c: ArchContext) -> list[str]:
    """``layer_types`` from the config, or the sliding-window pattern (every ``pattern``-th layer global)."""
    types = c.cfg.get("layer_types")
    if types is None:
        pattern = int(c.get("sliding_window_pattern", "_sliding_window_pattern", default=6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c.n_layers)]
    return list(types)


def query_scale(c: ArchContext) -> float:
    """The factor folded into ``attn_q_norm``: llama.cpp scales queries by 1/sqrt(head_dim)
    (1/sqrt(n_embd/n_head) for the 62-layer 27B), HF by 1/sqrt(query_pre_attn_scalar); q_norm
    multiplies q right before, so scaling its weight (already ``1 + w``) by the ratio is exact."""
    qpas = c.get("query_pre_attn_scalar")
    if qpas is None:
        return 1.0
    assumed = (c.hidden // c.n_head) if c.n_layers == 62 else c.head_dim
    return math.sqrt(assumed / float(qpas))


class Gemma3Spec(ArchSpec):
    name = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    model_types = ("gemma3_text", "gemma3")
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    name_prefixes = ("model.language_model.", "language_model.model.", "language_model.")
    spm_add_space_prefix = False
    trims_vocab = True

    def check(self, c: ArchContext) -> None:
        if c.get("attn_logit_softcapping") is not None:
            raise ConversionError("config.json: gemma3 with attn_logit_softcapping is not supported by llama.cpp")

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        common_hparams(w, c)
        if (cap := c.get("final_logit_softcapping")) is not None:
            w.add_final_logit_softcapping(float(cap))
        _, sliding = rope_params(c.cfg)
        if sliding is not None and sliding.get("rope_theta") is not None:
            w.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        types = layer_types(c)
        if c.get("sliding_window") and any(t == "sliding_attention" for t in types):
            w.add_sliding_window(int(c.cfg["sliding_window"]))
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])

    def rows(self, kind, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        if hf_name.endswith("norm.weight"):
            src = Map(src, plus_one, "1 + w")
        if kind == M.ATTN_Q_NORM and (r := query_scale(c)) != 1.0:
            src = Map(src, lambda x: x * r, f"x {r:.6g}")
        return src
