"""The whole CPU decode step in one call of the compiled kernels (``eg_step`` in ``_ggmlcpu_step.h``).

For one token, every layer -- RMSNorm, q/k/v (optionally biased, keys as values, value norm,
per-head q/k RMSNorm), RoPE from the layer's own tables, attention over the layer's float32 KV
cache (full, windowed, a ring buffer of the window, or another layer's: KV sharing), output
projection, sandwich norms, the dense gated MLP (SwiGLU or GeGLU), routed experts (router, top-k,
only the chosen experts' blocks read, a shared expert), Gemma 4's parallel dense + MoE FFN, the
per-layer embedding gate, the layer scale -- then the final norm, the LM head and soft-capping run
in C, the matmuls on the GGML blocks as stored (:mod:`edgeinfer.kernels.ggml_cpu`; float rows for
F32/F16/BF16 tensors): one Python call per token instead of hundreds of torch ops.

:func:`build` reads a loaded :class:`~edgeinfer.models.base.Transformer` (its modules, norms,
RoPE tables and caches; the models themselves are untouched) and returns a :class:`DecodeStep`,
or None when the model is outside what the step computes (another block or attention type, an own
forward, a routing the step does not implement, a layer on another kernel path, ...): the engine
then keeps running the model's own forward. The step writes the same cache the forward reads, so
the prompt goes through the forward (batched) and the tokens after it through the step.

Oracle: the model's forward on the same kernels (``tests/test_ggml_cpu.py``, ``tests/test_moe_models.py``,
``tests/test_gemma4_engine.py``: logits after prefill + decode steps agree within float32 rounding
of the sums, and within the 8-bit activations' rounding on quantized files).
"""

from __future__ import annotations

import ctypes
import logging
import math

import torch
from torch import nn

from edgeinfer.kernels import ggml_cpu
from edgeinfer.kernels.ggml_cpu import Mat
from edgeinfer.kernels.qlinear import FusedLinear, QuantEmbedding, QuantExpertLinear, QuantLinear
from edgeinfer.models.base import ACTIVATIONS, MLP, Attention, Block, RMSNorm, Transformer
from edgeinfer.models.moe import MoE

log = logging.getLogger(__name__)
_P = ctypes.c_void_p
_I = ctypes.c_int32
_ACT = {id(ACTIVATIONS["silu"]): 0, id(ACTIVATIONS["gelu_tanh"]): 1}
_MAX_TOP_K = 64  # eg_step's per-token expert arrays


class Moe(ctypes.Structure):
    """``eg_moe``."""

    _fields_ = [(n, _I) for n in ("n_expert", "top_k", "ffn", "act", "gemma", "norm_topk", "fused")] + \
               [("scale", ctypes.c_float), ("router", Mat)] + \
               [(n, _P) for n in ("router_scale", "expert_scale", "gate_up", "gate", "up", "down", "pre_norm",
                                  "post_dense", "post_moe")] + \
               [("sh_ffn", _I), ("sh_gated", _I)] + [(n, Mat) for n in ("sh_gate", "sh_up", "sh_down", "sh_gate_inp")]


class Layer(ctypes.Structure):
    """``eg_layer``."""

    _fields_ = [(n, _I) for n in ("n_head", "n_kv", "head_dim", "n_rot", "neox", "size", "ring", "window", "own_kv",
                                  "k_eq_v", "v_norm", "n_qkv", "ffn", "act")] + \
               [("attn_scale", ctypes.c_float), ("out_scale", ctypes.c_float)] + \
               [(n, _P) for n in ("rope_cos", "rope_sin", "attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm",
                                  "q_norm", "k_norm", "bq", "bk", "bv")] + \
               [("qkv", Mat * 3), ("o", Mat), ("gate", Mat), ("up", Mat), ("down", Mat), ("kc", _P), ("vc", _P),
                ("moe", _P), ("ple", _I), ("ple_gate", Mat), ("ple_proj", Mat), ("ple_norm", _P)]


