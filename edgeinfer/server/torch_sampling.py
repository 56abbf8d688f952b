"""The torch engine's per-request sampler for the server: llama.cpp's chain as in
:mod:`edgeinfer.sampling`, plus what the APIs add -- presence / frequency penalties (llama.cpp's
``penalty_present`` / ``penalty_freq``), a grammar (llama.cpp's grammar sampler, after the
penalties as in ``Llama._init_sampler``) and log-probabilities of the raw logits.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from edgeinfer.sampling import Sampler, apply_penalties, filter_candidates
from edgeinfer.server.grammar import GrammarFilter


def presence_frequency(logits: torch.Tensor, history: Sequence[int], last_n: int, presence: float,
                       frequency: float) -> torch.Tensor:
    """``logit -= count * frequency + (count > 0) * presence`` over the last ``last_n`` tokens
    (``llama_sampler_penalties_apply``); returns a new tensor."""
    if (presence == 0.0 and frequency == 0.0) or last_n <= 0 or not history:
        return logits
    counts = Counter(history[-last_n:])
    ids = torch.tensor(list(counts), dtype=torch.long)
    c = torch.tensor([counts[i] for i in counts], dtype=logits.dtype)
    out = logits.clone()
    out[ids] -= c * frequency + presence
    return out


class RequestSampler:
    """Callable ``(logits [V] CPU float32, history) -> token id`` for one request."""

    def __init__(self, req, seed: int, backend, job):
        self.p = req.params
        self.base = Sampler(self.p, seed)
        self.job = job
        self.n_top = req.logprobs
        n_vocab = int(backend._lc.llama_vocab_n_tokens(backend._vocab))
        self.grammar = GrammarFilter(backend._vocab, req.grammar, n_vocab) if req.grammar else None

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        p = self.p
        raw = logits
        x = apply_penalties(logits, history, p.repeat_penalty, p.repeat_last_n)
        x = presence_frequency(x, history, p.repeat_last_n, p.presence_penalty, p.frequency_penalty)
        if self.grammar is not None:
            x = x.clone() if x is raw else x
            self.grammar.mask(x)
        if p.temperature <= 0:
            tok = int(torch.argmax(x))
        else:
            ids, vals = filter_candidates(x, p.top_k, p.top_p, p.min_p)
            keep = torch.isfinite(vals)
            ids, vals = ids[keep], vals[keep]
            probs = torch.softmax(vals / p.temperature, dim=-1)
            tok = int(ids[torch.multinomial(probs, 1, generator=self.base.gen)])
        if self.grammar is not None:
            self.grammar.accept(tok)
        if self.n_top is not None:
            lp = torch.log_softmax(raw.double(), dim=-1)
            top = []
            if self.n_top > 0:
                v, i = torch.topk(lp, self.n_top)
                top = [[int(a), float(b)] for a, b in zip(i, v)]
            self.job.logprobs.append([float(lp[tok]), top])
        return tok

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
