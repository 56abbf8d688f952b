"""llama.cpp's per-tensor type recipes (Q4_K_M, Q5_K_S, Q6_K, ...) as data plus a small engine.

Reference: src/llama-quant.cpp (``tensor_allows_quantization``, ``tensor_get_category``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``).  What the engine reproduces:

* which tensors are quantized at all (2-D/3-D ``*weight`` tensors that are not norms,
  routers, positional tables, ...); the others keep ``ctx.unquantized_type`` (F32);
* the recipe's default type, then the rules of the tensor's category (first matching
  chain rule, then the "post" rules in order), e.g. ``attn_v`` and ``ffn_down`` get Q6_K
  on llama.cpp's ``use_more_bits`` layers in Q4_K_M/Q5_K_M, 8-expert MoE models get
  Q8_0 ``attn_v``/``attn_k`` and Q5_K ``attn_output``;
* the output projection (and the token embedding when it is tied to it -- llama.cpp's
  token_embd category, which includes Gemma's ``per_layer_token_embd``) -> Q6_K, or
  Q8_0 when its row is not a multiple of the recipe's block;
* rows whose length is not a multiple of the block fall back (Q4_K -> Q5_0, Q5_K ->
  Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0; F16 when even that does not fit).

llama.cpp numbers the ``attn_v`` tensors in the order it visits tensors (layer, then
name), so :func:`plan` sees the whole model at once; :func:`choose_type` is the
single-tensor view of the same engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gguf
from gguf import GGMLQuantizationType as QT

# ----------------------------------------------------------------------------- data

# recipe -> default tensor type (llama_ftype_get_default_type) and llama.cpp file type
RECIPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "F32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (QT.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (QT.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "Q2_K": (QT.Q2_K, gguf.LlamaFileType.MOSTLY_Q2_K),
    "Q3_K_S": (QT.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_S),
    "Q3_K_M": (QT.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_M),
    "Q3_K_L": (QT.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_L),
    "Q4_K_S": (QT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (QT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_S": (QT.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_S),
    "Q5_K_M": (QT.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (QT.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# tensor_type_fallback: a 256-block type whose block does not divide the row
FALLBACK: dict[QT, QT] = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0,
                          QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}

# name fragments of tensors llama.cpp never quantizes (tensor_allows_quantization)
NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                 "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                 "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
                 "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
                 "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                 "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                 "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
                 ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
                 ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
NOT_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

# tensor_get_category: (category, exact names or substring), first match wins
CATEGORIES: tuple[tuple[str, str, bool], ...] = (
    ("output", "output.weight", True),
    ("token_embd", "token_embd.weight", True),
    ("token_embd", "per_layer_token_embd.weight", True),
    ("attn_v", "attn_qkv.weight", False),        # attn_qkv and attn_kv_b count as attn_v
    ("attn_v", "attn_kv_b.weight", False),
    ("attn_v", "attn_v.weight", False),
    ("attn_k", "attn_k.weight", False),
    ("attn_q", "attn_q.weight", False),
    ("attn_output", "attn_output.weight", False),
    ("ffn_up", "ffn_up", False),
    ("ffn_gate", "ffn_gate", False),
    ("ffn_down", "ffn_down", False),
)


@dataclass(frozen=True)
class RecipeContext:
    """Model facts the rules look at (llama.cpp reads them from the GGUF hparams)."""

    n_layer: int                       # block_count (n_layer_all)
    arch: str = "llama"                # GGUF architecture name
    n_expert: int = 0
    n_head: int = 1
    n_head_kv: int = 1
    model_type: str = ""               # llama.cpp's size label where it matters ("70B")
    has_imatrix: bool = False
    unquantized_type: QT = QT.F32      # type of tensors that are not quantized (norms, routers)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass
class _State:
    """What one rule sees: the context, the tensor's layer position and the type so far."""

    ctx: RecipeContext
    i: int            # attn_v: index among attn_v tensors; ffn_*: layer index
    n: int            # attn_v: number of attn_v tensors; ffn_*: number of layers
    cur: QT


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer rule: first and last eighth, and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# named predicates the rule table refers to
WHEN: dict[str, Callable[[_State], bool]] = {
    "always": lambda s: True,
    "more_bits": lambda s: use_more_bits(s.i, s.n),
    "first_4": lambda s: s.i < 4,
    "first_2": lambda s: s.i < 2,
    "first_8th": lambda s: s.i < s.n // 8,
    "first_16th": lambda s: s.i < s.n // 16,
    "gqa_ge_4": lambda s: s.ctx.n_gqa >= 4,
    "falcon": lambda s: s.ctx.arch == "falcon",
    "not_falcon": lambda s: s.ctx.arch != "falcon",
    "falcon_first_16th": lambda s: s.ctx.arch == "falcon" and s.i < s.n // 16,
    "falcon_more_bits": lambda s: s.ctx.arch == "falcon" and use_more_bits(s.i, s.n),
    "not_falcon_or_more_bits": lambda s: s.ctx.arch != "falcon" or use_more_bits(s.i, s.n),
    "not_falcon_first_8th": lambda s: s.ctx.arch != "falcon" and s.i < s.n // 8,
    "imatrix_first_8th": lambda s: s.ctx.has_imatrix and s.i < s.n // 8,
    "experts_8": lambda s: s.ctx.n_expert == 8,
    "not_falcon_experts_8": lambda s: s.ctx.arch != "falcon" and s.ctx.n_expert == 8,
    "not_falcon_dense": lambda s: s.ctx.arch != "falcon" and s.ctx.n_expert != 8,
    "70b_q3_q4": lambda s: s.ctx.model_type == "70B" and s.cur in (QT.Q3_K, QT.Q4_K),
}


