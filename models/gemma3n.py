"""Gemma 3n text decoder (E2B / E4B): AltUp streams, LAuReL, per-layer embeddings, activation
sparsity, KV-shared layers -- every setting read from the file.

From the GGUF (llama.cpp ``src/models/gemma3n.cpp``; HF ``Gemma3nTextModel`` / ``Gemma3nTextDecoderLayer``):

* the residual is ``n = altup.num_inputs`` streams ``h`` [1, S, n, dim]: stream 0 is the token
  embedding times sqrt(dim), stream k the projection ``altup_proj[k-1]`` of it rescaled to stream
  0's RMS (:meth:`Gemma3n.embed`); at the end streams 1.. go through ``altup_unembd_proj`` (rescaled
  likewise), the n streams are averaged, normed and projected by the tied embedding, then
  soft-capped (:meth:`Gemma3n.head`);
* a layer (:class:`Gemma3nBlock`) first *predicts* all streams from a learned mix
  (:meth:`AltUp.predict`), runs attention + LAuReL + the FFN on the active stream ``a``
  (``altup.active_idx``) only, then *corrects* every stream with that stream's innovation
  (:meth:`AltUp.correct`); the corrected active stream, times ``altup_correct_scale``, gates the
  layer's per-layer embedding (:mod:`edgeinfer.models.ple`), added to streams 1.. (not 0: transformers
  adds to ``[1:]`` whatever the active index);
* LAuReL: ``x + laurel_post_norm(laurel_r(laurel_l(x)))`` beside attention, the two averaged with
  ``1/sqrt(2)``;
* activation sparsity (:class:`SparseMLP`): on layers whose ``activation_sparsity_scale`` z is finite,
  the FFN gate keeps only ``relu(g - mean(g) - z * std(g))`` (gaussian top-k; std with 1/n like
  transformers -- llama.cpp uses 1/(n-1));
* attention: q/k RMSNorm, v RMSNorm without weight, scale 1, NEOX RoPE with the theta of the layer's
  type, sliding window on ``sliding_window_pattern`` layers; the last ``attention.shared_kv_layers``
  layers read the cache of the last earlier layer of their own type (transformers' rule). Their K/V
  tensors, which llama.cpp requires in the file, are left unread (``Transformer.unread``);
* FFN width per layer (``feed_forward_length`` may be an array); norms are plain RMSNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeinfer.errors import InvalidModelError
from edgeinfer.models.base import MLP, Attention, AttnConfig, Block, ModelArgs, RMSNorm, RopeConfig, Scale, Step, \
    Transformer
from edgeinfer.models.cache import kv_sources
from edgeinfer.models.moe import ExpertLinear
from edgeinfer.models.ple import PerLayerGate, PerLayerInputs


@dataclass
class Gemma3nArgs(ModelArgs):
    """:class:`ModelArgs` plus Gemma 3n's own settings."""

    attn: tuple = ()  # AttnConfig per layer
    ple_dim: int = 256
    n_altup: int = 4
    altup_active: int = 0
    laurel_rank: int = 64
    sparsity: tuple = ()  # per layer: the gaussian top-k multiplier Phi^-1(p), or None (no sparsity)


def _key(md: dict, arch: str, key: str, path: str, default=None):
    v = md.get(f"{arch}.{key}", default)
    if v is None:
        raise InvalidModelError(f"{path}: GGUF metadata lacks {arch}.{key}; re-convert the model")
    return v


