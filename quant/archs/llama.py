"""Llama, Mistral and Mixtral (``LlamaForCausalLM``, ``MistralForCausalLM``, ``MixtralForCausalLM``) -> GGUF ``llama``.

* q/k rows are permuted from HF's rotate-half RoPE layout to ggml's interleaved pairs
  (llama.cpp's ``LlamaModel.permute``), so the file uses ``LLAMA_ROPE_TYPE_NORM``;
* Llama 3 ``rope_scaling`` (``rope_type: llama3``) becomes a ``rope_freqs`` tensor of
  per-frequency divisors, as HF's llama3 RoPE init computes them;
* Mixtral: the per-expert ``block_sparse_moe.experts.N.w1/w3/w2`` become ``ffn_gate/up/down_exps``
  stacked one expert after another (the default spec mapping), the router ``ffn_gate_inp``.
  llama.cpp's ``llama`` graph routes softmax -> top-k -> renormalise, as ``MixtralTopKRouter``.
* a ``sliding_window`` shorter than the context is ignored by llama.cpp's ``llama`` graph (as by
  its own converter): the converter says so, since outputs past the window then differ from HF's.
"""

from __future__ import annotations

import logging
import math

import gguf
import numpy as np
import torch

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import Generated, Permute, RowSource
from edgeinfer.quant.spec import (ArchContext, ArchSpec, Out, common_hparams, moe_hparams, moe_shapes, rope_params,
                                  tensor_name)

M = gguf.MODEL_TENSOR
log = logging.getLogger(__name__)


def rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order HF rotate-half -> ggml interleaved pairs, per head: output row ``i`` reads row ``perm[i]``.

    Per head of ``d`` rows, output rows ``(2j, 2j+1)`` are input rows ``(j, j + d/2)``.
    """
    d = n_rows // n_head
    idx = np.arange(n_rows).reshape(n_head, 2, d // 2)  # [head, half, j]
    return idx.swapaxes(1, 2).reshape(-1)  # [head, j, half] flattened


def permute_qk(kind, src: RowSource, c: ArchContext) -> RowSource:
    """Apply :func:`rope_permutation` to q/k weights and biases (other tensors pass through)."""
    heads = {M.ATTN_Q: c.n_head, M.ATTN_K: c.n_head_kv}.get(kind)
    if heads is None:
        return src
    n = src.shape[0]
    return Permute(src, rope_permutation(n, heads))


def llama3_rope_freqs(c: ArchContext) -> list[Out]:
    """Llama 3 ``rope_scaling`` -> per-frequency divisors (``rope_freqs``), as HF's llama3 RoPE init."""
    full, _ = rope_params(c.cfg)
    if (full.get("rope_type") or "").lower() != "llama3":
        return []
    base = float(full.get("rope_theta", 10000.0))
    dim = c.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
    factor = float(full.get("factor", 8.0))
    lo, hi = float(full.get("low_freq_factor", 1.0)), float(full.get("high_freq_factor", 4.0))
    old_ctx = float(full.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs.double()
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / hi, torch.ones_like(wavelen),
                      torch.where(wavelen > old_ctx / lo, torch.full_like(wavelen, factor), mid))
    return [Out(tensor_name(M.ROPE_FREQS), Generated(out.to(torch.float32), "llama3 rope_freqs"))]


class LlamaSpec(ArchSpec):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        common_hparams(w, c)
        w.add_vocab_size(c.n_vocab)
        w.add_rope_dimension_count(c.head_dim)

    def rows(self, kind, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        return permute_qk(kind, src, c)

    def generated(self, c: ArchContext) -> list[Out]:
        return llama3_rope_freqs(c)


class MistralSpec(LlamaSpec):
    name = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)

    def check(self, c: ArchContext) -> None:
        sw, n_ctx = c.get("sliding_window"), c.get("max_position_embeddings")
        if sw and n_ctx and int(sw) < int(n_ctx):
            log.warning("config.json: sliding_window=%s is not applied by llama.cpp's llama graph: past %s tokens "
                        "of context its outputs (and edgeinfer's) differ from transformers'", sw, sw)

    def generated(self, c: ArchContext) -> list[Out]:
        return []


class MixtralSpec(MistralSpec):
    name = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)

    def check(self, c: ArchContext) -> None:
        super().check(c)
        if c.n_experts < 2:
            raise ConversionError(f"config.json: mixtral needs num_local_experts >= 2 (has {c.n_experts})")

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        super().hparams(w, c)
        moe_hparams(w, c)

    def shapes(self, c: ArchContext, bid):
        return {**super().shapes(c, bid), **moe_shapes(c, int(c.cfg["intermediate_size"]))}
