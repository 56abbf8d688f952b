"""The architecture table: Hugging Face checkpoint -> the spec that converts it.

One supported architecture = one file here with an :class:`~edgeinfer.quant.spec.ArchSpec`
subclass, plus one row in :data:`ARCHS` (and one row in the tiny-config test tables). What a
spec decides and when is described in :mod:`edgeinfer.quant.spec`.
"""

from __future__ import annotations

from edgeinfer.errors import ConversionError
from edgeinfer.quant.archs.deepseek import DeepseekV3Spec
from edgeinfer.quant.archs.gemma3 import Gemma3Spec
from edgeinfer.quant.archs.gemma3n import Gemma3nSpec
from edgeinfer.quant.archs.gemma4 import Gemma4Spec
from edgeinfer.quant.archs.llama import LlamaSpec, MistralSpec, MixtralSpec
from edgeinfer.quant.archs.qwen import Qwen2MoeSpec, Qwen2Spec, Qwen3MoeSpec, Qwen3Spec
from edgeinfer.quant.spec import ArchContext, ArchSpec

ARCHS: tuple[ArchSpec, ...] = (
    LlamaSpec(),
    MistralSpec(),
    MixtralSpec(),
    Qwen2Spec(),
    Qwen3Spec(),
    Qwen2MoeSpec(),
    Qwen3MoeSpec(),
    Gemma3Spec(),
    Gemma3nSpec(),
    DeepseekV3Spec(),
    Gemma4Spec(),
)

__all__ = ["ARCHS", "ArchContext", "ArchSpec", "find_arch", "text_config"]


def text_config(config: dict) -> dict:
    """The text model's hyper-parameters (multimodal configs nest them under ``text_config``)."""
    if isinstance(config.get("text_config"), dict):
        return {**config, **config["text_config"]}
    return dict(config)


def find_arch(config: dict, source: str = "config.json") -> ArchSpec:
    """Pick the table row for a checkpoint config.

    Raises:
        ConversionError: unknown architecture (the message lists the supported ones).
    """
    archs = config.get("architectures") or []
    for spec in ARCHS:
        if any(a in spec.hf_architectures for a in archs):
            return spec
    mt = text_config(config).get("model_type")
    for spec in ARCHS:
        if mt in spec.model_types and not archs:
            return spec
    supported = ", ".join(f"{s.name} ({'/'.join(s.hf_architectures)})" for s in ARCHS)
    raise ConversionError(f"{source}: architecture {archs or mt!r} is not supported; supported: {supported}")
