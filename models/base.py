"""Shared building blocks of the decoder-only transformers: norms, RoPE, attention, MLP, the block,
the model. Architecture files (``models/<arch>.py``) compose these; they know nothing of
quantization (see ``models/README.md`` for how to add one).

Naming: module attribute names are the GGUF tensor stems (``attn_q``, ``ffn_down``,
``output_norm`` ..., ``gguf.TENSOR_NAMES``) and a parameter's name is the tensor's suffix
(``weight``, ``bias``, ``scale``). So the GGUF name of any module is its path with ``layers.N.``
turned into ``blk.N.`` and the containers in between dropped (:func:`gguf_name`); the few
exceptions are per-architecture data (``Transformer.RENAMES``). The models are built on the
``meta`` device; the loader (``edgeinfer/engine/loader.py``) swaps quantized modules in by module
type and assigns the float tensors.

Per-layer shapes: every sub-module takes its sizes explicitly, so an architecture may give each
layer its own head dim, KV heads, window, RoPE or FFN width (``ModelArgs.at``). A forward step
passes a :class:`Step` to every layer (positions, optional per-layer inputs); each attention owns
its cache (:meth:`Attention.setup_cache`), which may be another layer's (KV sharing).

References: llama.cpp ``src/models/llama.cpp``, ``gemma3.cpp``, ``ggml_rope_ext`` (ggml-cpu ops.cpp).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeinfer.models.cache import KVCache

__all__ = ["ModelArgs", "Yarn", "yarn_mscale", "RopeConfig", "AttnConfig", "Step", "RMSNorm", "Scale", "Rope", "Attention", "MLP",
           "Block", "Transformer", "gguf_name", "module_path", "activation", "KVCache"]

#: Per-layer tensors of the default layout that live in the attention / MLP sub-module
#: (:func:`module_path`, the inverse of :func:`gguf_name` for the dense architectures).
_SUBMODULE = {s: "attn" for s in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm")}
_SUBMODULE.update({s: "ffn" for s in ("ffn_gate", "ffn_up", "ffn_down")})


def gguf_name(module: str, renames: Mapping[str, str] | None = None) -> str:
    """Module path -> GGUF tensor name without its suffix.

    Inside a layer the containers are dropped: ``layers.3.attn.attn_q`` -> ``blk.3.attn_q``,
    ``layers.3.ffn.experts.ffn_up_exps`` -> ``blk.3.ffn_up_exps``. ``renames`` maps a path inside
    a layer (``ffn.router.proj``) or a top-level path to its GGUF stem (``ffn_gate_inp``).
    """
    m = re.match(r"^layers\.(\d+)\.(.+)$", module)
    prefix, rest = (f"blk.{m.group(1)}.", m.group(2)) if m else ("", module)
    if renames and rest in renames:
        return prefix + renames[rest]
    return prefix + rest.rsplit(".", 1)[-1]


def module_path(gguf_name: str) -> str:
    """GGUF tensor name -> parameter path in the dense layout (``blk.3.attn_q.weight`` -> ``layers.3.attn.attn_q.weight``)."""
    m = re.match(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$", gguf_name)
    if not m:
        return gguf_name
    i, stem, kind = m.groups()
    sub = _SUBMODULE.get(stem)
    return f"layers.{i}.{sub + '.' if sub else ''}{stem}.{kind}"


def gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form (llama.cpp's ``ggml_gelu``)."""
    return F.gelu(t, approximate="tanh")


#: activation name -> function (one object per name, so that a fused step can tell them apart)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu_tanh": gelu_tanh}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``silu`` or ``gelu_tanh`` (GeGLU)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    return ACTIVATIONS[name]


