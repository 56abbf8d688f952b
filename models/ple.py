"""Per-layer embeddings (PLE), shared by the architectures that have them (Gemma 3n; Gemma 4 E2B/E4B).

Every layer ``i`` receives its own small input ``ple[:, :, i]`` of width ``P``, computed once per
forward pass from the token ids and the scaled token embedding ``e`` (HF
``Gemma3nTextModel.get_per_layer_inputs`` / ``project_per_layer_inputs``; llama.cpp
``build_inp_per_layer`` / ``project_per_layer_inputs`` in ``src/models/gemma3n.cpp``)::

    ple = (per_layer_proj_norm(per_layer_model_proj(e) / sqrt(dim))      # [1, S, L, P]
           + per_layer_token_embd[ids] * sqrt(P)) / sqrt(2)

and a layer mixes it into its stream through a gate (:class:`PerLayerGate`)::

    post_norm(proj(gelu(inp_gate(x)) * ple[:, :, i]))                   # [1, S, dim]

The table ``per_layer_token_embd`` [vocab, L * P] is the largest tensor of these models (2.3 G
parameters for the 2B ones). It is an ``nn.Embedding``, which the loader replaces with a host-resident
:class:`~edgeinfer.kernels.qlinear.QuantEmbedding`: it stays in the memory-mapped file and only the
rows of the current tokens are read and dequantized -- what llama.cpp does with its input layer.

Module attribute names are the GGUF stems; the containers (``ple``) are dropped from GGUF names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeinfer.models.base import RMSNorm, activation


class PerLayerInputs(nn.Module):
    """The per-layer embedding table and its projection of the token embedding.

    Args:
        vocab / n_layer / dim / ple_dim / eps: table rows, layers, model width, ``P``, RMSNorm epsilon.
    """

    def __init__(self, vocab: int, n_layer: int, dim: int, ple_dim: int, eps: float):
        super().__init__()
        self.n_layer, self.dim, self.ple_dim = n_layer, dim, ple_dim
        self.per_layer_token_embd = nn.Embedding(vocab, n_layer * ple_dim)
        self.per_layer_model_proj = nn.Linear(dim, n_layer * ple_dim, bias=False)
        self.per_layer_proj_norm = RMSNorm(ple_dim, eps)

    def forward(self, ids: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """ids [1, S], e [1, S, dim] (the scaled token embedding) -> per-layer inputs [1, S, L, P]."""
        shape = (*ids.shape, self.n_layer, self.ple_dim)
        tok = self.per_layer_token_embd(ids).reshape(shape) * math.sqrt(self.ple_dim)  # only these rows are read
        ctx = self.per_layer_proj_norm((self.per_layer_model_proj(e) * self.dim ** -0.5).reshape(shape))
        return (ctx + tok) * (2.0 ** -0.5)


class PerLayerGate(nn.Module):
    """One layer's use of its per-layer input: ``post_norm(proj(act(inp_gate(x)) * ple_i))``."""

    def __init__(self, dim: int, ple_dim: int, eps: float, act: str = "gelu_tanh"):
        super().__init__()
        self.inp_gate = nn.Linear(dim, ple_dim, bias=False)
        self.proj = nn.Linear(ple_dim, dim, bias=False)
        self.post_norm = RMSNorm(dim, eps)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, ple_i: torch.Tensor) -> torch.Tensor:
        """x [1, S, dim], ple_i [1, S, P] -> [1, S, dim]."""
        return self.post_norm(self.proj(self.act(self.inp_gate(x)) * ple_i))
