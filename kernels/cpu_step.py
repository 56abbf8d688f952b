"""The whole CPU decode step in one call of the compiled kernels (``eg_step`` in ``_ggmlcpu_step.h``).

For one token, every layer of a plain pre-norm decoder -- RMSNorm, q/k/v (optionally biased,
optionally per-head q/k RMSNorm), RoPE from the model's own tables, attention over the layer's
float32 KV cache, output projection, residual, RMSNorm, SwiGLU MLP, residual -- then the final
norm and the LM head run in C, the matmuls on the GGML blocks as stored
(:mod:`edgeinfer.kernels.ggml_cpu`): one Python call per token instead of ~1,500 torch ops.

:func:`build` reads a loaded :class:`~edgeinfer.models.base.Transformer` (its modules, norms,
RoPE tables and caches; the models themselves are untouched) and returns a :class:`DecodeStep`,
or None when the model is outside what the step computes (another block, attention or MLP type,
sandwich norms, windows, KV sharing, GeGLU, a layer on another kernel path, ...): the engine then
keeps running the model's own forward. The step writes the same cache the forward reads, so the
prompt goes through the forward (batched) and the tokens after it through the step.

Oracle: the model's forward on the same kernels (``tests/test_cpu_step.py``: logits after
prefill + decode steps agree within float32 rounding of the attention and norm sums).
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from edgeinfer.kernels import ggml_cpu
from edgeinfer.kernels.ggml_cpu import Mat
from edgeinfer.kernels.qlinear import FusedLinear, QuantEmbedding, QuantLinear
from edgeinfer.models.base import MLP, Attention, Block, Transformer

log = logging.getLogger(__name__)
_P = ctypes.c_void_p


class Layer(ctypes.Structure):
    """``eg_layer``."""

    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("q_norm", _P), ("k_norm", _P), ("bq", _P), ("bk", _P),
                ("bv", _P), ("qkv", Mat * 3), ("o", Mat), ("gate", Mat), ("up", Mat), ("down", Mat),
                ("kc", _P), ("vc", _P)]


class Model(ctypes.Structure):
    """``eg_model``."""

    _fields_ = [(n, ctypes.c_int32) for n in ("n_layer", "dim", "n_head", "n_kv", "head_dim", "ffn", "n_ctx",
                                              "vocab", "n_rot", "neox")] + \
               [("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("softcap", ctypes.c_float),
                ("rope_cos", _P), ("rope_sin", _P), ("layers", _P), ("out_norm", _P), ("out", Mat),
                ("scratch", _P)]


class Unsupported(Exception):
    """The model has something the fused step does not compute (the message says what)."""


def _mats(lin) -> list[Mat]:
    """The kernel matrices of a QuantLinear / FusedLinear on the ggml-cpu path."""
    if isinstance(lin, (QuantLinear, FusedLinear)) and lin.path == "ggml-cpu":
        return list((lin.native if isinstance(lin, QuantLinear) else lin.packed).mats)
    raise Unsupported(f"{getattr(lin, 'name', type(lin).__name__)} is not on the ggml-cpu kernel path "
                      f"({getattr(lin, 'path', '?')})")


def _biases(lin) -> list:
    return list(lin.biases) if isinstance(lin, FusedLinear) else [lin.bias]


def _f32(t: torch.Tensor | None, keep: list) -> int | None:
    if t is None:
        return None
    t = t.detach().to(torch.float32).contiguous()
    keep.append(t)
    return t.data_ptr()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Unsupported(what)


class DecodeStep:
    """``step(token, pos) -> logits [vocab]`` float32 for a model :func:`build` accepted."""

    def __init__(self, model: Transformer, seq: int = 0):
        self.model, self.seq = model, seq  # seq: the cache set it reads and writes (Transformer.add_sequences)
        self._build()

    def _cache(self, attn):
        return attn.caches[self.seq] if self.seq else attn.cache

    def _build(self) -> None:
        m, keep = self.model, []
        layers = list(m.layers)
        a0 = layers[0].attn
        rope, eps = a0.rope, layers[0].attn_norm.eps
        layer_structs = (Layer * len(layers))()
        ffn = 0
        for i, blk in enumerate(layers):
            _check(type(blk) is Block and not blk.sandwich, f"layer {i} is not a plain pre-norm block")
            at, mlp = blk.attn, blk.ffn
            _check(type(at) is Attention and type(mlp) is MLP, f"layer {i} has another attention / FFN type")
            c = at.c
            _check(c.kv_from is None and not c.k_eq_v and not c.v_norm and at.window == 0 and at.core is None,
                   f"layer {i}: KV sharing, keys-as-values, value norm, a window or a numerics policy")
            _check(at.rope is rope, f"layer {i} has its own RoPE")
            _check(mlp.act is F.silu, f"layer {i}: MLP activation is not silu")
            cache = self._cache(at)
            _check(cache.k.dtype == torch.float32 and not cache.ring and cache.size == m.n_ctx,
                   f"layer {i}: cache is not a full float32 cache")
            _check((at.n_head, at.n_kv, at.hd) == (a0.n_head, a0.n_kv, a0.hd), f"layer {i} has other head sizes")
            norms = [blk.attn_norm, blk.ffn_norm] + ([at.attn_q_norm, at.attn_k_norm] if c.qk_norm else [])
            _check(all(n.eps == eps and n.weight is not None for n in norms), f"layer {i}: norm eps differ")
            if at.qkv is not None:
                qkv, biases = _mats(at.qkv), _biases(at.qkv)
            else:
                parts = [at.attn_q, at.attn_k, at.attn_v]
                qkv, biases = [_mats(p)[0] for p in parts], [p.bias for p in parts]
            _check(len(qkv) == 3, f"layer {i}: q/k/v are not three matrices")
            g, u, d = mlp.stems
            if mlp.gate_up is not None:
                gate, up = _mats(mlp.gate_up)
            else:
                gate, up = _mats(getattr(mlp, g))[0], _mats(getattr(mlp, u))[0]
            down, o = _mats(getattr(mlp, d))[0], _mats(at.attn_output)[0]
            _check(at.attn_output.bias is None and getattr(mlp, d).bias is None, f"layer {i}: output biases")
            _check(ffn in (0, gate.n), f"layer {i} has another FFN width")
            ffn = gate.n
            L = layer_structs[i]
            L.attn_norm, L.ffn_norm = _f32(blk.attn_norm.weight, keep), _f32(blk.ffn_norm.weight, keep)
            if c.qk_norm:
                L.q_norm, L.k_norm = _f32(at.attn_q_norm.weight, keep), _f32(at.attn_k_norm.weight, keep)
            L.bq, L.bk, L.bv = (_f32(b, keep) for b in biases)
            for j in range(3):
                L.qkv[j] = qkv[j]
            L.o, L.gate, L.up, L.down = o, gate, up, down
            L.kc, L.vc = cache.k.data_ptr(), cache.v.data_ptr()
        _check(type(m).forward is Transformer.forward and type(m).head is Transformer.head
               and type(m).layer_inputs is Transformer.layer_inputs, "the model has its own forward / head")
        _check(m.output.bias is None and m.output_norm.eps == eps, "the head has a bias or another norm eps")
        out = _mats(m.output)[0]
        s = Model(n_layer=len(layers), dim=m.args.dim, n_head=a0.n_head, n_kv=a0.n_kv, head_dim=a0.hd, ffn=ffn,
                  n_ctx=m.n_ctx, vocab=out.n, n_rot=rope.n_rot, neox=int(rope.style == "neox"), eps=eps,
                  attn_scale=a0.scale, softcap=float(m.args.final_softcap or 0.0))
        _check(s.dim == out.k and layer_structs[0].qkv[0].n == s.n_head * s.head_dim, "unexpected shapes")
        _check(rope.cos.shape[0] >= m.n_ctx, "RoPE table shorter than the context")
        s.rope_cos, s.rope_sin = _f32(rope.cos, keep), _f32(rope.sin, keep)
        s.layers = ctypes.addressof(layer_structs)
        s.out_norm = _f32(m.output_norm.weight, keep)
        s.out = out
        self.scratch = torch.empty(int(ggml_cpu.LIB.eg_step_scratch(ctypes.byref(s))), dtype=torch.float32)
        s.scratch = self.scratch.data_ptr()
        self.struct, self.layers, self.keep = s, layer_structs, keep
        self.cache0 = self._cache(a0).k
        emb = m.token_embd
        self.embed_mat = None
        if type(emb) is QuantEmbedding and ggml_cpu.can_run(emb.qtype, emb.raw.shape[0], emb.dim) \
                and emb.raw.stride(1) == 1:
            self.embed_mat = ggml_cpu.mat(emb.raw, emb.qtype, emb.raw.shape[0], emb.dim)
        self.embed_scale = float(m.args.embed_scale)
        self.vocab, self.dim = s.vocab, s.dim

    def _embed(self, tok: int) -> torch.Tensor:
        if self.embed_mat is None:
            return self.model.embed(torch.tensor([[tok]]))[0, 0].float().contiguous().clone()
        h = torch.empty(self.dim, dtype=torch.float32)
        if ggml_cpu.LIB.eg_dequant(ctypes.byref(self.embed_mat), tok, tok + 1, h.data_ptr(), 0, 1) != 0:
            raise IndexError(f"token id {tok} is outside the vocabulary")
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    @torch.inference_mode()
    def __call__(self, tok: int, pos: int) -> torch.Tensor:
        """Logits [vocab] float32 for token ``tok`` at position ``pos`` (its K/V enter the cache)."""
        if self._cache(self.model.layers[0].attn).k is not self.cache0:  # caches re-allocated (model.setup)
            self._build()
        if not 0 <= pos < self.model.n_ctx:
            raise IndexError(f"position {pos} exceeds the context of {self.model.n_ctx}")
        h = self._embed(tok)
        logits = torch.empty(self.vocab, dtype=torch.float32)
        if ggml_cpu.LIB.eg_step(ctypes.byref(self.struct), h.data_ptr(), pos, logits.data_ptr(),
                                ggml_cpu.threads()) != 0:
            raise RuntimeError("the fused decode step failed (out of memory?)")
        return logits


def build(model: Transformer, seq: int = 0) -> DecodeStep | None:
    """The fused decode step of ``model`` over sequence ``seq``'s caches, or None (kernels absent, or
    a model it does not cover; logged)."""
    if not ggml_cpu.available():
        return None
    try:
        return DecodeStep(model, seq)
    except Unsupported as e:
        log.info("fused CPU decode step not used: %s; decoding with the model's forward", e)
        return None