def _per_layer(v, n: int, what: str, path: str) -> tuple:
    if isinstance(v, list):
        if len(v) != n:
            raise InvalidModelError(f"{path}: {what} has {len(v)} entries for {n} layers")
        return tuple(v)
    return (v,) * n


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> Gemma3nArgs:
    """Build :class:`Gemma3nArgs` from GGUF metadata and tensor shapes (``tensors``: name -> ggml shape)."""
    arch = md["general.architecture"]
    n = int(_key(md, arch, "block_count", path))
    dim = int(_key(md, arch, "embedding_length", path))
    n_head = int(_key(md, arch, "attention.head_count", path))
    n_kv = int(_key(md, arch, "attention.head_count_kv", path))
    hd = int(_key(md, arch, "attention.key_length", path))
    eps = float(md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    swa = tuple(bool(x) for x in _key(md, arch, "attention.sliding_window_pattern", path))
    if len(swa) != n:
        raise InvalidModelError(f"{path}: {arch}.attention.sliding_window_pattern has {len(swa)} entries for {n} layers")
    window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
    ffn = tuple(int(x) for x in _per_layer(_key(md, arch, "feed_forward_length", path), n, "feed_forward_length", path))
    scales = _per_layer(_key(md, arch, "activation_sparsity_scale", path, [float("-inf")] * n), n,
                        "activation_sparsity_scale", path)
    rope_swa = RopeConfig(hd, float(md.get(f"{arch}.rope.freq_base_swa", 10000.0)), style="neox")
    rope_full = RopeConfig(hd, float(md.get(f"{arch}.rope.freq_base", 1000000.0)), style="neox")
    sources = kv_sources(swa, int(md.get(f"{arch}.attention.shared_kv_layers", 0) or 0), path)
    attn = tuple(AttnConfig(dim, n_head, n_kv, hd, rope_swa if swa[i] else rope_full, norm_eps=eps, qk_norm=True,
                            v_norm=True, window=window if swa[i] else 0, scale=1.0, kv_from=sources[i])
                 for i in range(n))
    for name in ("token_embd.weight", "blk.0.laurel_l.weight"):
        if name not in tensors:
            raise InvalidModelError(f"{path}: tensor {name} is missing; re-convert the model")
    n_altup = int(_key(md, arch, "altup.num_inputs", path))
    active = int(md.get(f"{arch}.altup.active_idx", 0))
    if not 0 <= active < n_altup:
        raise InvalidModelError(f"{path}: {arch}.altup.active_idx={active} is not one of {n_altup} streams")
    return Gemma3nArgs(
        arch=arch, n_layer=n, dim=dim, n_head=n_head, n_kv_head=n_kv, head_dim=hd, ffn_dim=ffn,
        vocab_size=int(tensors["token_embd.weight"][1]), norm_eps=eps, sliding_window=window, swa_layers=swa,
        qk_norm=True, act="gelu_tanh", embed_scale=math.sqrt(dim),
        final_softcap=float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0),
        ctx_train=int(md.get(f"{arch}.context_length", 4096)), attn=attn,
        ple_dim=int(_key(md, arch, "embedding_length_per_layer_input", path)), n_altup=n_altup, altup_active=active,
        laurel_rank=int(tensors["blk.0.laurel_l.weight"][1]),
        sparsity=tuple(float(z) if float(z) > float("-inf") else None for z in scales))


class SparseMLP(MLP):
    """GeGLU MLP whose gate, with ``z`` set, keeps only ``relu(g - (mean(g) + z * std(g)))`` per token
    (HF ``Gemma3nTextMLP._gaussian_topk``: the values above the ``Phi(z)`` quantile of a normal fit)."""

    def __init__(self, dim: int, ffn_dim: int, z: float | None):
        super().__init__(dim, ffn_dim, "gelu_tanh")
        self.z = z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.ffn_gate(x), self.ffn_up(x))
        if self.z is not None:
            gate = gate.float()
            std, mean = torch.std_mean(gate, dim=-1, keepdim=True, correction=0)
            gate = F.relu(gate - (mean + std * self.z))
        return self.ffn_down(self.act(gate) * up)


