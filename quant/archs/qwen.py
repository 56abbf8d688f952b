"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) -> GGUF ``qwen2`` / ``qwen3``.

Names only: llama.cpp keeps HF's rotate-half layout for them (NeoX RoPE), so no fix-ups.
"""

from __future__ import annotations

import gguf

from edgeinfer.quant.spec import ArchSpec


class Qwen2Spec(ArchSpec):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3Spec(ArchSpec):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
