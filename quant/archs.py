"""The architecture table: Hugging Face architecture -> GGUF architecture, hyper-parameters, fix-ups.

One supported architecture = one :class:`ArchSpec` row in :data:`ARCHS`. Tensor names are mapped
by ``gguf``'s :class:`TensorNameMap` and metadata keys are written with ``GGUFWriter.add_*`` (which
use ``gguf.Keys``), so no GGUF spelling is re-typed here. What differs between architectures is
data (which HF names select the row, which GGUF arch it becomes) plus small per-tensor fix-ups:

* llama / mistral: q/k rows are permuted from HF's rotate-half RoPE layout to ggml's interleaved
  one (llama.cpp's ``LlamaModel.permute``); Llama 3 ``rope_scaling`` becomes a ``rope_freqs`` tensor.
* qwen2 (q/k/v biases) and qwen3 (q/k RMSNorm): names only; llama.cpp uses NeoX RoPE for them.
* gemma3: RMSNorm weights are stored as ``1 + w`` (``Gemma3RMSNorm``); embeddings are trimmed to
  the tokenizer's size; the sliding/global layer pattern is written per layer; a
  ``query_pre_attn_scalar`` that differs from what llama.cpp assumes is folded into ``attn_q_norm``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import gguf
import torch

from edgeinfer.errors import ConversionError

log = logging.getLogger(__name__)

# HF tensors that carry no weights llama.cpp needs.
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
# Prefixes of multimodal towers when a text model is embedded in a *ForConditionalGeneration.
MULTIMODAL_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.", "audio_tower.", "model.audio_tower.")


@dataclass
class ArchContext:
    """What fix-ups and hparam writers may look at: the (flattened) config and the vocab size."""

    cfg: dict
    n_vocab: int  # number of tokens in the GGUF vocabulary

    def get(self, *keys, default=None):
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    @property
    def n_head(self) -> int:
        return int(self.cfg["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.cfg["hidden_size"] // self.n_head))


# A fix-up: (hf_name, gguf_name, tensor f32, ctx) -> tensor f32 (same or new shape).
Fixup = Callable[[str, str, torch.Tensor, ArchContext], torch.Tensor]
HparamWriter = Callable[[gguf.GGUFWriter, ArchContext], None]
ExtraTensors = Callable[[ArchContext], "list[tuple[gguf.MODEL_TENSOR, torch.Tensor]]"]


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table."""

    name: str
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    fixups: tuple[Fixup, ...] = ()
    hparams: tuple[HparamWriter, ...] = ()
    extra_tensors: tuple[ExtraTensors, ...] = ()
    name_prefixes: tuple[str, ...] = field(default=())  # HF prefixes stripped before mapping
    spm_add_space_prefix: bool | None = None  # force tokenizer.ggml.add_space_prefix for SentencePiece vocabs

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# --------------------------------------------------------------------------- rope parameters


def rope_params(cfg: dict) -> tuple[dict, dict | None]:
    """(global, sliding-or-None) RoPE parameter dicts from either config style.

    transformers >= 5 writes ``rope_parameters`` (possibly keyed by layer type); older configs use
    ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq``.
    """
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        return dict(rp.get("full_attention") or {}), (dict(rp["sliding_attention"]) if "sliding_attention" in rp else None)
    full = dict(rp) or dict(cfg.get("rope_scaling") or {})
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full["type"]
    if cfg.get("rope_theta") is not None:
        full.setdefault("rope_theta", cfg["rope_theta"])
    sliding = None
    if cfg.get("rope_local_base_freq") is not None:
        sliding = {"rope_theta": cfg["rope_local_base_freq"], "rope_type": "default"}
    return full, sliding


# --------------------------------------------------------------------------- shared hparams


