"""Gemma 3n text model (``Gemma3nForCausalLM``; the text part of ``Gemma3nForConditionalGeneration``)
-> GGUF ``gemma3n``.

Everything comes from the config as transformers' ``Gemma3nTextConfig`` reads it (HF
``models/gemma3n``) and is written the way llama.cpp's converter writes it (``conversion/gemma.py``
``Gemma3NModel``), so stock llama.cpp loads the file:

* ``layer_types`` -> ``attention.sliding_window_pattern``; RoPE theta per layer type
  (``rope.freq_base`` / ``rope.freq_base_swa``); one head size; attention scale 1 (not written);
* ``intermediate_size`` (one width or one per layer) -> ``feed_forward_length``;
* AltUp: ``altup.num_inputs`` / ``altup.active_idx``; the projections ``altup_projections.K`` /
  ``altup_unembed_projections.K`` stacked into the 3-D ``altup_proj`` / ``altup_unembd_proj``; per layer
  ``altup_router`` (+ norm), ``altup_predict_coef``, ``altup_correct_coef``, ``altup_correct_scale``
  (ones when ``altup_correct_scale`` is false: transformers then skips that multiplication);
* LAuReL (``laurel_l`` / ``laurel_r`` / ``laurel_post_norm``; the rank is the tensors' shape);
* activation sparsity: ``activation_sparsity_pattern`` p per layer -> ``activation_sparsity_scale``
  = Phi^-1(p) (float32, -inf where p = 0: no sparsity), as llama.cpp's converter writes it;
* per-layer embeddings: ``embedding_length_per_layer_input`` and the ``per_layer_*`` / ``inp_gate`` /
  ``proj`` / ``post_norm`` tensors; the table has ``vocab_size_per_layer_input`` rows, padded to the
  vocabulary as llama.cpp's converter pads it -- but with copies of row 0, not zeros: transformers
  looks ids past the table up as id 0 (the same bytes when row 0 is zero);
* KV sharing: ``attention.shared_kv_layers``. Stock llama.cpp requires K/V projections (and
  ``attn_k_norm``) in every layer although the shared layers never read them; the released
  checkpoints carry them, transformers 5 saves none: missing ones are written as placeholders
  (zeros, and ones for the norm), which edgeinfer's torch engine does not read either;
* ``final_logit_softcapping``; norms are plain ``x * w`` (no ``1 + w``).

What stock llama.cpp hard-codes instead of reading it (``src/models/gemma3n.cpp``,
``llama-hparams.h``) is listed by :meth:`Gemma3nSpec.llama_cpp_limits`; such configs are converted
only with ``--torch-only``. One difference applies to every file and is not a limit: llama.cpp's
gaussian top-k uses the unbiased standard deviation (1/(n-1)), transformers the biased one (1/n);
the relative difference of the cut-off is about 1/(2n) (6e-5 for the real 8192-wide FFNs).

Vision and audio towers are skipped with a one-line notice.
"""

from __future__ import annotations

import logging
import re

import gguf
import torch

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import Constant, Map, Pad, RowSource, Rows, Stack, Tensor
from edgeinfer.quant.spec import ArchContext, ArchSpec, Out, TensorSet, rope_params, tensor_name

log = logging.getLogger(__name__)
M = gguf.MODEL_TENSOR
SLIDING, FULL = "sliding_attention", "full_attention"
#: what a multimodal checkpoint carries besides the text model (named in the skip notice)
TOWERS = {"vision": ("vision_tower.", "embed_vision."), "audio": ("audio_tower.", "embed_audio.")}
#: checkpoint AltUp projection lists -> the GGUF tensor they are stacked into
ALTUP_STACKS = {"altup_projections": M.ALTUP_PROJ, "altup_unembed_projections": M.ALTUP_UNEMBD_PROJ}

