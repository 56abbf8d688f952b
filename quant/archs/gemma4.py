"""Gemma 4 text model (``Gemma4ForCausalLM``; the text part of ``Gemma4ForConditionalGeneration``) -> GGUF ``gemma4``.

Everything comes from the config, as transformers' ``Gemma4TextConfig`` reads it (HF
``models/gemma4``), written the way llama.cpp's ``gemma4`` loader reads it (``src/models/gemma4.cpp``):

* ``layer_types`` (any sliding / full pattern) -> ``attention.sliding_window_pattern``; sliding layers
  use ``head_dim`` and ``num_key_value_heads``, full layers their own head dim and (with
  ``attention_k_eq_v``) KV-head count (``global_head_dim`` / ``num_global_key_value_heads``, or the
  ``per_layer_config`` that ``save_pretrained`` writes) -> ``*_swa`` keys and a per-layer
  ``head_count_kv`` array;
* RoPE per layer type: sliding "default" (``rope.freq_base_swa``), full "proportional" -- only
  ``partial_rotary_factor`` of the pairs rotate, over the whole head -- expressed as ggml NEOX RoPE
  over the full head dim with the generated ``rope_freqs`` = ``[factor]*rotated + [1e30]*rest``;
* ``attention_k_eq_v``: full layers have no ``v_proj`` (llama.cpp uses K as V when ``attn_v`` is absent);
* ``num_kv_shared_layers``: the last layers have no K/V of their own -> ``attention.shared_kv_layers``;
  where llama.cpp's hard-coded reuse rule would pick other layers than transformers
  (:func:`kv_reuse_problem`) the config is refused unless ``--torch-only`` (:meth:`llama_cpp_limits`);
* ``use_double_wide_mlp`` -> a per-layer ``feed_forward_length`` array;
* the MoE block beside the dense MLP: ``router.proj`` -> ``ffn_gate_inp``, ``router.scale`` ->
  ``ffn_gate_inp.scale``, ``router.per_expert_scale`` -> ``ffn_down_exps.scale``, the fused 3-D
  ``experts.gate_up_proj`` / ``down_proj`` kept as ``ffn_gate_up_exps`` / ``ffn_down_exps`` (streamed
  a chunk of rows at a time like any tensor, so never a whole layer of experts in memory);
* per-layer embeddings (PLE): ``per_layer_token_embd`` and friends;
* ``final_logit_softcapping``; attention scale 1 and the sqrt(hidden) / sqrt(P) embedding scales
  are what llama.cpp hard-codes for gemma4 (no keys); norms are plain ``x * w`` (no ``1 + w``);
* the tokenizer: SentencePiece-style BPE from ``tokenizer.json`` (``tokenizer.ggml.model = gemma4``),
  the channel / tool markers kept visible (user-defined) so replies show the thinking channel.

Vision and audio towers are skipped with a one-line notice.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
import torch

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import Generated, RowSource, Rows
from edgeinfer.quant.spec import ArchContext, ArchSpec, Out, TensorSet, tensor_name
from edgeinfer.quant.vocab import Vocab

log = logging.getLogger(__name__)
M = gguf.MODEL_TENSOR
SLIDING, FULL = "sliding_attention", "full_attention"

#: Markers llama.cpp's converter keeps visible (USER_DEFINED) so chat parsers see them in the text.
VISIBLE_TOKENS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>')
#: HF names the default name map does not know (checkpoint suffix -> GGUF kind, suffix).
EXTRA_NAMES = {"router.scale": (M.FFN_GATE_INP, "scale"), "router.per_expert_scale": (M.FFN_DOWN_EXP, "scale")}
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
#: what a multimodal checkpoint carries besides the text model (named in the skip notice)
TOWERS = {"vision": ("vision_tower.", "embed_vision."), "audio": ("audio_tower.", "embed_audio.")}


# --------------------------------------------------------------------------- config reading


def layer_types(c: ArchContext) -> list[str]:
    """``layer_types``, or transformers' default (every 6th layer full; the last one always full)."""
    types = c.cfg.get("layer_types")
    if types is None:
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(c.n_layers)]
    types = list(types)
    if types:
        types[-1] = FULL  # Gemma4TextConfig forces it
    return types