@dataclass
class ModelArgs:
    """Everything a decoder needs, read from GGUF metadata by the architecture file.

    A field may hold one value for every layer or a per-layer tuple (:meth:`at`).
    Architectures with more settings subclass it.
    """

    arch: str
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int | tuple
    head_dim: int | tuple
    ffn_dim: int | tuple
    vocab_size: int
    norm_eps: float = 1e-5
    rope_dim: int = 0  # 0 = head_dim
    rope_style: str = "norm"  # "norm": rotate adjacent pairs (llama.cpp LLAMA_ROPE_TYPE_NORM); "neox": halves
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0  # linear scaling: positions are multiplied by this
    rope_yarn: "Yarn | None" = None  # YaRN scaling of the global layers
    rope_base_swa: float = 10000.0  # sliding-window layers (gemma3)
    rope_freq_scale_swa: float = 1.0
    sliding_window: int = 0  # 0 = none
    swa_layers: tuple = ()  # per layer: True if it is a sliding-window layer
    qkv_bias: bool = False
    qk_norm: bool = False
    act: str = "silu"  # "silu" or "gelu_tanh"
    embed_scale: float = 1.0
    attn_scale: float = 0.0  # 0 = 1/sqrt(head_dim)
    final_softcap: float = 0.0
    ctx_train: int = 4096
    extra: dict = field(default_factory=dict)

    def at(self, name: str, i: int):
        """Field ``name`` for layer ``i`` (a per-layer tuple is indexed, a single value returned)."""
        v = getattr(self, name)
        return v[i] if isinstance(v, (tuple, list)) else v

    def is_swa(self, i: int) -> bool:
        return bool(self.swa_layers and self.swa_layers[i] and self.sliding_window > 0)

    def attn_config(self, i: int) -> "AttnConfig":
        """Layer ``i``'s attention from the common fields (windows and RoPE per layer type)."""
        swa = self.is_swa(i)
        hd = self.at("head_dim", i)
        rope = RopeConfig(self.rope_dim or hd, self.rope_base_swa if swa else self.rope_base,
                          self.rope_freq_scale_swa if swa else self.rope_freq_scale, self.rope_style,
                          factors="rope_freqs", yarn=None if swa else self.rope_yarn)
        return AttnConfig(self.dim, self.n_head, self.at("n_kv_head", i), hd, norm_eps=self.norm_eps,
                          qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, window=self.sliding_window if swa else 0,
                          scale=self.attn_scale, rope=rope)


