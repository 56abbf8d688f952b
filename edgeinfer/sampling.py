"""Token sampling for the torch engine, with llama.cpp's sampler chain and semantics.

The chain llama-cpp-python builds (``Llama._init_sampler``) and that the llama.cpp backend
therefore uses: ``penalties -> top_k -> (typical, off) -> top_p -> min_p -> temp -> dist``, or
``penalties -> greedy`` when the temperature is 0. Each step follows ``src/llama-sampler.cpp``:

* penalties: each distinct token among the last ``repeat_last_n`` *generated* tokens (the
  chain is rebuilt per request and only sees sampled tokens) has its logit divided by
  ``repeat_penalty`` if positive, multiplied if not; ``repeat_last_n <= 0`` turns it off;
* top_k: keep the k largest logits (k <= 0: off);
* top_p: softmax over the survivors, keep the smallest prefix (by descending probability)
  whose cumulative probability reaches p (at least one token); p >= 1: off;
* min_p: keep logits >= max_logit + ln(min_p); min_p <= 0: off;
* temp: divide the logits by the temperature; dist: sample from their softmax.

The random generator is torch's (seeded per request), so sampled text with temperature > 0
differs from llama.cpp's (std::mt19937); greedy decoding is identical given identical logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from edgeinfer.backend import SamplingParams


def apply_penalties(logits: torch.Tensor, history: Sequence[int], penalty: float, last_n: int) -> torch.Tensor:
    """Repeat penalty over the distinct tokens of ``history[-last_n:]`` (returns a new tensor)."""
    if penalty == 1.0 or last_n <= 0 or not history:  # llama.cpp clamps last_n < 0 to 0 (off)
        return logits
    recent = history[-last_n:]
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    out = logits.clone()
    sel = out[ids]
    out[ids] = torch.where(sel <= 0, sel * penalty, sel / penalty)
    return out


def filter_candidates(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k -> top_p -> min_p on a [V] logit vector.

    Returns:
        (ids, logits) of the surviving candidates, sorted by descending logit.
    """
    vals, ids = torch.sort(logits, descending=True)
    if top_k > 0:
        vals, ids = vals[:top_k], ids[:top_k]
    if top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        reached = torch.nonzero(cum >= top_p)
        keep = int(reached[0]) + 1 if len(reached) else len(vals)
        vals, ids = vals[:keep], ids[:keep]
    if min_p > 0.0:
        keep = int((vals >= vals[0] + math.log(min_p)).sum())
        vals, ids = vals[:max(1, keep)], ids[:max(1, keep)]
    return ids, vals


class Sampler:
    """Picks the next token from logits, llama.cpp style.

    Args:
        params: the request's sampling parameters.
        seed: RNG seed (``params.seed`` if set, else the load-time seed).
    """

    def __init__(self, params: SamplingParams, seed: int):
        self.p = params
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: [V] (any device) -> the sampled token id."""
        p = self.p
        logits = apply_penalties(logits.float().cpu(), history, p.repeat_penalty, p.repeat_last_n)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        ids, vals = filter_candidates(logits, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(vals / p.temperature, dim=-1)
        return int(ids[torch.multinomial(probs, 1, generator=self.gen)])

    @property
    def greedy(self) -> bool:
        return self.p.temperature <= 0

    def probs(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The distribution :meth:`__call__` samples from, over the whole vocabulary: [V] float32 (CPU).

        Zero outside the candidates the chain keeps; one-hot at the argmax when greedy. Speculative
        decoding (:mod:`edgeinfer.engine.speculative`) compares the model's and the draft's.
        """
        p = self.p
        logits = apply_penalties(logits.float().cpu(), history, p.repeat_penalty, p.repeat_last_n)
        out = torch.zeros_like(logits)
        if p.temperature <= 0:
            out[int(torch.argmax(logits))] = 1.0
            return out
        ids, vals = filter_candidates(logits, p.top_k, p.top_p, p.min_p)
        out[ids] = torch.softmax(vals / p.temperature, dim=-1)
        return out

    def draw(self, probs: torch.Tensor) -> int:
        """A token id drawn from the (not necessarily normalized) weights ``probs`` [V]."""
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def uniform(self) -> float:
        """A uniform number in [0, 1) from this sampler's generator."""
        return float(torch.rand((), generator=self.gen))
