"""Shared building blocks of the decoder-only transformers: norms, RoPE, KV cache, attention, MLP.

Module attribute names are the GGUF tensor names (``attn_q``, ``ffn_down``, ``output_norm``...,
from ``gguf.TENSOR_NAMES``), so the whole GGUF <-> module mapping is :func:`module_path`:
``blk.{i}.<stem>`` lives at ``layers.{i}.<attn|ffn|->.<stem>``. The models know nothing of
quantization: they are built with ``nn.Linear`` on the ``meta`` device and the loader swaps in
quantized layers according to the file (:mod:`edgeinfer.models.loader`).

References: llama.cpp ``src/models/llama.cpp``, ``gemma3.cpp``, ``ggml_rope_ext`` (ggml-cpu ops.cpp).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: Per-layer tensors that live in the attention / MLP sub-module (everything else sits on the block).
_SUBMODULE = {s: "attn" for s in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm")}
_SUBMODULE.update({s: "ffn" for s in ("ffn_gate", "ffn_up", "ffn_down")})


def module_path(gguf_name: str) -> str:
    """GGUF tensor name -> parameter path in the model (``blk.3.attn_q.weight`` -> ``layers.3.attn.attn_q.weight``)."""
    m = re.match(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$", gguf_name)
    if not m:
        return gguf_name
    i, stem, kind = m.groups()
    sub = _SUBMODULE.get(stem)
    return f"layers.{i}.{sub + '.' if sub else ''}{stem}.{kind}"


def gguf_name(module: str) -> str:
    """Module path -> GGUF tensor name, the inverse of :func:`module_path` (``layers.3.attn.attn_q`` -> ``blk.3.attn_q``)."""
    return re.sub(r"^layers\.(\d+)\.(?:attn\.|ffn\.)?", r"blk.\1.", module)


@dataclass
class ModelArgs:
    """Everything a decoder needs, read from GGUF metadata by the architecture file."""

    arch: str
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_dim: int = 0  # 0 = head_dim
    rope_style: str = "norm"  # "norm": rotate adjacent pairs (llama.cpp LLAMA_ROPE_TYPE_NORM); "neox": halves
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0  # linear scaling: positions are multiplied by this
    rope_base_swa: float = 10000.0  # sliding-window layers (gemma3)
    rope_freq_scale_swa: float = 1.0
    sliding_window: int = 0  # 0 = none
    swa_layers: tuple = ()  # per layer: True if it is a sliding-window layer
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # gemma: post_attention_norm / post_ffw_norm after each sub-block
    act: str = "silu"  # "silu" or "gelu_tanh"
    embed_scale: float = 1.0
    attn_scale: float = 0.0  # 0 = 1/sqrt(head_dim)
    final_softcap: float = 0.0
    ctx_train: int = 4096
    extra: dict = field(default_factory=dict)

    def is_swa(self, i: int) -> bool:
        return bool(self.swa_layers and self.swa_layers[i] and self.sliding_window > 0)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` (llama.cpp ``ggml_rms_norm`` then ``ggml_mul``).

    GGUF files already hold gemma's ``1 + w`` (the converter adds 1), so no offset here.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps)  # one fused op


class Rope:
    """Rotary position embedding tables for one (base, scale, freq factors) setting.

    ``theta_i(p) = p * scale * base^(-2i/n_rot) / factor_i`` (factors: llama3's ``rope_freqs``
    tensor). ``style="norm"`` rotates pairs (2i, 2i+1); ``"neox"`` rotates (i, i + n_rot/2).
    """

    def __init__(self, n_rot: int, base: float, scale: float, factors: torch.Tensor | None, style: str,
                 max_pos: int, device):
        inv = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)  # [n_rot/2]
        if factors is not None:
            inv = inv / factors.to(torch.float64).cpu()
        ang = torch.outer(torch.arange(max_pos, dtype=torch.float64) * scale, inv)  # [P, n_rot/2]
        self.cos = ang.cos().float()[:, None, :].to(device)  # [P, 1, n_rot/2]
        self.sin = ang.sin().float()[:, None, :].to(device)
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


class KVCache:
    """Static, preallocated keys/values of one layer: [1, H_kv, L, D].

    A sliding-window layer whose window is shorter than the context keeps only its window
    as a ring buffer (position p lives in slot ``p % window``).
    """

    def __init__(self, n_kv_head: int, head_dim: int, n_ctx: int, window: int, device, dtype):
        self.window = window
        self.ring = 0 < window < n_ctx
        self.size = window if self.ring else n_ctx
        self.k = torch.zeros(1, n_kv_head, self.size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store k, v [1, H_kv, S, D] for positions pos0..pos0+S-1.

        Returns:
            (keys, values, mask): what the S queries attend to; ``mask`` is a bool [S, L]
            (True = visible) or None when every returned key is visible to every query.
        """
        s, dev = k.shape[2], k.device
        end = pos0 + s
        if not self.ring and end > self.size:
            raise IndexError(f"KV cache holds {self.size} positions, asked for {end}")
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if not self.ring:
            self.k[:, :, pos0:end] = k
            self.v[:, :, pos0:end] = v
            keys, vals = self.k[:, :, :end], self.v[:, :, :end]
            if s == 1 and (self.window == 0 or end <= self.window):
                return keys, vals, None  # decode: every cached key is visible
            kpos = torch.arange(end, device=dev)
        elif s == 1:  # decode: after writing, the ring holds exactly the visible window
            self.k[:, :, pos0 % self.size] = k[:, :, 0]
            self.v[:, :, pos0 % self.size] = v[:, :, 0]
            n = min(end, self.size)
            return self.k[:, :, :n], self.v[:, :, :n], None
        else:
            w = self.size
            old = torch.arange(max(0, pos0 - w), pos0, device=dev)
            keys = torch.cat([self.k[:, :, old % w], k], dim=2)
            vals = torch.cat([self.v[:, :, old % w], v], dim=2)
            kpos = torch.cat([old, torch.arange(pos0, end, device=dev)])
            n = min(s, w)
            slots = torch.arange(end - n, end, device=dev) % w
            self.k[:, :, slots] = k[:, :, s - n:]
            self.v[:, :, slots] = v[:, :, s - n:]
        qpos = torch.arange(pos0, end, device=dev)[:, None]
        mask = kpos[None, :] <= qpos
        if self.window:
            mask &= (qpos - kpos[None, :]) < self.window
        return keys, vals, mask