# What stock llama.cpp's gemma3n hard-codes (src/models/gemma3n.cpp, models.h, llama-hparams.h).
LLAMA_CPP_KV_LAYERS = 20  # n_layer_kv_from_start
LLAMA_CPP_FIXED = {"altup_num_inputs": 4, "altup_active_idx": 0, "laurel_rank": 64, "hidden_size_per_layer_input": 256}
LLAMA_CPP_SPARSE_LAYERS = 10  # n_layer_sparsity, at f_sparsity_std_mul = Phi^-1(0.95)
LLAMA_CPP_SPARSITY = 0.95
LLAMA_CPP_SOFTCAP = 30.0  # f_final_logit_softcapping (the key is not read)


# --------------------------------------------------------------------------- config reading

#: ``Gemma3nTextConfig``'s defaults for the fields a config may leave out (an explicit null stays null).
HF_DEFAULTS = {"num_kv_shared_layers": 15, "hidden_size_per_layer_input": 256, "laurel_rank": 64,
               "altup_num_inputs": 4, "altup_active_idx": 0, "altup_correct_scale": True,
               "final_logit_softcapping": 30.0, "sliding_window": 512, "rms_norm_eps": 1e-6,
               "max_position_embeddings": 32768, "hidden_activation": "gelu_pytorch_tanh"}


def setting(c: ArchContext, key: str):
    """A config field, or transformers' default when the config leaves it out."""
    return c.cfg[key] if key in c.cfg else HF_DEFAULTS[key]


def layer_types(c: ArchContext) -> list[str]:
    """``layer_types``, or transformers' default (every 5th layer full)."""
    types = c.cfg.get("layer_types")
    return list(types) if types is not None else [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(c.n_layers)]


def ffn_widths(c: ArchContext) -> list[int]:
    """FFN width per layer (``intermediate_size`` is one width or a list)."""
    ff = c.cfg["intermediate_size"]
    return [int(x) for x in ff] if isinstance(ff, list) else [int(ff)] * c.n_layers


def sparsity(c: ArchContext) -> list[float]:
    """``activation_sparsity_pattern``, or transformers' default (0.95 on the first 10 layers when
    there are more than 10)."""
    p = c.cfg.get("activation_sparsity_pattern")
    if p is None:
        n = 10 if c.n_layers > 10 else 0
        p = [0.95] * n + [0.0] * (c.n_layers - n)
    return [float(x) for x in p]


def sparsity_scale(p: float) -> float:
    """Phi^-1(p) in float32 as transformers computes it (``Normal(0, 1).icdf``; -inf for p = 0)."""
    return float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p, dtype=torch.float32)))


def first_shared(c: ArchContext) -> int:
    """Index of the first layer reading another layer's K/V (``n_layers`` when none does)."""
    return c.n_layers - int(setting(c, "num_kv_shared_layers") or 0)


def kv_producers(c: ArchContext) -> dict[int, int]:
    """KV-shared layer -> the layer whose K/V it reads: the last non-shared layer of its own type
    (transformers' ``Gemma3nTextConfig.kv_sharing_modes``)."""
    types, fs = layer_types(c), first_shared(c)
    prefix = types[:fs]
    return {i: fs - 1 - prefix[::-1].index(types[i]) for i in range(fs, c.n_layers) if types[i] in prefix}


def ple_dim(c: ArchContext) -> int:
    return int(setting(c, "hidden_size_per_layer_input") or 0)


def n_altup(c: ArchContext) -> int:
    return int(setting(c, "altup_num_inputs"))


def laurel_rank(c: ArchContext) -> int:
    return int(setting(c, "laurel_rank"))


def rope_settings(c: ArchContext) -> tuple[dict, dict]:
    """(sliding, full) RoPE parameters with transformers' default thetas (1e4 / 1e6)."""
    full, sliding = rope_params(c.cfg)
    sliding = {"rope_type": "default", "rope_theta": 10000.0, **(sliding or {})}
    full = {"rope_type": "default", "rope_theta": 1000000.0, **full}
    return sliding, full


# --------------------------------------------------------------------------- the spec


