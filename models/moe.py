"""Mixture-of-Experts: routing variants as data, stacked experts computed only where tokens go.

* :class:`Routing` + :func:`route` -- router logits -> (expert ids, weights) per token: softmax or
  sigmoid scores, optional selection bias (DeepSeek's ``e_score_correction_bias``), group-limited
  selection (``n_group`` / ``topk_group``), renormalisation of the chosen weights, a final scale.
  Mixtral, Qwen2/3-MoE, DeepSeek-V3 and Gemma 4 are rows of data, not code paths.
* :class:`ExpertLinear` -- one projection of every expert, a 3-D ``weight`` ``[E, out, in]``
  (GGUF ``blk.N.ffn_*_exps``); the loader swaps in per-expert quantized views of the file's blocks.
* :class:`Experts` -- the experts' gated MLPs, computed grouped by expert: the tokens routed to
  expert ``e`` are gathered, pushed through its three projections in one batch and scattered back
  with their weights. Only experts some token chose are touched.
* :class:`MoE` -- router + experts (+ an optional shared expert, optionally gated): the FFN of a
  block (``Block(..., ffn=MoE(...))``).

References: HF ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``, ``DeepseekV3MoE``,
``Gemma4TextRouter``; llama.cpp ``build_moe_ffn`` (src/llama-graph.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from edgeinfer.models.base import MLP, activation


@dataclass(frozen=True)
class Routing:
    """How router logits choose experts.

    Attributes:
        n_expert / top_k: experts per layer and per token.
        score: ``softmax`` (over all experts, float32) or ``sigmoid``.
        norm_topk: renormalise the chosen weights to sum to 1 (``norm_topk_prob``).
        n_group / topk_group: group-limited routing: experts split into ``n_group`` groups scored by
            the sum of their two best scores; only the ``topk_group`` best groups may be chosen.
        scale: multiplies the final weights (``routed_scaling_factor``).
        norm_eps: added to the sum when renormalising (DeepSeek: 1e-20).
    """

    n_expert: int
    top_k: int
    score: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    norm_eps: float = 0.0


def route(logits: torch.Tensor, r: Routing, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] float32).

    ``bias`` (DeepSeek) shifts the scores used to *choose* experts; the weights come from the
    unbiased scores. Masked groups get a choice score of 0 (as HF's ``masked_fill(..., 0.0)``).
    """
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if r.score == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores if bias is None else scores + bias.float()
    if r.n_group > 1:
        t = choice.shape[0]
        groups = choice.view(t, r.n_group, -1)  # [T, G, E/G]
        gscore = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(r.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(groups.shape[-1], dim=1), 0.0)
    idx = torch.topk(choice, r.top_k, dim=-1).indices  # [T, k]
    w = scores.gather(1, idx)
    if r.norm_topk:
        w = w / (w.sum(-1, keepdim=True) + r.norm_eps)
    if r.scale != 1.0:
        w = w * r.scale
    return idx, w


class ExpertLinear(nn.Module):
    """``y = x @ W[e].T`` for every expert ``e``: ``weight`` [E, out, in] (GGUF ``ffn_*_exps``).

    Built on ``meta`` like ``nn.Linear``; the loader replaces it with quantized per-expert views.
    """

    def __init__(self, n_expert: int, in_features: int, out_features: int):
        super().__init__()
        self.n_expert, self.in_features, self.out_features = n_expert, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_expert, out_features, in_features), requires_grad=False)

    def expert(self, e: int):
        """A callable computing expert ``e``'s projection: x [.., in] -> [.., out] float32."""
        return lambda x: torch.nn.functional.linear(x.float(), self.weight[e].float())

    def will_use(self, experts: list[int]) -> None:
        """Told which experts a batch chose before any is computed (an offloading replacement starts
        copying them to the device here); nothing to do for weights that are all resident."""