def _full_override(c: ArchContext, key: str):
    """A full-layer value of ``per_layer_config`` (what save_pretrained writes), if any."""
    for i, lc in (c.cfg.get("per_layer_config") or {}).items():
        if isinstance(lc, dict) and key in lc and layer_types(c)[int(i)] == FULL:
            return lc[key]
    return None


def global_head_dim(c: ArchContext) -> int:
    """Head dim of the full-attention layers (``global_head_dim``, default 512 as in transformers)."""
    v = c.get("global_head_dim")
    return int(v if v is not None else _full_override(c, "head_dim") or 512)


def global_kv_heads(c: ArchContext) -> int | None:
    """KV heads of the full layers when the config sets them (only with ``attention_k_eq_v``)."""
    if not c.cfg.get("attention_k_eq_v"):
        return None
    v = c.get("num_global_key_value_heads")
    v = v if v is not None else _full_override(c, "num_key_value_heads")
    return int(v) if v is not None else None


def head_dim(c: ArchContext, bid: int) -> int:
    return global_head_dim(c) if layer_types(c)[bid] == FULL else c.head_dim


def kv_heads(c: ArchContext, bid: int) -> int:
    g = global_kv_heads(c)
    return g if g is not None and layer_types(c)[bid] == FULL else c.n_head_kv


def first_shared(c: ArchContext) -> int:
    """Index of the first layer that reuses an earlier layer's K/V (``n_layers`` when none does)."""
    return c.n_layers - int(c.get("num_kv_shared_layers", default=0))


def ffn_widths(c: ArchContext) -> list[int]:
    """Dense MLP width per layer (twice as wide on KV-shared layers with ``use_double_wide_mlp``)."""
    ff, fs = int(c.cfg["intermediate_size"]), first_shared(c)
    wide = bool(c.cfg.get("use_double_wide_mlp"))
    return [ff * 2 if wide and i >= fs else ff for i in range(c.n_layers)]


def ple_dim(c: ArchContext) -> int:
    """Per-layer embedding width P (0: no PLE)."""
    return int(c.get("hidden_size_per_layer_input", default=0) or 0)


def rope_settings(c: ArchContext) -> tuple[dict, dict]:
    """(sliding, full) RoPE parameters, transformers' defaults where the config has none."""
    rp = c.cfg.get("rope_parameters") or {}
    sliding = dict(rp.get(SLIDING) or {"rope_type": "default", "rope_theta": 10000.0})
    full = dict(rp.get(FULL) or {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6})
    return sliding, full