class Gemma3nSpec(ArchSpec):
    name = "gemma3n"
    hf_architectures = ("Gemma3nForCausalLM", "Gemma3nForConditionalGeneration")
    model_types = ("gemma3n_text", "gemma3n")
    gguf_arch = gguf.MODEL_ARCH.GEMMA3N
    name_prefixes = ("model.language_model.", "language_model.model.", "language_model.")
    spm_add_space_prefix = False

    def check(self, c: ArchContext) -> None:
        where, n = "config.json", c.n_layers
        types = layer_types(c)
        refuse = []
        if len(types) != n or set(types) - {SLIDING, FULL}:
            refuse.append(f"layer_types must list {n} entries of {SLIDING!r} / {FULL!r}")
        ff = c.cfg["intermediate_size"]
        if isinstance(ff, list) and (len(ff) != n or not all(isinstance(x, int) and x > 0 for x in ff)):
            refuse.append(f"intermediate_size must be one width or {n} widths")
        p = c.cfg.get("activation_sparsity_pattern")
        if p is not None and (not isinstance(p, list) or len(p) != n or not all(0.0 <= float(x) < 1.0 for x in p)):
            refuse.append(f"activation_sparsity_pattern must list {n} values in [0, 1)")
        if (act := setting(c, "hidden_activation")) != "gelu_pytorch_tanh":
            refuse.append(f"hidden_activation={act!r} (the gemma3n GGUF has gelu_pytorch_tanh)")
        if c.cfg.get("attention_bias"):
            refuse.append("attention_bias=true (the gemma3n GGUF has no attention biases)")
        for what, r in zip(("sliding", "full"), rope_settings(c)):
            if r.get("rope_type", "default") != "default" or float(r.get("partial_rotary_factor", 1.0)) != 1.0:
                refuse.append(f"{what}-layer RoPE {r} (the gemma3n GGUF has plain RoPE per layer type)")
        if ple_dim(c) <= 0:
            refuse.append("hidden_size_per_layer_input must be positive (Gemma 3n has per-layer embeddings)")
        if n_altup(c) < 2 or not 0 <= int(setting(c, "altup_active_idx")) < n_altup(c):
            refuse.append(f"altup_num_inputs={n_altup(c)} / altup_active_idx={setting(c, 'altup_active_idx')}")
        fs = first_shared(c)
        if not refuse and fs < n and (fs < 1 or len(kv_producers(c)) != n - fs):
            refuse.append(f"num_kv_shared_layers={n - fs}: a shared layer type has no earlier layer with K/V")
        if refuse:
            raise ConversionError(f"{where}: this Gemma 3n configuration cannot be expressed in a gemma3n GGUF: "
                                  + "; ".join(refuse))

    def llama_cpp_limits(self, c: ArchContext) -> list[str]:
        out, n = [], c.n_layers
        fs, types = first_shared(c), layer_types(c)
        kv_layers = min(n, LLAMA_CPP_KV_LAYERS)
        if fs != kv_layers:
            out.append(f"{fs} layers with their own K/V (num_hidden_layers - num_kv_shared_layers; llama.cpp "
                       f"gives the first {LLAMA_CPP_KV_LAYERS} layers their own K/V, here {kv_layers})")
        else:
            for i, src in kv_producers(c).items():  # llama.cpp: sliding -> layer 18, full -> layer 19
                lc = LLAMA_CPP_KV_LAYERS - (2 if types[i] == SLIDING else 1)
                if src != lc:
                    out.append(f"shared layer {i} reuses layer {src}'s K/V, llama.cpp's hard-coded rule layer {lc}")
                    break
        for key, want in LLAMA_CPP_FIXED.items():
            if (got := int(setting(c, key))) != want:
                out.append(f"{key}={got} (llama.cpp hard-codes {want})")
        want = [LLAMA_CPP_SPARSITY if i < LLAMA_CPP_SPARSE_LAYERS else 0.0 for i in range(n)]
        if [round(x, 6) for x in sparsity(c)] != want:
            out.append(f"activation_sparsity_pattern {sparsity(c)} (llama.cpp hard-codes {LLAMA_CPP_SPARSITY} on the "
                       f"first {LLAMA_CPP_SPARSE_LAYERS} layers and none after)")
        if len(set(ffn_widths(c))) > 1:
            out.append(f"FFN widths per layer {ffn_widths(c)} (llama.cpp's gemma3n uses layer 0's width everywhere)")
        if (cap := setting(c, "final_logit_softcapping")) != LLAMA_CPP_SOFTCAP:
            out.append(f"final_logit_softcapping={cap} (llama.cpp hard-codes {LLAMA_CPP_SOFTCAP:g})")
        return out

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        sliding, full = rope_settings(c)
        w.add_block_count(c.n_layers)
        w.add_context_length(int(setting(c, "max_position_embeddings")))
        w.add_embedding_length(c.hidden)
        ff = c.cfg["intermediate_size"]
        w.add_feed_forward_length(ffn_widths(c) if isinstance(ff, list) else int(ff))
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_head_kv)
        w.add_rope_freq_base(float(full["rope_theta"]))
        w.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        w.add_layer_norm_rms_eps(float(setting(c, "rms_norm_eps")))
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        if cap := setting(c, "final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cap))
        w.add_sliding_window(int(setting(c, "sliding_window")))
        w.add_altup_active_idx(int(setting(c, "altup_active_idx")))
        w.add_altup_num_inputs(n_altup(c))
        w.add_embedding_length_per_layer_input(ple_dim(c))
        w.add_shared_kv_layers(c.n_layers - first_shared(c))
        w.add_activation_sparsity_scale([sparsity_scale(p) for p in sparsity(c)])
        w.add_sliding_window_pattern([t == SLIDING for t in layer_types(c)])

    # -- tensors -------------------------------------------------------------------------------
    def tensors(self, ck, c: ArchContext) -> TensorSet:
        stacks: dict[str, dict[int, object]] = {k: {} for k in ALTUP_STACKS}
        rest = {}
        for name, ref in ck.tensors.items():
            m = re.search(r"(altup_projections|altup_unembed_projections)\.(\d+)\.weight$", name)
            if m is not None and not self.skip(name, c):
                stacks[m.group(1)][int(m.group(2))] = ref
            else:
                rest[name] = ref
        ts = super().tensors(type(ck)(ck.path, ck.config, rest), c)
        for key, kind in ALTUP_STACKS.items():
            parts = stacks[key]
            if sorted(parts) != list(range(n_altup(c) - 1)):
                raise ConversionError(f"{ck.path}: the checkpoint has {key}.{sorted(parts)} but altup_num_inputs="
                                      f"{n_altup(c)} needs {key}.0 .. {n_altup(c) - 2}")
            ts.outs.append(Out(tensor_name(kind), Stack([Tensor(parts[k]) for k in range(n_altup(c) - 1)])))
        ts.outs += self._shared_kv_placeholders(ck, c, {o.name for o in ts.outs})
        towers = {k: sum(1 for t in ts.skipped if self._tower(t) == k) for k in TOWERS}
        if any(towers.values()):
            log.warning("%s: text model only; skipping %s", ck.path,
                        " and ".join(f"the {k} tower ({n} tensors)" for k, n in towers.items() if n))
        return ts

    def _shared_kv_placeholders(self, ck, c: ArchContext, have: set[str]) -> list[Out]:
        """K/V tensors of KV-shared layers that the checkpoint lacks (llama.cpp requires them)."""
        kv, h, hd = c.n_head_kv * c.head_dim, c.hidden, c.head_dim
        shapes = {M.ATTN_K: ((kv, h), 0.0), M.ATTN_V: ((kv, h), 0.0), M.ATTN_K_NORM: ((hd,), 1.0)}
        outs = []
        for i in range(first_shared(c), c.n_layers):
            for kind, (shape, value) in shapes.items():
                name = tensor_name(kind, i)
                if name not in have:
                    outs.append(Out(name, Constant(shape, value, f"placeholder {value:g} (shared layer, never read)")))
        if outs:
            log.info("%s: writing %d placeholder K/V tensors for the KV-shared layers (llama.cpp requires them "
                     "in every layer; they are never read)", ck.path, len(outs))
        return outs

    @staticmethod
    def _tower(hf_name: str) -> str | None:
        rest = hf_name.split("model.", 1)[-1] if hf_name.startswith("model.") else hf_name
        return next((k for k, prefixes in TOWERS.items() if rest.startswith(prefixes)), None)

    def skip(self, hf_name: str, c: ArchContext) -> bool:
        return super().skip(hf_name, c) or self._tower(hf_name) is not None

    def rows(self, kind, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        if kind == M.PER_LAYER_TOKEN_EMBD and src.shape[0] != c.n_vocab:
            if src.shape[0] > c.n_vocab:  # rows past the vocabulary are never looked up
                return Rows(src, 0, c.n_vocab)
            log.info("per_layer_token_embd: %d rows padded to the vocabulary (%d) with copies of row 0 "
                     "(transformers looks those ids up as id 0)", src.shape[0], c.n_vocab)
            return Pad(src, c.n_vocab, fill_row=0)
        if kind == M.ALTUP_CORRECT_SCALE and not setting(c, "altup_correct_scale"):
            return Map(src, torch.ones_like, "ones (altup_correct_scale=false)")
        return src

    # -- shapes and completeness ---------------------------------------------------------------
    def shapes(self, c: ArchContext, bid: int | None):
        h, p, L, a = c.hidden, ple_dim(c), c.n_layers, n_altup(c)
        if bid is None:
            w = {M.OUTPUT_NORM: (h,), M.PER_LAYER_TOKEN_EMBD: (c.n_vocab, L * p), M.PER_LAYER_MODEL_PROJ: (L * p, h),
                 M.PER_LAYER_PROJ_NORM: (p,), M.ALTUP_PROJ: (a - 1, h, h), M.ALTUP_UNEMBD_PROJ: (a - 1, h, h)}
        else:
            hd, ff, r = c.head_dim, ffn_widths(c)[bid], laurel_rank(c)
            q, kv = c.n_head * hd, c.n_head_kv * hd
            w = {M.ATTN_NORM: (h,), M.ATTN_POST_NORM: (h,), M.FFN_NORM: (h,), M.FFN_POST_NORM: (h,),
                 M.ATTN_Q: (q, h), M.ATTN_K: (kv, h), M.ATTN_V: (kv, h), M.ATTN_OUT: (h, q), M.ATTN_Q_NORM: (hd,),
                 M.ATTN_K_NORM: (hd,), M.FFN_GATE: (ff, h), M.FFN_UP: (ff, h), M.FFN_DOWN: (h, ff),
                 M.PER_LAYER_INP_GATE: (p, h), M.PER_LAYER_PROJ: (h, p), M.PER_LAYER_POST_NORM: (h,),
                 M.ALTUP_CORRECT_COEF: (a, a), M.ALTUP_CORRECT_SCALE: (h,), M.ALTUP_PREDICT_COEF: (a * a, a),
                 M.ALTUP_ROUTER: (a, h), M.ALTUP_ROUTER_NORM: (h,), M.LAUREL_L: (r, h), M.LAUREL_R: (h, r),
                 M.LAUREL_POST_NORM: (h,)}
        return {(k, "weight"): s for k, s in w.items()}

    def layer_stems(self, c: ArchContext, bid: int) -> set[str]:
        stems = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm", "inp_gate",
                 "proj", "post_norm", "altup_correct_coef", "altup_correct_scale", "altup_predict_coef",
                 "altup_router", "altup_router_norm", "laurel_l", "laurel_r", "laurel_post_norm")
        return {s + ".weight" for s in stems}
