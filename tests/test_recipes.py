"""Recipe type choices vs llama.cpp's quantizer (``llama_model_quantize``, not pure).

The type llama.cpp picks for a tensor depends only on its name, its row length (ne0),
its number of dimensions and the model's hyper-parameters, never on the values.  So
each model here is a "skeleton": the real tensor names and row lengths, two rows per
matrix.  The skeletons: the default model (SmolLM2-135M: 30 layers, rows of 576 that
force the 256-block fallbacks), a dense 12-layer model with an untied output and GQA 4,
an 8-expert MoE, and a model whose rows are not even multiples of 32 (F16 fallback).
"""

from __future__ import annotations

import functools
import gguf
import numpy as np
import pytest

import _llama_quant as lq
from edgeinfer.quant.recipes import RecipeContext, RecipeError, choose_type, format_plan, plan, use_more_bits

RECIPES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "Q2_K", "Q3_K_M"]


def _skeleton_tensors(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """GGUF shapes (ne0 first) -> small float32 arrays (numpy order), 2 rows per matrix."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes:
        small = (shape[0],) if len(shape) == 1 else (shape[0], 2) + tuple(shape[2:])
        out[name] = rng.standard_normal(tuple(reversed(small))).astype(np.float32)
    return out


@functools.lru_cache(maxsize=1)
def _default_model(path) -> tuple[list[tuple[str, tuple[int, ...]]], lq.Hparams, RecipeContext]:
    r = gguf.GGUFReader(str(path))          # parsing its 49k-token vocabulary takes seconds: once
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer")}
    hp = lq.Hparams(n_layer=f["llama.block_count"], n_embd=f["llama.embedding_length"],
                    n_ff=f["llama.feed_forward_length"], n_head=f["llama.attention.head_count"],
                    n_head_kv=f["llama.attention.head_count_kv"], n_vocab=f["llama.vocab_size"])
    shapes = [(t.name, tuple(int(d) for d in t.shape)) for t in r.tensors]
    return shapes, hp, _ctx(hp)


def _ctx(hp: lq.Hparams, **kw) -> RecipeContext:
    return RecipeContext(n_layer=hp.n_layer, n_expert=hp.n_expert, n_head=hp.n_head, n_head_kv=hp.n_head_kv, **kw)


def _dense(n_layer: int, n_embd: int, n_ff: int, untied: bool) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("token_embd.weight", (n_embd, 300)), ("output_norm.weight", (n_embd,))]
    if untied:
        shapes.append(("output.weight", (n_embd, 300)))
    kv = n_embd // 4
    for i in range(n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,)), (f"blk.{i}.attn_q.weight", (n_embd, n_embd)),
                   (f"blk.{i}.attn_k.weight", (n_embd, kv)), (f"blk.{i}.attn_v.weight", (n_embd, kv)),
                   (f"blk.{i}.attn_output.weight", (n_embd, n_embd)), (f"blk.{i}.ffn_norm.weight", (n_embd,)),
                   (f"blk.{i}.ffn_gate.weight", (n_embd, n_ff)), (f"blk.{i}.ffn_up.weight", (n_embd, n_ff)),
                   (f"blk.{i}.ffn_down.weight", (n_ff, n_embd))]
    return shapes


def _moe(n_layer: int, n_embd: int, n_ff: int, n_expert: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("token_embd.weight", (n_embd, 300)), ("output_norm.weight", (n_embd,))]
    for i in range(n_layer):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,)), (f"blk.{i}.attn_q.weight", (n_embd, n_embd)),
                   (f"blk.{i}.attn_k.weight", (n_embd, n_embd)), (f"blk.{i}.attn_v.weight", (n_embd, n_embd)),
                   (f"blk.{i}.attn_output.weight", (n_embd, n_embd)), (f"blk.{i}.ffn_norm.weight", (n_embd,)),
                   (f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_expert)),
                   (f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert)),
                   (f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff, n_expert)),
                   (f"blk.{i}.ffn_down_exps.weight", (n_ff, n_embd, n_expert))]
    return shapes


def _check(tmp_path, shapes, hp: lq.Hparams, recipe: str, ctx: RecipeContext, imatrix=None) -> None:
    """Quantize the skeleton with llama.cpp and compare every tensor's type with plan()."""
    src = lq.write_f32_gguf(tmp_path / "skel.gguf", _skeleton_tensors(shapes), hp)
    dst = lq.llama_quantize(src, tmp_path / f"skel-{recipe}.gguf", recipe, imatrix=imatrix)
    theirs = {n: t for n, (t, _) in lq.read_tensors(dst).items()}
    ours = plan(shapes, recipe, ctx)
    wrong = [(e.name, e.ggml_type.name, theirs[e.name].name) for e in ours if e.ggml_type != theirs[e.name]]
    counts: dict[str, int] = {}
    for e in ours:
        counts[e.ggml_type.name] = counts.get(e.ggml_type.name, 0) + 1
    print(f"{recipe}: {len(ours)} tensors, {len(wrong)} differ from llama.cpp; types {counts}")
    assert not wrong, f"{recipe}: (tensor, ours, llama.cpp) {wrong[:10]}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_model_types_match_llama_cpp(tmp_path, default_gguf, recipe):
    shapes, hp, ctx = _default_model(default_gguf)
    _check(tmp_path, shapes, hp, recipe, ctx)


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K"])
def test_dense_untied_types_match_llama_cpp(tmp_path, recipe):
    hp = lq.Hparams(n_layer=12, n_embd=512, n_ff=1376, n_head=8, n_head_kv=2)
    _check(tmp_path, _dense(12, 512, 1376, untied=True), hp, recipe, _ctx(hp))


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0"])
def test_moe_types_match_llama_cpp(tmp_path, recipe):
    hp = lq.Hparams(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_expert=8, n_expert_used=2)
    _check(tmp_path, _moe(4, 256, 512, 8), hp, recipe, _ctx(hp))


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q8_0"])
def test_rows_not_multiple_of_32_fall_back_to_f16(tmp_path, recipe):
    hp = lq.Hparams(n_layer=2, n_embd=80, n_ff=200, n_head=4, n_head_kv=4)
    _check(tmp_path, _dense(2, 80, 200, untied=False), hp, recipe, _ctx(hp))


def test_imatrix_bumps_first_ffn_down_of_q4_0(tmp_path):
    hp = lq.Hparams(n_layer=12, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8)
    shapes = _dense(12, 512, 1024, untied=True)
    imatrix = {n: np.ones(s[0], np.float32) for n, s in shapes if len(s) >= 2}
    _check(tmp_path, shapes, hp, "Q4_0", _ctx(hp, has_imatrix=True), imatrix=imatrix)


def test_choose_type_single_tensor_view(default_gguf):
    """choose_type without the tensor list equals plan() on the standard llama layout."""
    shapes, _, ctx = _default_model(default_gguf)
    for recipe in ("Q4_K_M", "Q5_K_S"):
        full = plan(shapes, recipe, ctx)
        single = [choose_type(n, s, recipe, ctx) for n, s in shapes]
        bad = [e.name for e, t in zip(full, single) if e.ggml_type != t]
        print(recipe, "choose_type disagreements:", len(bad))
        assert not bad


def test_layer_rule_and_plan_table():
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    hp = lq.Hparams(n_layer=8, n_embd=512, n_ff=1024)
    entries = plan(_dense(8, 512, 1024, untied=True), "Q4_K_M", _ctx(hp))
    text = format_plan(entries)
    print(text)
    assert "blk.0.attn_v.weight" in text and "Q6_K" in text and "bits per weight" in text
    with pytest.raises(RecipeError, match="unknown recipe"):
        plan([], "Q4_K_X", _ctx(hp))