class Model(ctypes.Structure):
    """``eg_model``."""

    _fields_ = [(n, _I) for n in ("n_layer", "dim", "n_ctx", "vocab", "ple_dim")] + \
               [("eps", ctypes.c_float), ("softcap", ctypes.c_float), ("layers", _P), ("out_norm", _P), ("out", Mat),
                ("ple_in", _P), ("scratch", _P)]


class Unsupported(Exception):
    """The model has something the fused step does not compute (the message says what)."""


def _float_mat(w: torch.Tensor, keep: list) -> Mat:
    w = w.detach()
    if w.dtype not in (torch.float32, torch.float16) or w.device.type != "cpu" or not w.is_contiguous():
        w = w.to("cpu", torch.float32).contiguous()
        keep.append(w)
    n, k = w.shape
    return Mat(w.data_ptr(), k * w.element_size(), 0 if w.dtype == torch.float32 else 1, n, k)


def _mats(lin, keep: list) -> list[Mat]:
    """The kernel matrices of a linear on the ggml-cpu path, or of its float weight (F32/F16/BF16 files)."""
    if isinstance(lin, FusedLinear) and lin.path == "ggml-cpu":
        return list(lin.packed.mats)
    if isinstance(lin, QuantLinear) and lin.path == "ggml-cpu":
        return list(lin.native.mats)
    if isinstance(lin, QuantLinear) and lin.path == "dense":
        return [_float_mat(lin.weight, keep)]
    if type(lin) is nn.Linear and lin.weight.device.type == "cpu":
        return [_float_mat(lin.weight, keep)]
    raise Unsupported(f"{getattr(lin, 'name', type(lin).__name__)} is not on the ggml-cpu kernel path "
                      f"({getattr(lin, 'path', '?')})")


def _mat(lin, keep: list) -> Mat:
    mats = _mats(lin, keep)
    _check(len(mats) == 1 and getattr(lin, "bias", None) is None, f"{getattr(lin, 'name', '?')}: fused or biased")
    return mats[0]


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


def _act(fn, what: str) -> int:
    _check(id(fn) in _ACT, f"{what}: activation is neither silu nor gelu (tanh)")
    return _ACT[id(fn)]


def _norm(n, eps: float, what: str, keep: list, weight: bool = True) -> int | None:
    _check(isinstance(n, RMSNorm) and type(n).forward is RMSNorm.forward and n.eps == eps
           and (n.weight is not None) == weight, f"{what}: another norm or epsilon")
    return _f32(n.weight, keep) if weight else None


def _expert_mats(proj, keep: list):
    _check(type(proj) is QuantExpertLinear, f"{getattr(proj, 'name', '?')}: experts not resident on the kernel path")
    return (Mat * proj.n_expert)(*(_mat(proj.expert(e), keep) for e in range(proj.n_expert)))


def _mlp(mlp, L, keep: list, i: int) -> None:
    _check(type(mlp) is MLP, f"layer {i}: another FFN type")
    g, u, d = mlp.stems
    if mlp.gate_up is not None:
        mats = _mats(mlp.gate_up, keep)
        _check(len(mats) == 2 and all(b is None for b in _biases(mlp.gate_up)), f"layer {i}: gate/up fused oddly")
        L.gate, L.up = mats
    else:
        L.gate, L.up = _mat(getattr(mlp, g), keep), _mat(getattr(mlp, u), keep)
    L.down = _mat(getattr(mlp, d), keep)
    L.ffn, L.act = L.gate.n, _act(mlp.act, f"layer {i} MLP")