def common_hparams(w: gguf.GGUFWriter, c: ArchContext) -> None:
    """Keys every decoder writes (mirrors llama.cpp's ``TextModel.set_gguf_parameters``)."""
    w.add_block_count(int(c.cfg["num_hidden_layers"]))
    if (n_ctx := c.get("max_position_embeddings")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(int(c.cfg["hidden_size"]))
    w.add_feed_forward_length(int(c.cfg["intermediate_size"]))
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", default=1e-6)))
    if c.cfg.get("head_dim") is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    full, _ = rope_params(c.cfg)
    if (theta := full.get("rope_theta")) is not None:
        w.add_rope_freq_base(float(theta))
    rtype = (full.get("rope_type") or "default").lower()
    factor = full.get("factor")
    if rtype == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rtype == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if full.get(key) is not None:
                add(float(full[key]))
    elif rtype not in ("default", "llama3"):
        raise ConversionError(f"config.json: rope type {rtype!r} is not supported for {c.cfg.get('model_type')} "
                              f"(supported: default, linear, yarn, llama3)")


def llama_hparams(w: gguf.GGUFWriter, c: ArchContext) -> None:
    w.add_vocab_size(c.n_vocab)
    w.add_rope_dimension_count(c.head_dim)


def gemma3_hparams(w: gguf.GGUFWriter, c: ArchContext) -> None:
    if c.get("attn_logit_softcapping") is not None:
        raise ConversionError("config.json: gemma3 with attn_logit_softcapping is not supported by llama.cpp")
    if (cap := c.get("final_logit_softcapping")) is not None:
        w.add_final_logit_softcapping(float(cap))
    _, sliding = rope_params(c.cfg)
    if sliding is not None and sliding.get("rope_theta") is not None:
        w.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    n_layer = int(c.cfg["num_hidden_layers"])
    types = c.cfg.get("layer_types")
    if types is None:
        pattern = int(c.get("sliding_window_pattern", "_sliding_window_pattern", default=6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    if c.get("sliding_window") and any(t == "sliding_attention" for t in types):
        w.add_sliding_window(int(c.cfg["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


# --------------------------------------------------------------------------- fix-ups


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> ggml interleaved pairs, per head (llama.cpp ``LlamaModel.permute``)."""
    # x: [n_head * head_dim, ...] -> [n_head, 2, head_dim/2, ...] -> swap -> same shape
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def llama_permute_qk(hf: str, gg: str, x: torch.Tensor, c: ArchContext) -> torch.Tensor:
    if hf.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute_rows(x, c.n_head)
    if hf.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute_rows(x, c.n_head_kv)
    return x


def _is(gg: str, key: gguf.MODEL_TENSOR) -> bool:
    """True if GGUF name ``gg`` is an instance of tensor kind ``key`` (any block)."""
    tmpl = gguf.TENSOR_NAMES[key]
    head, _, tail = tmpl.partition("{bid}")
    base = gg.rsplit(".", 1)[0]
    if "{bid}" not in tmpl:
        return base == tmpl
    return base.startswith(head) and base.endswith(tail) and base[len(head):len(base) - len(tail)].isdecimal()


def trim_vocab(hf: str, gg: str, x: torch.Tensor, c: ArchContext) -> torch.Tensor:
    """Drop embedding rows beyond the tokenizer's vocabulary (llama.cpp requires equal sizes)."""
    if (_is(gg, gguf.MODEL_TENSOR.TOKEN_EMBD) or _is(gg, gguf.MODEL_TENSOR.OUTPUT)) and x.shape[0] > c.n_vocab:
        log.info("%s: keeping the first %d of %d rows (tokenizer size)", gg, c.n_vocab, x.shape[0])
        return x[:c.n_vocab]
    return x


def gemma_norm_plus_one(hf: str, gg: str, x: torch.Tensor, c: ArchContext) -> torch.Tensor:
    """Gemma3RMSNorm computes ``x * (1 + w)``; llama.cpp multiplies by the stored weight."""
    return x + 1.0 if hf.endswith("norm.weight") else x


def gemma3_query_scale(hf: str, gg: str, x: torch.Tensor, c: ArchContext) -> torch.Tensor:
    """Fold ``query_pre_attn_scalar`` into ``attn_q_norm`` when llama.cpp would assume another scale.

    llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for the 62-layer 27B);
    HF by 1/sqrt(query_pre_attn_scalar). q_norm multiplies q right before, so scaling its weight
    (already ``1 + w``) by the ratio is exact.
    """
    if not _is(gg, gguf.MODEL_TENSOR.ATTN_Q_NORM):
        return x
    qpas = c.get("query_pre_attn_scalar")
    if qpas is None:
        return x
    n_layer = int(c.cfg["num_hidden_layers"])
    assumed = (c.cfg["hidden_size"] // c.n_head) if n_layer == 62 else c.head_dim
    ratio = math.sqrt(assumed / float(qpas))
    return x if ratio == 1.0 else x * ratio


def llama3_rope_freqs(c: ArchContext) -> list[tuple[gguf.MODEL_TENSOR, torch.Tensor]]:
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
    return [(gguf.MODEL_TENSOR.ROPE_FREQS, out.to(torch.float32))]


# --------------------------------------------------------------------------- the table

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("LlamaForCausalLM",), ("llama",), gguf.MODEL_ARCH.LLAMA,
             fixups=(llama_permute_qk,), hparams=(common_hparams, llama_hparams),
             extra_tensors=(llama3_rope_freqs,)),
    ArchSpec("mistral", ("MistralForCausalLM",), ("mistral",), gguf.MODEL_ARCH.LLAMA,
             fixups=(llama_permute_qk,), hparams=(common_hparams, llama_hparams)),
    ArchSpec("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), gguf.MODEL_ARCH.QWEN2, hparams=(common_hparams,)),
    ArchSpec("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), gguf.MODEL_ARCH.QWEN3, hparams=(common_hparams,)),
    ArchSpec("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3"),
             gguf.MODEL_ARCH.GEMMA3, fixups=(trim_vocab, gemma_norm_plus_one, gemma3_query_scale),
             hparams=(common_hparams, gemma3_hparams), spm_add_space_prefix=False,
             name_prefixes=("model.language_model.", "language_model.model.", "language_model.")),
)


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


def gguf_name(spec: ArchSpec, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor (None for tensors that are skipped)."""
    if hf_name.endswith(SKIP_SUFFIXES) or hf_name.startswith(MULTIMODAL_PREFIXES):
        return None
    name = hf_name
    for p in spec.name_prefixes:
        if name.startswith(p):
            name = ("model." + name[len(p):]) if not name[len(p):].startswith("lm_head") else name[len(p):]
            break
    return name_map.get_name(name, try_suffixes=(".weight", ".bias"))
