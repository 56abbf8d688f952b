"""The architecture spec: everything one architecture's converter says about its GGUF file.

A spec is a subclass of :class:`ArchSpec` in its own file under ``quant/archs/`` plus one row in
``quant/archs/__init__.py``. The pipeline (``convert.py``) asks it, at plan time, before any tensor
data is read:

* :meth:`ArchSpec.vocab` -- the tokenizer's GGUF metadata (default: :mod:`~edgeinfer.quant.vocab`);
* :meth:`ArchSpec.check` -- config combinations it refuses;
* :meth:`ArchSpec.hparams` -- the metadata keys (written to a recording ``GGUFWriter`` during
  planning, so ``--dry-run`` refuses exactly what the real run would);
* :meth:`ArchSpec.tensors` -- the GGUF tensors it produces, each an :class:`Out` whose rows come
  from a :mod:`~edgeinfer.quant.rows` source (one tensor, a stack, a slice, a permutation, a fix-up,
  a generated tensor). The default maps every checkpoint tensor by ``gguf``'s ``TensorNameMap``
  and passes it through :meth:`ArchSpec.rows` (row-local fix-ups per tensor kind);
* :meth:`ArchSpec.shapes` / :meth:`ArchSpec.layer_stems` -- the shape each tensor must have and the
  tensors each layer must have, per layer (so per-layer sizes and dense-first layers fit).

GGUF spellings come from ``gguf`` (``MODEL_TENSOR``, ``TENSOR_NAMES``, ``GGUFWriter.add_*``); a spec
never retypes them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import RowSource, Rows, Stack, Tensor
from edgeinfer.quant.vocab import Vocab, load_vocab

if TYPE_CHECKING:
    from edgeinfer.quant.source import Checkpoint

log = logging.getLogger(__name__)
M = gguf.MODEL_TENSOR

# HF tensors that carry no weights llama.cpp needs.
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
# Prefixes of multimodal towers when a text model is embedded in a *ForConditionalGeneration.
MULTIMODAL_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.", "audio_tower.", "model.audio_tower.")


@dataclass
class ArchContext:
    """What a spec may look at: the (flattened text) config and the vocabulary size."""

    cfg: dict
    n_vocab: int  # number of tokens in the GGUF vocabulary

    def get(self, *keys, default=None):
        """The first of ``keys`` the config sets (not None), else ``default``."""
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    @property
    def n_layers(self) -> int:
        return int(self.cfg["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.cfg["hidden_size"])

    @property
    def n_head(self) -> int:
        return int(self.cfg["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.cfg["hidden_size"] // self.n_head))

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model), under any of the usual config keys."""
        return int(self.get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)


@dataclass
class Out:
    """One GGUF tensor a spec produces: its GGUF name and where its rows come from."""

    name: str  # e.g. "blk.3.ffn_gate_exps.weight"
    source: RowSource


@dataclass
class TensorSet:
    """What :meth:`ArchSpec.tensors` returns: the outputs, and checkpoint tensors left out (with why)."""

    outs: list[Out]
    skipped: list[str]


# --------------------------------------------------------------------------- GGUF names


def kind_of(name: str) -> tuple[gguf.MODEL_TENSOR | None, int | None]:
    """``blk.3.attn_q.weight`` -> ``(MODEL_TENSOR.ATTN_Q, 3)``; unknown names give ``(None, bid)``."""
    base = name.rsplit(".", 1)[0]
    parts = base.split(".")
    bid = int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdecimal() else None
    for kind, tmpl in gguf.TENSOR_NAMES.items():
        if (tmpl.format(bid=bid) if "{bid}" in tmpl else tmpl) == base:
            return kind, bid
    return None, bid


def tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of ``kind`` (in layer ``bid``): ``tensor_name(M.ATTN_Q, 3)`` -> ``blk.3.attn_q.weight``."""
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


def stacked_experts(parts: dict[int, RowSource], n: int, what: str) -> Stack:
    """Per-expert sources ``{expert: source}`` stacked in expert order into ``[n, rows, cols]``.

    Raises:
        ConversionError: an expert is missing or there are more than ``n``.
    """
    missing = [e for e in range(n) if e not in parts]
    extra = sorted(e for e in parts if not 0 <= e < n)
    if missing or extra:
        raise ConversionError(f"{what}: experts {missing[:8] or extra[:8]} are {'missing' if missing else 'extra'} "
                              f"(config.json says {n} experts); the checkpoint is incomplete or does not match")
    return Stack([parts[e] for e in range(n)])


def split_stacked(src: RowSource, sizes: list[int]) -> list[RowSource]:
    """Split a fused projection along its rows: ``[E, sum(sizes), K]`` -> one ``[E, size, K]`` stack per
    part (a 2-D ``[sum(sizes), K]`` source gives 2-D parts). Each expert's slice is read in place."""
    if sum(sizes) != src.shape[-2]:
        raise ConversionError(f"{src.describe()}: {src.shape[-2]} rows cannot be split into {sizes}")
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if len(src.shape) == 2:
        return [Rows(src, a, b) for a, b in zip(bounds, bounds[1:])]
    refs = src.refs
    if not isinstance(src, Tensor) or len(src.shape) != 3:
        raise ConversionError(f"{src.describe()}: only a 3-D checkpoint tensor can be split per expert")
    return [Stack([Rows(Tensor(refs[0], index=e), a, b) for e in range(src.shape[0])])
            for a, b in zip(bounds, bounds[1:])]


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