class DecodeStep:
    """``step(token, pos) -> logits [vocab]`` float32 for a model :func:`build` accepted."""

    MAX_ROWS = 16  # rows one batched step takes at most (a longer run of tokens is a prompt: the forward)

    def __init__(self, model: Transformer, seq: int = 0):
        self.model, self.seq = model, seq  # seq: the cache set it reads and writes (Transformer.add_sequences)
        self._build()

    def _cache(self, attn):
        return attn.caches[self.seq] if self.seq else attn.cache

    def _attention(self, at, L, keep: list, eps: float, i: int) -> None:
        _check(type(at) is Attention and at.core is None, f"layer {i}: another attention type or a numerics policy")
        c = at.c
        cache = self._cache(at)
        _check(cache.k.dtype == torch.float32 and cache.v.dtype == torch.float32 and cache.k.is_contiguous()
               and cache.v.is_contiguous() and cache.v.shape[-1] == at.hd and cache.k.device.type == "cpu",
               f"layer {i}: cache is not a float32 CPU cache")
        _check(cache.ring or cache.size == self.model.n_ctx, f"layer {i}: cache shorter than the context")
        rope = at.rope
        _check(rope.cos.shape[0] >= self.model.n_ctx and rope.style in ("neox", "norm") and rope.n_rot <= at.hd,
               f"layer {i}: RoPE table")
        L.n_head, L.n_kv, L.head_dim, L.n_rot, L.neox = at.n_head, at.n_kv, at.hd, rope.n_rot, int(rope.style == "neox")
        L.size, L.ring, L.window = cache.size, int(cache.ring), at.window
        _check(cache.window == at.window, f"layer {i}: the cache's window differs from the layer's")
        L.own_kv, L.k_eq_v, L.v_norm = int(c.kv_from is None), int(c.k_eq_v), int(at.v_norm is not None)
        L.attn_scale = at.scale
        L.rope_cos, L.rope_sin = _f32(rope.cos, keep), _f32(rope.sin, keep)
        if at.v_norm is not None:
            _norm(at.v_norm, eps, f"layer {i} value norm", keep, weight=False)
        if c.qk_norm:
            L.q_norm = _norm(at.attn_q_norm, eps, f"layer {i} q norm", keep)
            if c.kv_from is None:
                L.k_norm = _norm(at.attn_k_norm, eps, f"layer {i} k norm", keep)
        if at.qkv is not None:
            qkv, biases = _mats(at.qkv, keep), _biases(at.qkv)
        else:
            names = ["attn_q"] + (["attn_k"] if c.kv_from is None else []) + \
                (["attn_v"] if c.kv_from is None and not c.k_eq_v else [])
            parts = [getattr(at, n) for n in names]
            qkv, biases = [_mats(p, keep)[0] for p in parts], [p.bias for p in parts]
        want = 1 if c.kv_from is not None else 2 if c.k_eq_v else 3
        _check(len(qkv) == want, f"layer {i}: q/k/v are not {want} matrices")
        L.n_qkv = want
        for j, b in enumerate(biases + [None] * (3 - len(biases))):
            setattr(L, ("bq", "bk", "bv")[j], _f32(b, keep))
        for j in range(want):
            L.qkv[j] = qkv[j]
        _check(qkv[0].n == at.n_head * at.hd and all(m.n == at.n_kv * at.hd for m in qkv[1:]),
               f"layer {i}: unexpected q/k/v shapes")
        L.o = _mat(at.attn_output, keep)
        L.kc, L.vc = cache.k.data_ptr(), cache.v.data_ptr()
        if cache.ring and c.kv_from is None:
            self.rings.append(cache)
        if cache.ring and c.kv_from is not None:
            # several rows of this sequence in one step would overwrite ring slots an earlier row's
            # shared layer still reads (the producer runs all rows first): rows() refuses
            self.shared_ring = True

    def _moe(self, moe, keep: list, i: int, gemma: bool) -> Moe:
        r = moe.routing
        _check(r.score == "softmax" and r.n_group == 1 and moe.exp_probs_b is None and r.top_k <= _MAX_TOP_K
               and (not r.norm_topk or r.norm_eps == 0.0), f"layer {i}: routing the step does not implement")
        ex = moe.experts
        M = Moe(n_expert=r.n_expert, top_k=r.top_k, act=_act(ex.act, f"layer {i} experts"), gemma=int(gemma),
                norm_topk=int(r.norm_topk), fused=int(ex.fused), scale=r.scale)
        M.router = _mat(moe.ffn_gate_inp, keep)
        _check(M.router.n == r.n_expert, f"layer {i}: router rows")
        if ex.fused:
            gu = _expert_mats(ex.ffn_gate_up_exps, keep)
            keep.append(gu)
            M.gate_up, M.ffn = ctypes.addressof(gu), gu[0].n // 2
        else:
            g, u = _expert_mats(ex.ffn_gate_exps, keep), _expert_mats(ex.ffn_up_exps, keep)
            keep.extend([g, u])
            M.gate, M.up, M.ffn = ctypes.addressof(g), ctypes.addressof(u), g[0].n
        d = _expert_mats(ex.ffn_down_exps, keep)
        keep.append(d)
        M.down = ctypes.addressof(d)
        _check(d[0].k == M.ffn, f"layer {i}: expert widths")
        if moe.shared is not None:
            sh = Layer()
            _mlp(moe.shared, sh, keep, i)
            _check(sh.act == M.act, f"layer {i}: shared expert activation")
            M.sh_ffn, M.sh_gate, M.sh_up, M.sh_down = sh.ffn, sh.gate, sh.up, sh.down
            if moe.ffn_gate_inp_shexp is not None:
                M.sh_gated, M.sh_gate_inp = 1, _mat(moe.ffn_gate_inp_shexp, keep)
        return M

    def _build(self) -> None:
        from edgeinfer.models.gemma4 import Gemma4Block, Gemma4MoE

        m, keep = self.model, []
        self.rings: list = []
        self.shared_ring = False
        layers = list(m.layers)
        eps = m.output_norm.eps
        layer_structs = (Layer * len(layers))()
        moes = []
        ple_dim = 0
        for i, blk in enumerate(layers):
            L = layer_structs[i]
            gemma = type(blk) is Gemma4Block
            _check(type(blk) is Block or gemma, f"layer {i} is another block type")
            self._attention(blk.attn, L, keep, eps, i)
            L.attn_norm = _norm(blk.attn_norm, eps, f"layer {i} attn_norm", keep)
            L.ffn_norm = _norm(blk.ffn_norm, eps, f"layer {i} ffn_norm", keep)
            if blk.sandwich:
                L.post_attn_norm = _norm(blk.post_attention_norm, eps, f"layer {i} post_attention_norm", keep)
                L.post_ffn_norm = _norm(blk.post_ffw_norm, eps, f"layer {i} post_ffw_norm", keep)
            L.out_scale = 1.0
            if gemma:
                _mlp(blk.ffn, L, keep, i)
                if hasattr(blk, "moe"):
                    _check(type(blk.moe) is Gemma4MoE, f"layer {i}: another MoE type")
                    M = self._moe(blk.moe, keep, i, gemma=True)
                    M.router_scale = _f32(blk.moe.ffn_gate_inp.scale.float() / math.sqrt(blk.moe.dim), keep)
                    M.expert_scale = _f32(blk.moe.experts.ffn_down_exps.scale, keep)
                    M.pre_norm = _norm(blk.pre_ffw_norm_2, eps, f"layer {i} pre_ffw_norm_2", keep)
                    M.post_dense = _norm(blk.post_ffw_norm_1, eps, f"layer {i} post_ffw_norm_1", keep)
                    M.post_moe = _norm(blk.post_ffw_norm_2, eps, f"layer {i} post_ffw_norm_2", keep)
                    _check(blk.moe.eps == eps, f"layer {i}: router norm epsilon")
                    moes.append(M)
                    L.moe = ctypes.addressof(M)
                if hasattr(blk, "ple"):
                    g = blk.ple
                    _act(g.act, f"layer {i} PLE gate")
                    _check(_ACT[id(g.act)] == 1, f"layer {i}: PLE gate activation is not gelu (tanh)")
                    L.ple, L.ple_gate, L.ple_proj = 1, _mat(g.inp_gate, keep), _mat(g.proj, keep)
                    L.ple_norm = _norm(g.post_norm, eps, f"layer {i} PLE post_norm", keep)
                    _check(ple_dim in (0, L.ple_gate.n) and L.ple_proj.k == L.ple_gate.n, f"layer {i}: PLE width")
                    ple_dim = L.ple_gate.n
                if hasattr(blk, "layer_output_scale"):
                    w = blk.layer_output_scale.weight
                    _check(w.numel() == 1, f"layer {i}: layer_output_scale is not a scalar")
                    L.out_scale = float(w.float().item())
            elif type(blk.ffn) is MoE:
                M = self._moe(blk.ffn, keep, i, gemma=False)
                moes.append(M)
                L.moe = ctypes.addressof(M)
            else:
                _mlp(blk.ffn, L, keep, i)
        _check(type(m).forward is Transformer.forward and type(m).head is Transformer.head
               and type(m).embed is Transformer.embed, "the model has its own forward / embedding / head")
        self.ple_model = type(m).layer_inputs is not Transformer.layer_inputs
        _check(ple_dim == 0 or self.ple_model, "per-layer gates without per-layer inputs")
        out = _mat(m.output, keep)
        _norm(m.output_norm, eps, "output_norm", keep)
        s = Model(n_layer=len(layers), dim=m.args.dim, n_ctx=m.n_ctx, vocab=out.n, ple_dim=ple_dim, eps=eps,
                  softcap=float(m.args.final_softcap or 0.0))
        _check(s.dim == out.k, "unexpected shapes")
        s.layers = ctypes.addressof(layer_structs)
        s.out_norm = _f32(m.output_norm.weight, keep)
        s.out = out
        self.scratch = torch.empty(int(ggml_cpu.LIB.eg_step_scratch(ctypes.byref(s))), dtype=torch.float32)
        s.scratch = self.scratch.data_ptr()
        self._scratch: dict[int, torch.Tensor] = {}  # batched steps' scratch by row count
        self.struct, self.layers, self.moes, self.keep, self.ple_dim = s, layer_structs, moes, keep, ple_dim
        self.cache0 = self._cache(layers[0].attn).k
        emb = m.token_embd
        self.embed_mat = None
        if type(emb) is QuantEmbedding and ggml_cpu.can_run(emb.qtype, emb.raw.shape[0], emb.dim) \
                and emb.raw.dim() == 2 and emb.raw.is_contiguous() and emb.raw.device.type == "cpu":
            raw = emb.raw if emb.raw.dtype == torch.uint8 else emb.raw.view(torch.uint8)  # F16/F32 rows as bytes
            keep.append(raw)
            self.embed_mat = ggml_cpu.mat(raw, emb.qtype, raw.shape[0], emb.dim)
        self.embed_scale = float(m.args.embed_scale)
        self.vocab, self.dim = s.vocab, s.dim

    def _embed(self, tok: int) -> torch.Tensor:
        if self.embed_mat is None:
            return self.model.embed(torch.tensor([[tok]]))[0, 0].float().contiguous().clone()
        h = torch.empty(self.dim, dtype=torch.float32)
        if ggml_cpu.LIB.eg_dequant(ctypes.byref(self.embed_mat), tok, tok + 1, h.data_ptr(), 0, 1) != 0:
            raise IndexError(f"token id {tok} is outside the vocabulary")
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def _fresh(self) -> None:
        if self._cache(self.model.layers[0].attn).k is not self.cache0:  # caches re-allocated (model.setup)
            self._build()

    def _ple(self, toks: list[int], h: torch.Tensor) -> torch.Tensor | None:
        """Per-layer inputs [1, B, L, P] float32 of tokens ``toks`` (embeddings ``h`` [B, dim]), or None."""
        if not self.ple_model:
            return None
        ple = self.model.layer_inputs(torch.tensor([toks]), h.view(1, len(toks), -1))
        if ple is None and self.ple_dim:
            raise RuntimeError("the model returned no per-layer inputs for its per-layer gates")
        return None if ple is None else ple.float().contiguous()

    def _log_rings(self, pos: int) -> None:
        for c in self.rings:  # a speculative pass's ring buffers log what this write replaces
            if c._mark is not None:
                c._save(pos, pos + 1)

    @torch.inference_mode()
    def __call__(self, tok: int, pos: int) -> torch.Tensor:
        """Logits [vocab] float32 for token ``tok`` at position ``pos`` (its K/V enter the cache)."""
        self._fresh()
        if not 0 <= pos < self.model.n_ctx:
            raise IndexError(f"position {pos} exceeds the context of {self.model.n_ctx}")
        h = self._embed(tok)
        ple = self._ple([tok], h)
        self.struct.ple_in = None if ple is None else ple.data_ptr()
        self._log_rings(pos)
        logits = torch.empty(self.vocab, dtype=torch.float32)
        rc = ggml_cpu.LIB.eg_step(ctypes.byref(self.struct), h.data_ptr(), pos, logits.data_ptr(), ggml_cpu.threads())
        self.struct.ple_in = None
        if rc != 0:
            raise RuntimeError("the fused decode step failed (out of memory?)")
        return logits

    def can_rows(self, n: int) -> bool:
        """Whether :meth:`rows` takes ``n`` tokens (not where a KV-shared layer reads a ring buffer)."""
        return 1 <= n <= self.MAX_ROWS and (n == 1 or not self.shared_ring)

    def rows(self, toks: list[int], pos0: int, head_rows: int | None = None) -> torch.Tensor:
        """Logits [B or head_rows, vocab] of tokens ``toks`` of this sequence at positions ``pos0 ..`` in
        one batched step (causal: each row attends to the rows before it): a speculative verification
        pass, or a prompt chunk (``head_rows=1``: the last row's logits only)."""
        return batch([self] * len(toks), toks, list(range(pos0, pos0 + len(toks))), head_rows)