class Experts(nn.Module):
    """The routed experts' gated MLPs ``down_e(act(gate_e(x)) * up_e(x))``, grouped by expert.

    ``fused=True``: gate and up are one ``ffn_gate_up_exps`` projection (first half gate), as
    Gemma 4 stores them.
    """

    def __init__(self, n_expert: int, dim: int, ffn_dim: int, act: str = "silu", fused: bool = False):
        super().__init__()
        self.n_expert, self.fused = n_expert, fused
        if fused:
            self.ffn_gate_up_exps = ExpertLinear(n_expert, dim, 2 * ffn_dim)
        else:
            self.ffn_gate_exps = ExpertLinear(n_expert, dim, ffn_dim)
            self.ffn_up_exps = ExpertLinear(n_expert, dim, ffn_dim)
        self.ffn_down_exps = ExpertLinear(n_expert, ffn_dim, dim)
        self.act = activation(act)

    def projections(self) -> list:
        """The expert projections (each with ``expert(e)`` and ``will_use(experts)``)."""
        names = ("ffn_gate_up_exps",) if self.fused else ("ffn_gate_exps", "ffn_up_exps")
        return [getattr(self, n) for n in (*names, "ffn_down_exps")]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on the rows ``x`` [n, dim] -> [n, dim] float32."""
        if self.fused:
            gate, up = self.ffn_gate_up_exps.expert(e)(x).chunk(2, dim=-1)
        else:
            gate, up = self.ffn_gate_exps.expert(e)(x), self.ffn_up_exps.expert(e)(x)
        return self.ffn_down_exps.expert(e)(self.act(gate) * up)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, dim], idx / w [T, k] -> sum_j w[t, j] * expert_{idx[t, j]}(x[t]): [T, dim] float32."""
        t, k = idx.shape
        if t == 1:  # decode: k experts of one row; same sum in the same (expert id) order, no gather/scatter
            pairs = sorted(zip(idx[0].tolist(), w[0].float().tolist()))
            for proj in self.projections():
                proj.will_use([e for e, _ in pairs])
            out = None
            for e, we in pairs:
                y = self.one(e, x) * we
                out = y if out is None else out + y
            return out
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        sorted_e = flat[order]
        experts, counts = torch.unique_consecutive(sorted_e, return_counts=True)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        wflat = w.reshape(-1, 1).float()
        chosen = experts.tolist()
        for proj in self.projections():
            proj.will_use(chosen)
        start = 0
        for e, n in zip(chosen, counts.tolist()):  # only the chosen experts
            slots = order[start:start + n]
            tok = slots // k
            out.index_add_(0, tok, self.one(e, x[tok]) * wflat[slots])
            start += n
        return out


class MoE(nn.Module):
    """A routed FFN: ``sum_k w_k * expert_k(x)`` (+ ``[sigmoid(gate(x)) *] shared(x)``).

    ``ffn_gate_inp`` is the router (logits = x @ W^T); ``exp_probs_b`` the optional selection bias.
    Architectures with a different router (Gemma 4 normalises and scales its input) subclass it and
    override :meth:`router_logits` / :meth:`weights`.
    """

    def __init__(self, dim: int, ffn_dim: int, routing: Routing, act: str = "silu", fused: bool = False,
                 shared_ffn: int = 0, shared_gate: bool = False, selection_bias: bool = False):
        super().__init__()
        self.routing = routing
        self.ffn_gate_inp = nn.Linear(dim, routing.n_expert, bias=False)
        self.experts = Experts(routing.n_expert, dim, ffn_dim, act, fused)
        self.shared = (MLP(dim, shared_ffn, act, stems=("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"))
                       if shared_ffn else None)
        self.ffn_gate_inp_shexp = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.exp_probs_b = _Bias(routing.n_expert) if selection_bias else None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, dim] -> router logits [T, E]."""
        return self.ffn_gate_inp(x)

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (expert ids [T, k], weights [T, k]): the routing decision."""
        bias = self.exp_probs_b.bias if self.exp_probs_b is not None else None
        return route(self.router_logits(x), self.routing, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim] float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()  # [T, dim]
        idx, w = self.weights(x2)
        y = self.experts(x2, idx, w)
        if self.shared is not None:
            s = self.shared(x2)
            if self.ffn_gate_inp_shexp is not None:
                s = torch.sigmoid(self.ffn_gate_inp_shexp(x2)) * s
            y = y + s
        return y.reshape(*lead, y.shape[-1])


class _Bias(nn.Module):
    """A bias-only tensor (GGUF ``blk.N.exp_probs_b.bias``)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n), requires_grad=False)