def common_hparams(w: gguf.GGUFWriter, c: ArchContext) -> None:
    """Keys every decoder writes (mirrors llama.cpp's ``TextModel.set_gguf_parameters``)."""
    w.add_block_count(c.n_layers)
    if (n_ctx := c.get("max_position_embeddings")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(c.hidden)
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


def moe_hparams(w: gguf.GGUFWriter, c: ArchContext) -> None:
    """The routed-expert keys (llama.cpp's ``TextModel`` writes them from the same config fields)."""
    w.add_expert_count(c.n_experts)
    w.add_expert_used_count(int(c.get("num_experts_per_tok", "num_experts_per_token", "top_k_experts")))
    if (ff := c.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(int(ff))


def moe_shapes(c: ArchContext, ffn_exp: int, shared_ffn: int = 0) -> dict:
    """Expected shapes of the MoE tensors (router, stacked experts, shared expert and its gate)."""
    h, e = c.hidden, c.n_experts
    w = {M.FFN_GATE_INP: (e, h), M.FFN_GATE_EXP: (e, ffn_exp, h), M.FFN_UP_EXP: (e, ffn_exp, h),
         M.FFN_DOWN_EXP: (e, h, ffn_exp), M.FFN_EXP_PROBS_B: (e,)}
    if shared_ffn:
        w.update({M.FFN_GATE_SHEXP: (shared_ffn, h), M.FFN_UP_SHEXP: (shared_ffn, h),
                  M.FFN_DOWN_SHEXP: (h, shared_ffn), M.FFN_GATE_INP_SHEXP: (1, h)})
    out = {(k, "weight"): v for k, v in w.items()}
    out[(M.FFN_EXP_PROBS_B, "bias")] = out.pop((M.FFN_EXP_PROBS_B, "weight"))
    return out


def sparse_layers(c: ArchContext) -> list[bool]:
    """Which layers are MoE, from ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen-MoE) or
    ``first_k_dense_replace`` (DeepSeek); every layer when the config says nothing."""
    dense = set(c.get("mlp_only_layers", default=[]) or [])
    step = int(c.get("decoder_sparse_step", default=1) or 1)
    first = int(c.get("first_k_dense_replace", default=0) or 0)
    return [i not in dense and (i + 1) % step == 0 and i >= first for i in range(c.n_layers)]


# --------------------------------------------------------------------------- the spec


class ArchSpec:
    """One architecture's converter. Subclasses set the class attributes and override what differs.

    Attributes:
        name: the row's name (``edgeinfer convert`` messages, ``--dry-run``).
        hf_architectures: ``config.json`` ``architectures`` entries this spec takes.
        model_types: ``model_type`` values it takes when ``architectures`` is absent.
        gguf_arch: the GGUF architecture it writes.
        name_prefixes: HF name prefixes rewritten to ``model.`` before mapping (multimodal wrappers).
        spm_add_space_prefix: force ``tokenizer.ggml.add_space_prefix`` for SentencePiece vocabularies.
        trims_vocab: embedding / output rows beyond the tokenizer's size are dropped (llama.cpp
            requires equal sizes); otherwise the vocabulary is padded to the rows.
    """

    name: str = ""
    hf_architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    gguf_arch: gguf.MODEL_ARCH
    name_prefixes: tuple[str, ...] = ()
    spm_add_space_prefix: bool | None = None
    trims_vocab: bool = False
    #: Per-expert checkpoint tensors (``...experts.5.w1.weight``): the index is cut out and the
    #: experts of one merged name (``...experts.w1.weight``) become one stacked 3-D tensor.
    expert_index = re.compile(r"\.experts\.(\d+)\.")

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # -- plan-time checks and metadata ---------------------------------------------------------
    def vocab(self, folder: Path, n_vocab: int) -> Vocab:
        """The tokenizer as GGUF metadata (default: BPE ``tokenizer.json`` or SentencePiece
        ``tokenizer.model``, :func:`~edgeinfer.quant.vocab.load_vocab`). Raises ConversionError."""
        return load_vocab(folder, n_vocab, spm_add_space_prefix=self.spm_add_space_prefix)

    def check(self, c: ArchContext) -> None:
        """Refuse config combinations this architecture (or llama.cpp) cannot express. Raises ConversionError."""

    def llama_cpp_limits(self, c: ArchContext) -> list[str]:
        """Why stock llama.cpp cannot run this config correctly (it would refuse the file, or
        hard-codes something the config changes); empty when it can. The converter refuses such a
        config unless asked for a file only edgeinfer's torch engine runs (``--torch-only``)."""
        return []

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        """Write the architecture's metadata keys (``w.add_*``). Runs at plan time, on a recorder."""
        common_hparams(w, c)

    # -- tensors -----------------------------------------------------------------------------
    def tensors(self, ck: "Checkpoint", c: ArchContext) -> TensorSet:
        """Every GGUF tensor of the file (default: each checkpoint tensor mapped one to one)."""
        name_map = gguf.get_tensor_name_map(self.gguf_arch, c.n_layers)
        outs, skipped = [], []
        experts: dict[str, dict[int, RowSource]] = {}  # merged name -> expert -> source
        first: dict[str, object] = {}
        for ref in sorted(ck.tensors.values(), key=lambda r: (str(r.file), r.start)):
            if self.skip(ref.name, c):
                skipped.append(ref.name)
                continue
            m = self.expert_index.search(ref.name)
            if m is not None:
                merged = ref.name[:m.start()] + ".experts." + ref.name[m.end():]
                experts.setdefault(merged, {})[int(m.group(1))] = Tensor(ref)
                first.setdefault(merged, ref)
                continue
            outs.append(self._mapped(name_map, ref.name, Tensor(ref), c, ref))
        for merged, parts in experts.items():
            ref = first[merged]
            src = stacked_experts(parts, c.n_experts or len(parts), f"{ref.file}: {merged}")
            outs.append(self._mapped(name_map, merged, src, c, ref))
        outs.extend(self.generated(c))
        return TensorSet(outs, skipped)

    def _mapped(self, name_map, hf_name: str, src: RowSource, c: ArchContext, ref) -> Out:
        gname = self.gguf_name(name_map, hf_name)
        if gname is None:
            raise ConversionError(f"{ref.file}: tensor {ref.name!r} has no GGUF name for architecture "
                                  f"{self.name}; the checkpoint does not match its config.json")
        kind, _ = kind_of(gname)
        return Out(gname, self.rows(kind, hf_name, src, c))

    def skip(self, hf_name: str, c: ArchContext) -> bool:
        """Checkpoint tensors that carry nothing for the GGUF (rotary caches, multimodal towers)."""
        return hf_name.endswith(SKIP_SUFFIXES) or hf_name.startswith(MULTIMODAL_PREFIXES)

    def gguf_name(self, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor via ``TensorNameMap`` (None if it has none)."""
        name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")  # DeepSeek's router bias
        for p in self.name_prefixes:
            if name.startswith(p):
                rest = name[len(p):]
                name = rest if rest.startswith("lm_head") else "model." + rest
                break
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is not None and not gname.endswith((".weight", ".bias")):
            gname += ".weight"  # a parameter stored without a suffix (transformers' fused 3-D experts)
        return gname

    def rows(self, kind: gguf.MODEL_TENSOR | None, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        """Row-local fix-ups of one mapped tensor (default: none)."""
        return src

    def generated(self, c: ArchContext) -> list[Out]:
        """Tensors computed from the config (e.g. ``rope_freqs``)."""
        return []

    # -- shapes and completeness ------------------------------------------------------------------
    def shapes(self, c: ArchContext, bid: int | None) -> dict[tuple[gguf.MODEL_TENSOR, str], tuple[int, ...]]:
        """Expected shape (numpy order) of each ``(kind, suffix)`` in layer ``bid`` (suffix: ``"weight"``,
        ``"bias"``, ``"scale"``; ``bid=None``: the tensors outside the layers). Kinds not listed are not checked."""
        h, hd, ff = c.hidden, c.head_dim, int(c.cfg["intermediate_size"])
        q, kv = c.n_head * hd, c.n_head_kv * hd
        w = {M.OUTPUT_NORM: (h,), M.ATTN_NORM: (h,), M.FFN_NORM: (h,), M.ATTN_POST_NORM: (h,),
             M.FFN_POST_NORM: (h,), M.ATTN_Q: (q, h), M.ATTN_K: (kv, h), M.ATTN_V: (kv, h), M.ATTN_OUT: (h, q),
             M.FFN_GATE: (ff, h), M.FFN_UP: (ff, h), M.FFN_DOWN: (h, ff), M.ATTN_Q_NORM: (hd,), M.ATTN_K_NORM: (hd,)}
        out = {(k, "weight"): s for k, s in w.items()}
        out.update({(M.ATTN_Q, "bias"): (q,), (M.ATTN_K, "bias"): (kv,), (M.ATTN_V, "bias"): (kv,)})
        return out

    def layer_stems(self, c: ArchContext, bid: int) -> set[str] | None:
        """The tensors (``attn_q.weight``, ...) layer ``bid`` must have; None: the same as layer 0."""
        return None