class AltUp(nn.Module):
    """One layer's AltUp (HF ``Gemma3nTextAltUp``) over the streams ``h`` [1, S, n, dim]."""

    def __init__(self, dim: int, n: int, active: int, eps: float):
        super().__init__()
        self.dim, self.n, self.active = dim, n, active
        self.altup_router_norm = RMSNorm(dim, eps)
        self.altup_router = nn.Linear(dim, n, bias=False)
        self.altup_predict_coef = nn.Linear(n, n * n, bias=False)
        self.altup_correct_coef = nn.Linear(n, n, bias=False)
        self.altup_correct_scale = Scale(dim)

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, S, dim] -> tanh(router(norm(x) / dim)) [1, S, n]."""
        return torch.tanh(self.altup_router(self.altup_router_norm(x) * self.dim ** -1.0).float())

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Every stream predicted as itself plus a token-dependent mix of all: [1, S, n, dim] -> same."""
        c = self.altup_predict_coef(self.modalities(h[:, :, self.active]))  # [1, S, n*n]
        c = c.view(*h.shape[:2], self.n, self.n)  # c[j, i]: how much stream i adds to stream j
        return h + torch.matmul(c, h)

    def correct(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """pred [1, S, n, dim], x [1, S, dim] (the layer's output on the active stream) -> corrected streams."""
        coefs = self.altup_correct_coef(self.modalities(x)) + 1.0  # [1, S, n]
        innovation = x - pred[:, :, self.active]  # [1, S, dim]
        return pred + coefs[..., None] * innovation[:, :, None, :]


class Laurel(nn.Module):
    """Learned augmented residual: ``x + laurel_post_norm(laurel_r(laurel_l(x)))`` (HF ``Gemma3nTextLaurelBlock``)."""

    def __init__(self, dim: int, rank: int, eps: float):
        super().__init__()
        self.laurel_l = nn.Linear(dim, rank, bias=False)
        self.laurel_r = nn.Linear(rank, dim, bias=False)
        self.laurel_post_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.laurel_post_norm(self.laurel_r(self.laurel_l(x)))


class Gemma3nBlock(Block):
    """One Gemma 3n layer (see the module docstring)."""

    def __init__(self, a: Gemma3nArgs, i: int):
        super().__init__(a.dim, a.norm_eps, Attention(a.attn[i]), SparseMLP(a.dim, a.at("ffn_dim", i), a.sparsity[i]),
                         sandwich=True)
        self.i = i
        self.altup = AltUp(a.dim, a.n_altup, a.altup_active, a.norm_eps)
        self.laurel = Laurel(a.dim, a.laurel_rank, a.norm_eps)
        self.ple = PerLayerGate(a.dim, a.ple_dim, a.norm_eps, a.act)

    def forward(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        """h: streams [1, S, n, dim] -> same."""
        pred = self.altup.predict(h)
        act = pred[:, :, self.altup.active]  # [1, S, dim]
        x = self.attn_norm(act)
        lau = self.laurel(x)
        x = (act + self.post_attention_norm(self.attn(x, step)) + lau) / math.sqrt(2.0)
        x = x + self.post_ffw_norm(self.ffn(self.ffn_norm(x)))
        out = self.altup.correct(pred, x)
        first = self.altup.altup_correct_scale(out[:, :, self.altup.active])
        ple = self.ple(first, step.layer_inputs[:, :, self.i])  # [1, S, dim]
        return torch.cat([out[:, :, :1], out[:, :, 1:] + ple[:, :, None]], dim=2)


def _rescaled(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x scaled to the per-token RMS ``target`` [.., 1] (HF clamps the mean square at 1e-5)."""
    return x * target / torch.sqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=1e-5))


class Gemma3n(Transformer):
    """The decoder with AltUp streams, the per-layer embeddings (table kept in the memory map) and
    the stacked AltUp projections."""

    def __init__(self, a: Gemma3nArgs):
        super().__init__(a, [Gemma3nBlock(a, i) for i in range(a.n_layer)])
        self.ple = PerLayerInputs(a.vocab_size, a.n_layer, a.dim, a.ple_dim, a.norm_eps)
        self.altup_proj = ExpertLinear(a.n_altup - 1, a.dim, a.dim)  # [n-1, dim, dim]: stream k+1 from stream 0
        self.altup_unembd_proj = ExpertLinear(a.n_altup - 1, a.dim, a.dim)
        shared = [i for i, c in enumerate(a.attn) if c.kv_from is not None]
        self.unread = {f"blk.{i}.{s}.weight" for i in shared for s in ("attn_k", "attn_v", "attn_k_norm")}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, S] -> the AltUp streams [1, S, n, dim]."""
        e = self.token_embd(ids) * self.args.embed_scale  # [1, S, dim]
        target = e.pow(2).mean(-1, keepdim=True).sqrt()
        streams = [e] + [_rescaled(self.altup_proj.expert(k)(e), target) for k in range(self.args.n_altup - 1)]
        return torch.stack(streams, dim=2)

    def layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """ids [1, S], streams h -> per-layer inputs [1, S, n_layer, P] (from stream 0, the embedding)."""
        return self.ple(ids, h[:, :, 0])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Streams [1, S, n, dim] -> their mean (streams 1.. through altup_unembd_proj) -> logits."""
        target = h[:, :, 0].pow(2).mean(-1, keepdim=True).sqrt()
        out = [h[:, :, 0]] + [_rescaled(self.altup_unembd_proj.expert(k)(h[:, :, k + 1]), target)
                              for k in range(self.args.n_altup - 1)]
        return super().head(torch.stack(out).mean(0))


def build(a: Gemma3nArgs) -> Transformer:
    """The model (on whatever device is current, normally ``meta``)."""
    return Gemma3n(a)