class Attention(nn.Module):
    """Grouped-query attention with optional q/k bias, per-head q/k RMSNorm and a sliding window."""

    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.n_head, self.n_kv, self.hd = a.n_head, a.n_kv_head, a.head_dim
        self.attn_q = nn.Linear(a.dim, a.n_head * a.head_dim, bias=a.qkv_bias)
        self.attn_k = nn.Linear(a.dim, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.attn_v = nn.Linear(a.dim, a.n_kv_head * a.head_dim, bias=a.qkv_bias)
        self.attn_output = nn.Linear(a.n_head * a.head_dim, a.dim, bias=False)
        if a.qk_norm:
            self.attn_q_norm = RMSNorm(a.head_dim, a.norm_eps)
            self.attn_k_norm = RMSNorm(a.head_dim, a.norm_eps)
        self.qk_norm = a.qk_norm
        self.scale = a.attn_scale or 1.0 / math.sqrt(a.head_dim)
        self.window = a.sliding_window if a.is_swa(layer) else 0
        self.qkv = None  # optional fused q/k/v projection returning (q, k, v), set by a loader
        # optional numeric policy for softmax(q k^T) v, called as core(q, keys, vals, mask, scale)
        # -> [B, H, S, D] float32 (e.g. llama.cpp's fp16 roundings), set by a loader
        self.core = None
        self.rope: Rope | None = None  # set by Transformer.setup
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x: [1, S, dim] -> [1, S, dim]."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.attn_q(x), self.attn_k(x), self.attn_v(x))
        q = q.view(b, s, self.n_head, self.hd)  # [B, S, H, D]
        k = k.view(b, s, self.n_kv, self.hd)
        v = v.view(b, s, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = self.rope(q, pos0), self.rope(k, pos0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        keys, vals, mask = self.cache.update(k, v, pos0)  # [B, H_kv, L, D]
        if self.core is not None:
            o = self.core(q, keys, vals, mask, self.scale)  # [B, H, S, D]
            return self.attn_output(o.transpose(1, 2).reshape(b, s, self.n_head * self.hd).float())
        q = q.to(keys.dtype)
        if s == 1 and mask is None:  # decode: two small matmuls beat SDPA's per-call cost on CPU
            g = self.n_head // self.n_kv  # query head h reads kv head h // g
            att = torch.matmul(q.view(b, self.n_kv, g, self.hd), keys.transpose(-1, -2)) * self.scale  # [B, Hkv, G, L]
            o = torch.matmul(torch.softmax(att.float(), dim=-1).to(vals.dtype), vals)  # [B, Hkv, G, D]
            o = o.view(b, self.n_head, 1, self.hd)
        else:
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.n_head != self.n_kv)  # [B, H, S, D]
        return self.attn_output(o.transpose(1, 2).reshape(b, s, self.n_head * self.hd).float())


class MLP(nn.Module):
    """Gated MLP: ``ffn_down(act(ffn_gate(x)) * ffn_up(x))`` (SwiGLU with silu, GeGLU with gelu_tanh)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.ffn_gate = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.ffn_up = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.ffn_down = nn.Linear(a.ffn_dim, a.dim, bias=False)
        self.act = F.silu if a.act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
        self.gate_up = None  # optional fused projection returning (gate, up), set by a loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.ffn_gate(x), self.ffn_up(x))
        return self.ffn_down(self.act(gate) * up)


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm -> LM head (optionally soft-capped). Batch size 1.

    Args:
        a: the model's arguments.
        block: the architecture's block class, called as ``block(args, layer_index)``.
    """

    def __init__(self, a: ModelArgs, block):
        super().__init__()
        self.args = a
        self.tok_embd = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(block(a, i) for i in range(a.n_layer))
        self.output_norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.rope_freqs: torch.Tensor | None = None  # llama3-style per-frequency factors, set by the loader
        self.n_ctx = 0

    def setup(self, n_ctx: int, device, cache_dtype=torch.float32) -> None:
        """Allocate the KV caches and RoPE tables for ``n_ctx`` positions (also resets the cache)."""
        a = self.args
        n_rot = a.rope_dim or a.head_dim
        ropes = {}
        for i, layer in enumerate(self.layers):
            swa = a.is_swa(i)
            key = (a.rope_base_swa, a.rope_freq_scale_swa) if swa else (a.rope_base, a.rope_freq_scale)
            if key not in ropes:
                ropes[key] = Rope(n_rot, key[0], key[1], self.rope_freqs, a.rope_style, n_ctx, device)
            layer.attn.rope = ropes[key]
            layer.attn.cache = KVCache(a.n_kv_head, a.head_dim, n_ctx, layer.attn.window, device, cache_dtype)
        self.n_ctx = n_ctx

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos0: int, last_only: bool = False) -> torch.Tensor:
        """ids: [1, S] token ids at positions pos0.. -> logits [1, S or 1, vocab] float32."""
        if pos0 + ids.shape[1] > self.n_ctx:
            raise IndexError(f"positions up to {pos0 + ids.shape[1]} exceed the context of {self.n_ctx}")
        h = self.tok_embd(ids)  # [1, S, dim]
        if self.args.embed_scale != 1.0:
            h = h * self.args.embed_scale
        for layer in self.layers:
            h = layer(h, pos0)
        if last_only:
            h = h[:, -1:]
        logits = self.output(self.output_norm(h))
        if self.args.final_softcap:
            c = self.args.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits
