"""Per-tensor type policy: which GGML type each tensor gets, and why.

A policy is any callable ``policy(t: TensorPlanInput) -> TypeDecision``; :func:`default_policy`
reproduces what llama.cpp does for the file types edgeinfer converts to directly (its converter
for F32/F16/BF16/Q8_0, ``llama-quantize``'s rules for Q4_0/Q4_1/Q5_0/Q5_1):

* 1-D tensors, norms and non-``.weight`` tensors stay F32 (llama.cpp's kernels expect F32 there);
* everything else gets the requested type, except the output projection (and the token embedding
  when it doubles as output) under a 4/5-bit type: llama.cpp gives it Q6_K (Q8_0 when the row is
  not a multiple of 256, or when no Q6_K encoder is registered);
* a row length not divisible by the block size falls back (F16 for the 32-blocks, as llama.cpp),
  with the reason logged and shown in the plan.

The planner decides the 4/5-bit types with the recipe engine instead (:class:`RecipePolicy`), which
also has llama-quantize's model-dependent rules (MoE, per-layer embeddings); this function is their
single-tensor approximation. A recipe (``recipes.py``, K-quant issue) replaces this function wholesale or wraps it. A policy
whose rules need the whole model (llama.cpp numbers ``attn_v`` tensors in visiting order) can be
an object with ``decide_all(inputs: list[TensorPlanInput]) -> list[TypeDecision]``; the planner
then passes every tensor at once, embeddings first, layers in order, output last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import gguf
from gguf import GGMLQuantizationType as T

from edgeinfer.quant.quantizers import REGISTRY

log = logging.getLogger(__name__)

# The --qtype choices this issue delivers -> llama.cpp file type (general.file_type).
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Tensor kinds llama.cpp keeps in F32 whatever the file type (see llama-quant.cpp / the converter).
ALWAYS_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES,
              gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ALTUP_CORRECT_COEF, gguf.MODEL_TENSOR.ALTUP_PREDICT_COEF)


@dataclass(frozen=True)
class TensorPlanInput:
    """What a policy may look at for one tensor."""

    name: str  # GGUF name, e.g. "blk.3.attn_q.weight"
    shape: tuple[int, ...]  # numpy order: [rows, cols]
    kind: gguf.MODEL_TENSOR | None  # tensor kind, if known
    block: int | None  # layer index
    n_layers: int
    base_type: T  # the type the user asked for
    tied_output: bool  # the token embedding is also the output projection


@dataclass(frozen=True)
class TypeDecision:
    """The type chosen for one tensor; a recipe may also attach its own encoder (e.g. imatrix-weighted)."""

    ggml_type: T
    reason: str = ""  # empty when the requested type applies as is
    encoder: Callable | None = None  # overrides the registry's encoder for this tensor only


Policy = Callable[[TensorPlanInput], TypeDecision]


def fallback_for_shape(t: TensorPlanInput, want: T, why: str = "") -> TypeDecision:
    """Apply llama.cpp's ``tensor_type_fallback``: a type whose block does not divide the row falls back."""
    if want in FLOAT_TYPES:
        return TypeDecision(want, why)
    cols = t.shape[-1]
    bs = gguf.GGML_QUANT_SIZES[want][0]
    if cols % bs == 0:
        return TypeDecision(want, why)
    demote = {T.Q6_K: T.Q8_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}.get(want, want)
    new = demote if cols % gguf.GGML_QUANT_SIZES[demote][0] == 0 and demote in REGISTRY else T.F16
    reason = f"row length {cols} not divisible by {bs} ({want.name}) -> {new.name}"
    log.warning("%s: %s", t.name, reason)
    return TypeDecision(new, reason)


def default_policy(t: TensorPlanInput) -> TypeDecision:
    """llama.cpp's type choice for the legacy file types (see module docstring)."""
    if len(t.shape) <= 1 or t.name.endswith("_norm.weight") or not t.name.endswith(".weight"):
        return TypeDecision(T.F32, "1-D/norm tensors stay F32" if t.base_type != T.F32 else "")
    if t.kind in ALWAYS_F32:
        return TypeDecision(T.F32, f"{t.kind.name.lower()} stays F32")
    want = t.base_type
    is_output = t.kind == gguf.MODEL_TENSOR.OUTPUT or (t.tied_output and t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD)
    if is_output and want not in FLOAT_TYPES and want != T.Q8_0:
        cols = t.shape[-1]
        if cols % gguf.GGML_QUANT_SIZES[want][0] != 0:
            return TypeDecision(T.Q8_0, f"output: row length {cols} not divisible by {want.name} block -> Q8_0")
        if T.Q6_K in REGISTRY and cols % gguf.GGML_QUANT_SIZES[T.Q6_K][0] == 0:
            return TypeDecision(T.Q6_K, "output projection -> Q6_K (as llama-quantize)")
        why = "no Q6_K encoder registered" if T.Q6_K not in REGISTRY else f"row length {cols} not divisible by 256"
        return TypeDecision(T.Q8_0, f"output projection -> Q8_0 ({why})")
    return fallback_for_shape(t, want)


class RecipePolicy:
    """llama.cpp's per-tensor mixes (Q4_K_M, Q5_K_S, ...; ``recipes.py``) as a whole-model policy.

    The recipe engine numbers tensors the way llama-quantize visits them, so it decides all
    tensors at once (:meth:`decide_all`).
    """

    def __init__(self, recipe: str, n_layer: int, arch: str, n_head: int, n_head_kv: int, n_expert: int = 0,
                 has_imatrix: bool = False):
        from edgeinfer.quant import recipes

        self.recipes = recipes
        self.recipe = recipe
        # has_imatrix switches llama.cpp's imatrix-only rules (e.g. Q4_0/Q5_0: first 8th of ffn_down -> Q4_1/Q5_1)
        self.ctx = recipes.RecipeContext(n_layer=n_layer, arch=arch, n_head=n_head, n_head_kv=n_head_kv,
                                         n_expert=n_expert, has_imatrix=has_imatrix)

    def decide_all(self, inputs: list[TensorPlanInput]) -> list[TypeDecision]:
        # the engine takes GGUF shapes (ne0 = row length first)
        entries = self.recipes.plan([(i.name, tuple(reversed(i.shape))) for i in inputs], self.recipe, self.ctx)
        return [TypeDecision(e.ggml_type, e.reason) for e in entries]

    def __call__(self, t: TensorPlanInput) -> TypeDecision:
        return self.decide_all([t])[0]


def recipe_names() -> dict[str, tuple[T, gguf.LlamaFileType]]:
    """Mixes beyond :data:`FILE_TYPES` that ``recipes.py`` provides (empty if it is absent)."""
    try:
        from edgeinfer.quant import recipes
    except ImportError:
        return {}
    return {k: v for k, v in recipes.RECIPES.items() if k not in FILE_TYPES}