@dataclass(frozen=True)
class Rule:
    """In category ``category``, for these recipes, when ``when`` holds: use ``then``.

    Chain rules (``post=False``): the first one that matches decides (llama.cpp's
    ``else if`` ladder).  Post rules then apply in order on top of the result.
    """

    category: str
    recipes: tuple[str, ...]
    when: str
    then: QT
    post: bool = False


RULES: tuple[Rule, ...] = (
    # attn_v (and attn_qkv / attn_kv_b); i = index among attn_v tensors
    Rule("attn_v", ("Q2_K",), "gqa_ge_4", QT.Q4_K),
    Rule("attn_v", ("Q2_K",), "always", QT.Q3_K),
    Rule("attn_v", ("Q3_K_M",), "first_2", QT.Q5_K),
    Rule("attn_v", ("Q3_K_M",), "always", QT.Q4_K),
    Rule("attn_v", ("Q3_K_L",), "always", QT.Q5_K),
    Rule("attn_v", ("Q4_K_M", "Q5_K_M"), "more_bits", QT.Q6_K),
    Rule("attn_v", ("Q4_K_S",), "first_4", QT.Q5_K),
    Rule("attn_v", ("*",), "70b_q3_q4", QT.Q5_K, post=True),
    Rule("attn_v", ("*",), "experts_8", QT.Q8_0, post=True),
    # attn_k
    Rule("attn_k", ("*",), "experts_8", QT.Q8_0),
    # ffn_down; i = layer index
    Rule("ffn_down", ("Q2_K",), "always", QT.Q3_K),
    Rule("ffn_down", ("Q3_K_M",), "first_16th", QT.Q5_K),
    Rule("ffn_down", ("Q3_K_M",), "not_falcon_or_more_bits", QT.Q4_K),
    Rule("ffn_down", ("Q3_K_M",), "always", QT.Q3_K),
    Rule("ffn_down", ("Q3_K_L",), "falcon", QT.Q4_K),
    Rule("ffn_down", ("Q3_K_L",), "always", QT.Q5_K),
    Rule("ffn_down", ("Q4_K_M",), "falcon_first_16th", QT.Q6_K),
    Rule("ffn_down", ("Q4_K_M",), "falcon_more_bits", QT.Q5_K),
    Rule("ffn_down", ("Q4_K_M",), "falcon", QT.Q4_K),
    Rule("ffn_down", ("Q4_K_M", "Q5_K_M"), "more_bits", QT.Q6_K),
    Rule("ffn_down", ("Q4_K_S",), "not_falcon_first_8th", QT.Q5_K),
    Rule("ffn_down", ("Q4_0",), "imatrix_first_8th", QT.Q4_1),
    Rule("ffn_down", ("Q5_0",), "imatrix_first_8th", QT.Q5_1),
    # attn_output
    Rule("attn_output", ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"), "not_falcon_experts_8", QT.Q5_K),
    Rule("attn_output", ("Q2_K",), "not_falcon_dense", QT.Q3_K),
    Rule("attn_output", ("Q3_K_M",), "not_falcon_dense", QT.Q4_K),
    Rule("attn_output", ("Q3_K_L",), "not_falcon_dense", QT.Q5_K),
    Rule("attn_output", ("Q3_K_L",), "falcon", QT.Q4_K),
)


# --------------------------------------------------------------------------- engine

class RecipeError(ValueError):
    """Unknown recipe, or a tensor no type can hold."""


def recipe_names() -> list[str]:
    """The recipes ``--qtype`` accepts, in table order."""
    return list(RECIPES)


def layer_of(name: str) -> int:
    """The N of ``blk.N.``, or -1 (llama.cpp's sscanf in its name comparator)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(name: str) -> tuple[int, str]:
    """Sort key of llama.cpp's ``weight_name_comparer``: layer number, then name."""
    return layer_of(name), name


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category`` ("other" when none applies)."""
    for cat, frag, exact in CATEGORIES:
        if (name == frag) if exact else (frag in name):
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for a tensor of GGUF shape (ne0, ne1, ...)."""
    n_dims = max([i + 1 for i, d in enumerate(shape) if d > 1] or [1])   # ggml_n_dims
    if n_dims < 2:
        return False
    if not name.endswith("weight") or name in NOT_QUANTIZED_EXACT:
        return False
    return not any(frag in name for frag in NOT_QUANTIZED)


def block_size(t: QT) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def fallback(t: QT, ncols: int) -> tuple[QT, str]:
    """llama.cpp's ``tensor_type_fallback`` for a row of ``ncols`` values: (type, reason)."""
    bs = block_size(t)
    if ncols % bs == 0:
        return t, ""
    if t in FALLBACK:
        new = FALLBACK[t]
    elif bs <= 32:
        new = t
    else:
        raise RecipeError(f"no fallback is defined for {t.name} rows of {ncols} values")
    if ncols % block_size(new) != 0:
        new = QT.F16
    return new, f"row of {ncols} not divisible by {bs} ({t.name}) -> {new.name}"


def _apply_rules(cat: str, recipe: str, s: _State) -> tuple[QT, str]:
    """Run the chain rules then the post rules of ``cat``; (type, reason)."""
    reason = ""
    for r in RULES:
        if r.category == cat and not r.post and (recipe in r.recipes or "*" in r.recipes) and WHEN[r.when](s):
            s.cur, reason = r.then, f"{cat} rule {r.when}"
            break
    for r in RULES:
        if r.category == cat and r.post and (recipe in r.recipes or "*" in r.recipes) and WHEN[r.when](s):
            s.cur, reason = r.then, f"{cat} rule {r.when}"
    return s.cur, reason


@dataclass(frozen=True)
class PlanEntry:
    """One tensor of a plan: GGUF name and shape (ne0 first), chosen type and why."""

    name: str
    shape: tuple[int, ...]
    ggml_type: QT
    reason: str = ""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        bs, ts = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return n // bs * ts


def plan(tensors: list[tuple[str, tuple[int, ...]]], recipe: str, ctx: RecipeContext,
         pure: bool = False) -> list[PlanEntry]:
    """Types for every tensor of a model, as ``llama_model_quantize`` chooses them.

    Args:
        tensors: (GGUF name, GGUF shape with ne0 first) for every tensor of the model.
        recipe: a key of RECIPES (e.g. "Q4_K_M").
        ctx: the model's hyper-parameters.
        pure: like llama-quantize --pure: no per-category rules (fallbacks still apply).
    Returns:
        PlanEntry per tensor, in the order given.
    Raises:
        RecipeError: unknown recipe.
    """
    if recipe not in RECIPES:
        raise RecipeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    default = RECIPES[recipe][0]
    names = [n for n, _ in tensors]
    n_wv = sum(1 for n in names if category(n) == "attn_v")
    tied = "output.weight" not in names
    out: dict[int, PlanEntry] = {}
    i_wv = i_down = 0
    for k in sorted(range(len(tensors)), key=lambda j: llama_order(tensors[j][0])):
        name, shape = tensors[k][0], tuple(int(d) for d in tensors[k][1])
        if not allows_quantization(name, shape):
            out[k] = PlanEntry(name, shape, ctx.unquantized_type, "not quantized")
            continue
        if default in FLOAT_TYPES:
            out[k] = PlanEntry(name, shape, default)
            continue
        cur, why = default, ""
        cat = category(name)
        if not pure:
            if cat == "output" or (tied and cat == "token_embd"):
                what = "output projection" if cat == "output" else "tied embedding (token_embd category)"
                if ctx.arch == "falcon" or shape[0] % block_size(default) != 0:
                    cur, why = QT.Q8_0, f"{what} (row not a block multiple) -> Q8_0"
                elif default != QT.Q8_0:
                    cur, why = QT.Q6_K, f"{what} -> Q6_K"
            elif cat == "attn_v":
                cur, why = _apply_rules(cat, recipe, _State(ctx, i_wv, n_wv, cur))
                i_wv += 1
            elif cat == "ffn_down":
                i = layer_of(name) if ctx.n_expert > 1 else i_down
                cur, why = _apply_rules(cat, recipe, _State(ctx, i, ctx.n_layer, cur))
                i_down += 1
            elif cat in ("attn_k", "attn_output"):
                cur, why = _apply_rules(cat, recipe, _State(ctx, layer_of(name), ctx.n_layer, cur))
        cur, fb = fallback(cur, shape[0])
        out[k] = PlanEntry(name, shape, cur, "; ".join(x for x in (why, fb) if x))
    return [out[k] for k in range(len(tensors))]


def choose_type(name: str, shape: tuple[int, ...], recipe: str, ctx: RecipeContext,
                tensor_names: tuple[str, ...] = ()) -> QT:
    """The type llama.cpp's ``recipe`` gives one tensor.

    ``tensor_names`` (all names of the model) makes the attn_v numbering and the tied-
    embedding test exact; without it a standard layout is assumed (one attn_v per layer,
    token embedding tied to the output when no "output.weight" is known).
    """
    if tensor_names:
        others = [(n, (256, 256)) for n in tensor_names if n != name]
    else:
        others = [(f"blk.{i}.attn_v.weight", (256, 256)) for i in range(ctx.n_layer)
                  if f"blk.{i}.attn_v.weight" != name]
        if category(name) == "ffn_down" and ctx.n_expert <= 1:
            others += [(f"blk.{i}.ffn_down.weight", (256, 256)) for i in range(layer_of(name))]
    entries = plan(others + [(name, tuple(shape))], recipe, ctx)
    return entries[-1].ggml_type


def format_plan(entries: list[PlanEntry]) -> str:
    """A dry-run table: name, shape, type, size, reason; then the totals."""
    lines = [f"{'tensor':40s} {'shape':>20s} {'type':>6s} {'MiB':>9s}  reason"]
    total = 0
    for e in entries:
        total += e.nbytes
        shape = "x".join(str(d) for d in e.shape)
        lines.append(f"{e.name:40s} {shape:>20s} {e.ggml_type.name:>6s} {e.nbytes / 2**20:9.3f}  {e.reason}")
    n = sum(_numel(e.shape) for e in entries)
    lines.append(f"total {total / 2**20:.2f} MiB, {8 * total / max(n, 1):.2f} bits per weight")
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