@dataclass(frozen=True)
class Yarn:
    """YaRN context extension (HF ``_compute_yarn_parameters``, ggml ``rope_yarn``): frequencies
    blended between interpolated (``/ factor``) and original by a ramp over the dimensions between
    the ``beta_fast`` and ``beta_slow`` correction dims of ``orig_ctx``; cos/sin times ``attn_factor``."""

    factor: float
    orig_ctx: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0
    attn_factor: float = 1.0

    def inv_freq(self, n_rot: int, base: float) -> torch.Tensor:
        """[n_rot/2] float64 inverse frequencies."""
        def corr_dim(n: float) -> float:
            return n_rot * math.log(self.orig_ctx / (n * 2 * math.pi)) / (2 * math.log(base))

        lo = max(0.0, math.floor(corr_dim(self.beta_fast)))
        hi = min(n_rot - 1.0, math.ceil(corr_dim(self.beta_slow)))
        extrap = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
        ramp = 1 - ((torch.arange(n_rot // 2, dtype=torch.float64) - lo) / max(0.001, hi - lo)).clamp(0, 1)
        mix = ramp * self.ext_factor  # 1: keep the original frequency, 0: interpolate
        return extrap / self.factor * (1 - mix) + extrap * mix


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE setting: ``theta_i(p) = p * scale * base^(-2i/n_rot) / factor_i`` (or YaRN's frequencies).

    ``factors`` names a model attribute holding per-frequency divisors (llama3's or Gemma 4's
    ``rope_freqs`` tensor), used when the file has it; ``style``: ``norm`` (pairs) or ``neox`` (halves).
    """

    n_rot: int
    base: float = 10000.0
    scale: float = 1.0
    style: str = "norm"
    factors: str | None = None
    yarn: Yarn | None = None


@dataclass(frozen=True)
class AttnConfig:
    """One layer's attention.

    Attributes:
        kv_from: reuse layer ``kv_from``'s keys and values (KV sharing: no k/v projections here).
        k_eq_v: no ``attn_v``: values are the v-normed raw key projection (Gemma 4 global layers).
        v_norm: RMSNorm without weight on the values (Gemma 4).
        scale: query scale (0 = 1/sqrt(head_dim)).
    """

    dim: int
    n_head: int
    n_kv: int
    head_dim: int
    rope: RopeConfig
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    v_norm: bool = False
    k_eq_v: bool = False
    window: int = 0
    scale: float = 0.0
    kv_from: int | None = None


@dataclass
class Step:
    """What every layer sees of one forward call: the first position and optional per-layer inputs.

    ``seq`` picks the cache set (sequence) a single-sequence call reads and writes; ``rows`` is set
    for a multi-sequence decode (:meth:`Transformer.forward_rows`): batch row ``b`` is one token of
    sequence ``rows[b][0]`` at position ``rows[b][1]``.
    """

    pos0: int
    layer_inputs: torch.Tensor | None = None  # [B, S, n_layer, P] (per-layer embeddings), if the model has them
    seq: int = 0
    rows: tuple[tuple[int, int], ...] | None = None


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` (llama.cpp ``ggml_rms_norm`` then ``ggml_mul``).

    GGUF files already hold gemma's ``1 + w`` (the converter adds 1), so no offset here.
    ``with_scale=False``: no weight (Gemma 4's value and router norms).
    """

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.weight, self.eps)  # one fused op


class Scale(nn.Module):
    """A learned elementwise scale stored as a GGUF tensor (``blk.N.layer_output_scale.weight``)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Rope:
    """Rotary position embedding tables for one :class:`RopeConfig` (and optional freq factors)."""

    def __init__(self, n_rot: int, base: float, scale: float, factors: torch.Tensor | None, style: str,
                 max_pos: int, device, yarn: Yarn | None = None):
        if yarn is not None:
            inv = yarn.inv_freq(n_rot, base)
        else:
            inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)  # [n_rot/2]
        if factors is not None:
            inv = inv / factors.to(torch.float64).cpu()[: n_rot // 2]
        ang = torch.outer(torch.arange(max_pos, dtype=torch.float64) * scale, inv)  # [P, n_rot/2]
        m = yarn.attn_factor if yarn is not None else 1.0
        self.cos = (ang.cos() * m).float()[:, None, :].to(device)  # [P, 1, n_rot/2]
        self.sin = (ang.sin() * m).float()[:, None, :].to(device)
        self.n_rot, self.style = n_rot, style

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x: [B, S, H, D] -> same, positions pos0 .. pos0+S-1."""
        s = x.shape[1]
        c = self.cos[pos0:pos0 + s]  # [S, 1, n_rot/2], broadcasts over [B, S, H, n_rot/2]
        sn = self.sin[pos0:pos0 + s]
        xr, rest = x[..., :self.n_rot], x[..., self.n_rot:]
        if self.style == "norm":
            x0, x1 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], dim=-1).flatten(-2)
        else:
            h = self.n_rot // 2
            x0, x1 = xr[..., :h], xr[..., h:]
            out = torch.cat([x0 * c - x1 * sn, x1 * c + x0 * sn], dim=-1)
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with grouped KV heads. q: [B, H, S, D], keys/vals: [B, Hkv, L, D] -> [B, H, S, Dv]."""
    b, h, s, d = q.shape
    n_kv = keys.shape[1]
    q = q.to(keys.dtype)
    if s == 1 and mask is None:  # decode: two small matmuls beat SDPA's per-call cost on CPU
        g = h // n_kv  # query head h reads kv head h // g
        att = torch.matmul(q.view(b, n_kv, g, d), keys.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
        o = torch.matmul(torch.softmax(att.float(), dim=-1).to(vals.dtype), vals)  # [B, Hkv, G, Dv]
        return o.view(b, h, 1, vals.shape[-1])
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale,
                                          enable_gqa=h != n_kv)  # [B, H, S, Dv]


class Attention(nn.Module):
    """Grouped-query attention of one layer (:class:`AttnConfig`): optional q/k/v bias, per-head q/k
    RMSNorm, value norm, keys-as-values, a sliding window, KV shared with an earlier layer."""

    #: q/k/v computed by one matmul when the kernels allow (set up by the loader: ``self.qkv``).
    FUSE = {"qkv": ("attn_q", "attn_k", "attn_v")}

    def __init__(self, c: AttnConfig):
        super().__init__()
        self.c = c
        self.n_head, self.n_kv, self.hd = c.n_head, c.n_kv, c.head_dim
        self.attn_q = nn.Linear(c.dim, c.n_head * c.head_dim, bias=c.qkv_bias)
        if c.kv_from is None:
            self.attn_k = nn.Linear(c.dim, c.n_kv * c.head_dim, bias=c.qkv_bias)
            if not c.k_eq_v:
                self.attn_v = nn.Linear(c.dim, c.n_kv * c.head_dim, bias=c.qkv_bias)
        self.attn_output = nn.Linear(c.n_head * c.head_dim, c.dim, bias=False)
        if c.qk_norm:
            self.attn_q_norm = RMSNorm(c.head_dim, c.norm_eps)
            if c.kv_from is None:
                self.attn_k_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.v_norm = RMSNorm(c.head_dim, c.norm_eps, with_scale=False) if c.v_norm else None
        self.scale = c.scale or 1.0 / math.sqrt(c.head_dim)
        self.window = c.window
        self.qkv = None  # optional fused q/k/v projection returning (q, k, v), set by a loader
        # optional numeric policy for softmax(q k^T) v, called as core(q, keys, vals, mask, scale)
        # -> [B, H, S, D] float32 (e.g. llama.cpp's fp16 roundings), set by a loader
        self.core = None
        self.rope: Rope | None = None  # set by setup_cache
        self.cache: KVCache | None = None  # sequence 0's, = caches[0]
        self.caches: list[KVCache] = []  # one per sequence (add_sequences); shared list with kv_from

    def setup_cache(self, n_ctx: int, device, dtype, model: "Transformer") -> None:
        """Allocate (or, with ``kv_from``, share) this layer's cache and build its RoPE table."""
        r = self.c.rope
        self.rope = model.rope(r, n_ctx, device)
        self.n_ctx = n_ctx
        if self.c.kv_from is not None:
            self.caches = model.layers[self.c.kv_from].attn.caches
        else:
            self.caches = [KVCache(self.n_kv, self.hd, n_ctx, self.window, device, dtype)]
        self.cache = self.caches[0]

    def add_sequences(self, n_seq: int) -> None:
        """Give this layer caches for ``n_seq`` sequences (like sequence 0's; a KV-sharing layer reads its
        producer's list, which grows in place)."""
        if self.c.kv_from is None:
            c0 = self.caches[0]
            while len(self.caches) < n_seq:
                self.caches.append(KVCache(self.n_kv, self.hd, self.n_ctx, self.window, c0.k.device, c0.k.dtype))

    def _qkv(self, x: torch.Tensor):
        if self.qkv is not None:
            return self.qkv(x)
        if self.c.kv_from is not None:
            return self.attn_q(x), None, None
        k = self.attn_k(x)
        return self.attn_q(x), k, (k if self.c.k_eq_v else self.attn_v(x))

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x: [1, S, dim] (or [B, 1, dim] with ``step.rows``: one token of B sequences) -> same shape."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x)  # the projections run batched over every row
        q = q.view(b, s, self.n_head, self.hd)  # [B, S, H, D]
        if self.c.qk_norm:
            q = self.attn_q_norm(q)
        if k is not None:
            k = k.view(b, s, self.n_kv, self.hd)
            v = v.view(b, s, self.n_kv, self.hd)
            if self.v_norm is not None:
                v = self.v_norm(v)
            if self.c.qk_norm:
                k = self.attn_k_norm(k)
        rows = step.rows or ((step.seq, step.pos0),)
        outs = []
        for i, (seq, pos0) in enumerate(rows):  # attention reads each sequence's own cache
            cache = self.caches[seq]
            qi = self.rope(q[i:i + 1], pos0).transpose(1, 2)  # [1, H, S, D]
            if k is None:
                keys, vals, mask = cache.shared(pos0, s)  # [1, H_kv, L, D], produced by layer kv_from
            else:
                ki = self.rope(k[i:i + 1], pos0)
                keys, vals, mask = cache.update(ki.transpose(1, 2), v[i:i + 1].transpose(1, 2), pos0)
            if self.core is not None:
                outs.append(self.core(qi, keys, vals, mask, self.scale))  # [1, H, S, D]
            else:
                outs.append(attend(qi, keys, vals, mask, self.scale))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [B, H, S, D]
        return self.attn_output(o.transpose(1, 2).reshape(b, s, self.n_head * self.hd).float())


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU with silu, GeGLU with gelu_tanh).

    ``stems`` are the GGUF names of the three projections (a shared expert's are ``ffn_*_shexp``).
    """

    def __init__(self, dim: int, ffn_dim: int, act: str = "silu",
                 stems: tuple[str, str, str] = ("ffn_gate", "ffn_up", "ffn_down")):
        super().__init__()
        self.stems = stems
        for stem, (i, o) in zip(stems, ((dim, ffn_dim), (dim, ffn_dim), (ffn_dim, dim))):
            setattr(self, stem, nn.Linear(i, o, bias=False))
        self.FUSE = {"gate_up": stems[:2]}
        self.act = activation(act)
        self.gate_up = None  # optional fused projection returning (gate, up), set by a loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.stems
        gate, up = self.gate_up(x) if self.gate_up is not None else (getattr(self, g)(x), getattr(self, u)(x))
        return getattr(self, d)(self.act(gate) * up)


class Block(nn.Module):
    """The shared decoder block: ``h += [post](attn(norm(h))); h += [post](ffn(norm(h)))``.

    ``sandwich=True`` adds Gemma's ``post_attention_norm`` / ``post_ffw_norm`` after each
    sub-block. ``ffn`` is any module of ``[.., dim] -> [.., dim]`` (an :class:`MLP`, a MoE).
    """

    def __init__(self, dim: int, eps: float, attn: nn.Module, ffn: nn.Module, sandwich: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = ffn
        if sandwich:
            self.post_attention_norm = RMSNorm(dim, eps)
            self.post_ffw_norm = RMSNorm(dim, eps)
        self.sandwich = sandwich

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """h: [1, S, dim] -> [1, S, dim]."""
        a = self.attn(self.attn_norm(h), step)
        h = h + (self.post_attention_norm(a) if self.sandwich else a)
        f = self.ffn(self.ffn_norm(h))
        return h + (self.post_ffw_norm(f) if self.sandwich else f)


class Transformer(nn.Module):
    """Embedding -> layers -> final norm -> LM head (optionally soft-capped). Batch size 1.

    Subclasses override :meth:`embed` / :meth:`layer_inputs` (per-layer embeddings) or
    :meth:`forward` when the stream differs. Class attributes are data for the loader:

    * ``RENAMES``: module paths whose GGUF stem is not their attribute name (:func:`gguf_name`);
    * ``TIED``: a GGUF tensor used in place of another the file may omit;
    * ``OPTIONAL``: GGUF tensors assigned to a model attribute when the file has them;
    * ``unread`` (per instance): GGUF tensors the file holds for another runtime that this model never
      reads (llama.cpp requires K/V projections in Gemma 3n's KV-shared layers); the loader accepts
      them without loading them.
    """

    RENAMES: dict[str, str] = {}
    TIED = {"output.weight": "token_embd.weight"}
    OPTIONAL = {"rope_freqs.weight": "rope_freqs"}

    def __init__(self, a: ModelArgs, layers):
        super().__init__()
        self.args = a
        self.token_embd = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(layers)
        self.output_norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.rope_freqs: torch.Tensor | None = None  # per-frequency divisors, set by the loader if the file has them
        self.unread: set[str] = set()
        self.n_ctx = 0
        self._ropes: dict = {}

    def gguf_name(self, module: str) -> str:
        """The GGUF name (without suffix) of a module of this model."""
        return gguf_name(module, self.RENAMES)

    def rope(self, r: RopeConfig, n_ctx: int, device) -> Rope:
        """The RoPE table for ``r`` (built once per setting and shared by the layers that use it)."""
        factors = getattr(self, r.factors) if r.factors else None
        key = (r, factors is not None)
        if key not in self._ropes:
            self._ropes[key] = Rope(r.n_rot, r.base, r.scale, factors, r.style, n_ctx, device, r.yarn)
        return self._ropes[key]

    def setup(self, n_ctx: int, device, cache_dtype=torch.float32) -> None:
        """Allocate every layer's cache and RoPE tables for ``n_ctx`` positions (also resets the cache)."""
        self._ropes = {}
        for m in self.modules():
            if m is not self and hasattr(m, "setup_cache"):
                m.setup_cache(n_ctx, device, cache_dtype, self)
        self.n_ctx = n_ctx

    def add_sequences(self, n_seq: int) -> None:
        """Caches for ``n_seq`` sequences that :meth:`forward` (``seq=``) and :meth:`forward_rows` address.

        Raises:
            NotImplementedError: an attention module of this model has a single cache (e.g. latent attention).
        """
        for m in self.modules():
            if m is not self and hasattr(m, "setup_cache"):
                if not hasattr(m, "add_sequences"):
                    raise NotImplementedError(f"{type(m).__name__} keeps one sequence only")
        for m in self.modules():
            if m is not self and hasattr(m, "add_sequences"):
                m.add_sequences(n_seq)

    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes one position costs over all layers (shared caches counted once)."""
        seen = {id(c): c for m in self.modules() if (c := getattr(m, "cache", None)) is not None}
        return sum(c.bytes_per_token() for c in seen.values())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, S] -> the residual stream's input [1, S, dim]."""
        h = self.token_embd(ids)
        return h * self.args.embed_scale if self.args.embed_scale != 1.0 else h

    def layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """Per-layer inputs ([1, S, n_layer, P]) handed to every layer in :class:`Step`; None here."""
        return None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and optional soft-capping: [1, S, dim] -> [1, S, vocab] float32."""
        logits = self.output(self.output_norm(h))
        if self.args.final_softcap:
            c = self.args.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, last_only: bool = False, keep_last: int = 0,
                seq: int = 0) -> torch.Tensor:
        """ids: [1, S] token ids at positions pos0.. of sequence ``seq`` -> logits [1, S or 1, vocab] float32.

        ``keep_last=n``: logits of the last ``n`` positions only, [1, n, vocab] (speculative verification).
        """
        if pos0 + ids.shape[1] > self.n_ctx:
            raise IndexError(f"positions up to {pos0 + ids.shape[1]} exceed the context of {self.n_ctx}")
        h = self.embed(ids)  # [1, S, dim]
        step = Step(pos0, self.layer_inputs(ids, h), seq=seq)
        for layer in self.layers:
            h = layer(h, step)
        if last_only or keep_last:
            h = h[:, -(keep_last or 1):]
        return self.head(h)

    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, rows: Sequence[tuple[int, int]]) -> torch.Tensor:
        """One decode step of several sequences at once: ids [B, 1], row b the next token of sequence
        ``rows[b][0]`` at position ``rows[b][1]`` -> logits [B, vocab] float32. Matmuls run on all rows
        together; attention reads each row's own cache (see :meth:`add_sequences`)."""
        if any(pos >= self.n_ctx for _, pos in rows):
            raise IndexError(f"a position exceeds the context of {self.n_ctx}")
        h = self.embed(ids)  # [B, 1, dim]
        step = Step(rows[0][1], self.layer_inputs(ids, h), rows=tuple((int(s), int(p)) for s, p in rows))
        for layer in self.layers:
            h = layer(h, step)
        return self.head(h)[:, 0]