def rope_freqs(c: ArchContext) -> torch.Tensor:
    """Per-pair divisors for the full layers' NEOX RoPE over the whole head: HF's proportional RoPE
    rotates the first ``int(partial_rotary_factor * head_dim // 2)`` pairs at ``theta^(-2i/head_dim) /
    factor`` and leaves the rest (inverse frequency 0: a divisor of 1e30, as llama.cpp's converter)."""
    _, full = rope_settings(c)
    hd = global_head_dim(c)
    n_rot = int(float(full.get("partial_rotary_factor", 1.0)) * hd // 2)
    factor = float(full.get("factor", 1.0))
    return torch.tensor([factor] * n_rot + [1e30] * (hd // 2 - n_rot), dtype=torch.float32)


def kv_reuse_problem(c: ArchContext) -> str | None:
    """Why llama.cpp would read other layers' K/V than transformers for this sharing layout (None: same).

    transformers: a shared layer reuses the last non-shared layer of its own type. llama.cpp
    (``llama-model.cpp``, the gemma3n/gemma4 ``reuse`` callback): a shared sliding layer reuses layer
    ``first_shared - 2``, a shared full layer ``first_shared - 1``, whatever their types.
    """
    types, fs = layer_types(c), first_shared(c)
    if fs == c.n_layers:
        return None
    if fs < 2:
        return f"num_kv_shared_layers={c.n_layers - fs} leaves fewer than 2 layers with their own K/V"
    prefix = types[:fs]
    problems = []
    for t, lc_layer in ((SLIDING, fs - 2), (FULL, fs - 1)):
        if t not in types[fs:]:
            continue
        if t not in prefix:
            problems.append(f"no {t} layer before layer {fs} has K/V to share")
            continue
        hf_layer = fs - 1 - prefix[::-1].index(t)
        if hf_layer != lc_layer:
            problems.append(f"shared {t} layers reuse layer {hf_layer} in transformers but layer {lc_layer} "
                            f"({types[lc_layer]}) in llama.cpp")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- tokenizer


def _special_texts(folder: Path) -> set[str]:
    """The tokens transformers counts as special (``all_special_tokens``): named ``*_token`` entries,
    ``additional_special_tokens``, ``extra_special_tokens`` and ``model_specific_special_tokens``."""
    p = folder / "tokenizer_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    def text(v):
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    out = {text(v) for k, v in cfg.items() if k.endswith("_token")}
    for key in ("additional_special_tokens", "extra_special_tokens", "model_specific_special_tokens"):
        v = cfg.get(key) or []
        out.update(text(x) for x in (v.values() if isinstance(v, dict) else v))
    return {t for t in out if t}


def load_gemma4_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Gemma 4's tokenizer.json as llama.cpp's ``gemma4`` tokenizer: every token in id order with
    score -1000, types BYTE (``<0xXX>``), CONTROL (special), USER_DEFINED (added, not special; and the
    :data:`VISIBLE_TOKENS`) or NORMAL; merges, special ids and the chat template from
    ``gguf.SpecialVocab``; BOS always added (llama.cpp forces it for gemma4 too).

    Raises:
        ConversionError: no tokenizer.json, or not a byte-fallback BPE.
    """
    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the Gemma 4 tokenizer ({e}); copy tokenizer.json into the folder") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ConversionError(f"{path}: Gemma 4 needs a byte-fallback BPE tokenizer.json "
                              f"(found {model.get('type')!r}, byte_fallback={model.get('byte_fallback')})")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    base = max(by_id) + 1
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    specials = _special_texts(folder)
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if t in VISIBLE_TOKENS:
            types.append(gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(gguf.TokenType.BYTE)
        elif t in specials:
            types.append(gguf.TokenType.CONTROL)
        elif i >= base and i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ConversionError(f"{path}: BPE tokenizer without merges (llama.cpp's gemma4 tokenizer needs them)")
    special.add_special_token["bos"] = True
    return Vocab("gemma4", tokens, [int(t) for t in types], scores=[-1000.0] * len(tokens),
                 add_space_prefix=False, special=special)


# --------------------------------------------------------------------------- the spec


class Gemma4Spec(ArchSpec):
    name = "gemma4"
    hf_architectures = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
    model_types = ("gemma4_text", "gemma4")
    gguf_arch = gguf.MODEL_ARCH.GEMMA4
    name_prefixes = TEXT_PREFIXES
    trims_vocab = True

    def vocab(self, folder: Path, n_vocab: int) -> Vocab:
        return load_gemma4_vocab(folder, n_vocab)

    def check(self, c: ArchContext) -> None:
        where = "config.json"
        types = layer_types(c)
        if len(types) != c.n_layers or set(types) - {SLIDING, FULL}:
            raise ConversionError(f"{where}: layer_types must list {c.n_layers} entries of {SLIDING!r} / {FULL!r}")
        refuse = []
        if c.cfg.get("use_bidirectional_attention") == "all":
            refuse.append("use_bidirectional_attention='all' (llama.cpp's gemma4 is causal)")
        if c.cfg.get("attention_bias"):
            refuse.append("attention_bias=true (llama.cpp's gemma4 has no attention biases)")
        if (act := c.get("hidden_activation", default="gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
            refuse.append(f"hidden_activation={act!r} (llama.cpp's gemma4 uses gelu_pytorch_tanh)")
        for i, lc in (c.cfg.get("per_layer_config") or {}).items():
            i = int(i)
            want = {"head_dim": global_head_dim(c)} if types[i] == FULL else {}
            if types[i] == FULL and global_kv_heads(c) is not None:
                want["num_key_value_heads"] = global_kv_heads(c)
            got = {k: v for k, v in (lc or {}).items() if k in ("head_dim", "num_key_value_heads")}
            if any(got[k] != want.get(k, c.head_dim if k == "head_dim" else c.n_head_kv) for k in got):
                refuse.append(f"per_layer_config[{i}]={got} (llama.cpp has one head size and KV-head count "
                              f"per layer type)")
        sliding, full = rope_settings(c)
        if sliding.get("rope_type", "default") != "default" or float(sliding.get("partial_rotary_factor", 1.0)) != 1.0:
            refuse.append(f"sliding-layer RoPE {sliding} (llama.cpp: plain RoPE over the whole head)")
        if full.get("rope_type", "default") not in ("default", "proportional") or (
                full.get("rope_type") == "default" and float(full.get("partial_rotary_factor", 1.0)) != 1.0):
            refuse.append(f"full-layer RoPE {full} (supported: proportional, default)")
        fs = first_shared(c)
        if fs < c.n_layers and (fs < 1 or any(t not in types[:fs] for t in types[fs:])):
            refuse.append(f"num_kv_shared_layers={c.n_layers - fs}: a shared layer type has no earlier layer "
                          f"with K/V to reuse")
        if c.cfg.get("enable_moe_block"):
            missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if not c.cfg.get(k)]
            if missing:
                refuse.append(f"enable_moe_block without {', '.join(missing)}")
        if ple_dim(c):
            n_ple = int(c.get("vocab_size_per_layer_input", default=c.cfg.get("vocab_size") or 0))
            if n_ple < c.n_vocab:
                refuse.append(f"vocab_size_per_layer_input={n_ple} is smaller than the tokenizer ({c.n_vocab} "
                              f"tokens; llama.cpp reads one per-layer embedding row per token)")
        if refuse:
            raise ConversionError(f"{where}: this Gemma 4 configuration cannot be expressed in llama.cpp's "
                                  f"gemma4 GGUF: " + "; ".join(refuse))

    def llama_cpp_limits(self, c: ArchContext) -> list[str]:
        why = kv_reuse_problem(c)
        return [] if why is None else [
            f"KV sharing: {why} (llama.cpp's gemma4 hard-codes that shared sliding layers reuse layer "
            f"num_hidden_layers - num_kv_shared_layers - 2 and shared full layers the one after it)"]

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        types = layer_types(c)
        swa = [t == SLIDING for t in types]
        sliding, full = rope_settings(c)
        w.add_block_count(c.n_layers)
        if (n_ctx := c.get("max_position_embeddings")) is not None:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(c.hidden)
        widths = ffn_widths(c)
        w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
        w.add_head_count(c.n_head)
        g_kv = global_kv_heads(c)
        w.add_head_count_kv([kv_heads(c, i) for i in range(c.n_layers)] if g_kv is not None else c.n_head_kv)
        w.add_rope_freq_base(float(full.get("rope_theta", 1e6)))
        w.add_rope_freq_base_swa(float(sliding.get("rope_theta", 1e4)))
        w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", default=1e-6)))
        if c.cfg.get("enable_moe_block"):
            w.add_expert_count(int(c.cfg["num_experts"]))
            w.add_expert_used_count(int(c.cfg["top_k_experts"]))
        gd = global_head_dim(c)
        w.add_key_length(gd)
        w.add_value_length(gd)
        if (cap := c.get("final_logit_softcapping")) is not None:
            w.add_final_logit_softcapping(float(cap))
        w.add_sliding_window(int(c.get("sliding_window", default=512)))
        w.add_shared_kv_layers(c.n_layers - first_shared(c))
        w.add_embedding_length_per_layer_input(ple_dim(c))
        w.add_sliding_window_pattern(swa)
        w.add_key_length_swa(c.head_dim)
        w.add_value_length_swa(c.head_dim)
        if c.cfg.get("enable_moe_block"):
            w.add_expert_feed_forward_length(int(c.cfg["moe_intermediate_size"]))
        w.add_rope_dimension_count(gd)  # full layers: NEOX over the whole head, rope_freqs masks the rest
        w.add_rope_dimension_count_swa(c.head_dim)

    # -- tensors -------------------------------------------------------------------------------
    def tensors(self, ck, c: ArchContext) -> TensorSet:
        ts = super().tensors(ck, c)
        towers = {k: sum(1 for n in ts.skipped if self._tower(n) == k) for k in TOWERS}
        if any(towers.values()):
            log.warning("%s: text model only; skipping %s", ck.path,
                        " and ".join(f"the {k} tower ({n} tensors)" for k, n in towers.items() if n))
        return ts

    @staticmethod
    def _tower(hf_name: str) -> str | None:
        rest = hf_name.split("model.", 1)[-1] if hf_name.startswith("model.") else hf_name
        return next((k for k, prefixes in TOWERS.items() if rest.startswith(prefixes)), None)

    def skip(self, hf_name: str, c: ArchContext) -> bool:
        return super().skip(hf_name, c) or self._tower(hf_name) is not None

    def gguf_name(self, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
        m = re.search(r"layers\.(\d+)\.(router\.(?:scale|per_expert_scale))$", hf_name)
        if m is not None:
            kind, suffix = EXTRA_NAMES[m.group(2)]
            return tensor_name(kind, int(m.group(1)), suffix)
        return super().gguf_name(name_map, hf_name)

    def rows(self, kind, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        if kind == M.PER_LAYER_TOKEN_EMBD and src.shape[0] > c.n_vocab:
            log.info("per_layer_token_embd: keeping the first %d of %d rows (tokenizer size)", c.n_vocab, src.shape[0])
            return Rows(src, 0, c.n_vocab)  # rows past the tokenizer are never looked up
        return src

    def generated(self, c: ArchContext) -> list[Out]:
        return [Out(tensor_name(M.ROPE_FREQS), Generated(rope_freqs(c), "gemma4 full-layer rope_freqs"))]

    # -- shapes and completeness ---------------------------------------------------------------
    def shapes(self, c: ArchContext, bid: int | None):
        h, p, L = c.hidden, ple_dim(c), c.n_layers
        if bid is None:
            out = {M.OUTPUT_NORM: (h,), M.PER_LAYER_MODEL_PROJ: (L * p, h), M.PER_LAYER_PROJ_NORM: (p,),
                   M.ROPE_FREQS: (global_head_dim(c) // 2,)}
            if p:
                out[M.PER_LAYER_TOKEN_EMBD] = (c.n_vocab, L * p)
            return {(k, "weight"): s for k, s in out.items()}
        hd, kv, ff = head_dim(c, bid), kv_heads(c, bid), ffn_widths(c)[bid]
        w = {M.ATTN_NORM: (h,), M.ATTN_POST_NORM: (h,), M.FFN_NORM: (h,), M.FFN_POST_NORM: (h,),
             M.ATTN_Q: (c.n_head * hd, h), M.ATTN_K: (kv * hd, h), M.ATTN_V: (kv * hd, h),
             M.ATTN_OUT: (h, c.n_head * hd), M.ATTN_Q_NORM: (hd,), M.ATTN_K_NORM: (hd,),
             M.FFN_GATE: (ff, h), M.FFN_UP: (ff, h), M.FFN_DOWN: (h, ff), M.LAYER_OUT_SCALE: (1,),
             M.PER_LAYER_INP_GATE: (p, h), M.PER_LAYER_PROJ: (h, p), M.PER_LAYER_POST_NORM: (h,)}
        if c.cfg.get("enable_moe_block"):
            e, fe = int(c.cfg["num_experts"]), int(c.cfg["moe_intermediate_size"])
            w.update({M.FFN_GATE_INP: (e, h), M.FFN_PRE_NORM_2: (h,), M.FFN_POST_NORM_1: (h,),
                      M.FFN_POST_NORM_2: (h,), M.FFN_GATE_UP_EXP: (e, 2 * fe, h), M.FFN_DOWN_EXP: (e, h, fe)})
        out = {(k, "weight"): s for k, s in w.items()}
        if c.cfg.get("enable_moe_block"):
            out[(M.FFN_GATE_INP, "scale")] = (h,)
            out[(M.FFN_DOWN_EXP, "scale")] = (int(c.cfg["num_experts"]),)
        return out

    def layer_stems(self, c: ArchContext, bid: int) -> set[str]:
        stems = ["attn_norm", "attn_q", "attn_q_norm", "attn_output", "post_attention_norm", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm", "layer_output_scale"]
        if bid < first_shared(c):  # shared layers read another layer's K/V
            stems += ["attn_k", "attn_k_norm"]
            if not (c.cfg.get("attention_k_eq_v") and layer_types(c)[bid] == FULL):  # V is K there
                stems.append("attn_v")
        if c.cfg.get("enable_moe_block"):
            stems += ["ffn_gate_inp", "pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2",
                      "ffn_gate_up_exps", "ffn_down_exps"]
        if ple_dim(c):
            stems += ["inp_gate", "proj", "post_norm"]
        out = {s + ".weight" for s in stems}
        if c.cfg.get("enable_moe_block"):
            out |= {"ffn_gate_inp.scale", "ffn_down_exps.scale"}
        return out