MAX_ROWS = DecodeStep.MAX_ROWS


@torch.inference_mode()
def batch(steps: list[DecodeStep], toks: list[int], positions: list[int], head_rows: int | None = None) -> torch.Tensor:
    """One batched call of the fused step: row b is token ``toks[b]`` at ``positions[b]`` of the sequence
    of ``steps[b]`` (steps of one model: different sequences, or the same step repeated at consecutive
    positions). Every product reads the weights once for all rows; each row's logits equal what its own
    step would give. Returns logits [head_rows, vocab] float32 of the last ``head_rows`` rows (None: all)."""
    s0, b = steps[0], len(steps)
    if not 0 < b <= MAX_ROWS or len(toks) != b or len(positions) != b:
        raise ValueError(f"a batched step takes 1..{MAX_ROWS} rows (got {b} steps, {len(toks)} tokens)")
    for st in steps:
        if st.model is not s0.model:
            raise ValueError("a batched step runs the sequences of one model")
        st._fresh()
    if s0.shared_ring and len({id(st) for st in steps}) < b:
        raise ValueError("rows of one sequence cannot share a step here: a KV-shared layer reads a ring buffer")
    for p in positions:
        if not 0 <= p < s0.model.n_ctx:
            raise IndexError(f"position {p} exceeds the context of {s0.model.n_ctx}")
    h = torch.stack([st._embed(t) for st, t in zip(steps, toks)])  # [B, dim]
    ple = s0._ple(list(toks), h)
    for st, p in zip(steps, positions):
        st._log_rings(p)
    scratch = s0._scratch.get(b)
    if scratch is None:
        n = int(ggml_cpu.LIB.eg_step_scratch_batch(ctypes.byref(s0.struct), b))
        scratch = s0._scratch[b] = torch.empty(n, dtype=torch.float32)
    ms = (ctypes.c_void_p * b)(*(ctypes.addressof(st.struct) for st in steps))
    pos = (ctypes.c_int * b)(*positions)
    hr = b if head_rows is None else max(0, min(b, head_rows))
    logits = torch.empty(hr, s0.vocab, dtype=torch.float32)
    rc = ggml_cpu.LIB.eg_step_batch(ms, b, h.data_ptr(), pos, logits.data_ptr(), ggml_cpu.threads(),
                                    scratch.data_ptr(), None if ple is None else ple.data_ptr(), hr)
    if rc != 0:
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
