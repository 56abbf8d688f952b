"""Speculative decoding for the torch engine: cheap guesses, verified by the model in one batch.

Each step a drafter proposes up to K next tokens -- a small draft model of the same vocabulary
(:class:`ModelDrafter`), or n-gram lookup in the text so far (:class:`LookupDrafter`,
:mod:`edgeinfer.engine.prompt_lookup`) -- and the target model runs the tokens it has not seen yet
plus the K drafts in **one** forward pass over its KV cache, which gives its logits at every draft
position (:meth:`Speculator.tokens`). :func:`verify` then keeps the longest prefix the target agrees
with and adds one token of the target's own, so every step yields at least one token and at most
K + 1. The caches of both models are rolled back past the last accepted token
(:meth:`edgeinfer.models.cache.KVCache.rollback`; only ring buffers need it).

Output (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, speculative sampling):

* greedy (temperature 0): a draft is accepted iff it is the target's argmax at its position
  (repeat penalties applied over the history as in plain decoding), so the text is plain greedy
  decoding's, up to the rounding differences between a batched and a one-token forward pass;
* sampled: draft ``d ~ q`` is accepted with probability ``min(1, p(d) / q(d))``, else the token is
  drawn from ``norm(max(0, p - q))``; ``p`` and ``q`` are the distributions after the sampler chain
  (:meth:`edgeinfer.sampling.Sampler.probs`), so every token follows the target's chain exactly.
  Prompt lookup's drafts are deterministic (``q`` one-hot): accept with probability ``p(d)``.

Which draft lengths pay off: each step costs K draft steps plus one target pass of K + 1
positions; the speed-up is (expected tokens per step) / (that cost in target-step units).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from edgeinfer.backend import SpeculativeOptions
from edgeinfer.engine.prompt_lookup import PromptLookup
from edgeinfer.errors import BackendError
from edgeinfer.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass
class SpecStats:
    """Counts of one generation: tokens proposed, accepted, batched verification passes."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0


def ring_caches(model) -> list:
    """The model's distinct ring-buffer KV caches (sliding windows shorter than the context)."""
    seen = {id(c): c for m in model.modules() if (c := getattr(m, "cache", None)) is not None and c.ring}
    return list(seen.values())


def _tail(history: Sequence[int], sampler: Sampler) -> list[int]:
    """The part of ``history`` the repeat penalty can see."""
    n = sampler.p.repeat_last_n
    return list(history[-n:]) if n > 0 and sampler.p.repeat_penalty != 1.0 else []


def verify(logits: torch.Tensor, drafts: Sequence[int], qs: Sequence[torch.Tensor] | None, sampler: Sampler,
           history: Sequence[int]) -> list[int]:
    """Accept a prefix of ``drafts`` and add one token: the tokens this step yields.

    Args:
        logits: [len(drafts) + 1, V] target logits; row i predicts the token after ``drafts[:i]``.
        drafts: the proposed tokens.
        qs: the draft's distribution at each draft (after the sampler chain), or None when the
            drafts are deterministic (greedy draft model, prompt lookup: ``q`` one-hot).
        sampler: the request's sampler (its chain gives ``p``; its generator the random numbers).
        history: tokens generated so far (the repeat penalty's window).

    Returns:
        ``accepted drafts + [one more token]``: ``len(result) - 1`` drafts were accepted.
    """
    out: list[int] = []
    tail = _tail(history, sampler)
    for i, d in enumerate(drafts):
        if sampler.greedy:
            t = sampler(logits[i], tail + out)
            out.append(t)
            if t != d:
                return out
            continue
        p = sampler.probs(logits[i], tail + out)
        q = qs[i] if qs is not None else None
        qd = float(q[d]) if q is not None else 1.0
        if qd > 0 and sampler.uniform() * qd < float(p[d]):
            out.append(int(d))
            continue
        if q is not None:
            resid = (p - q).clamp_min_(0)
        else:
            resid = p.clone()
            resid[d] = 0
        out.append(sampler.draw(resid) if float(resid.sum()) > 0 else sampler.draw(p))
        return out
    out.append(sampler(logits[len(drafts)], tail + out))
    return out


class LookupDrafter:
    """Drafts by prompt lookup (:class:`~edgeinfer.engine.prompt_lookup.PromptLookup`)."""

    def __init__(self, opts: SpeculativeOptions):
        self.index = PromptLookup(opts.n_draft, opts.ngram_max, opts.ngram_min)

    def propose(self, context: list[int], k: int, sampler: Sampler, history: Sequence[int]):
        """Up to ``k`` tokens after ``context``; ``(drafts, None)`` (deterministic drafts)."""
        self.index.sync(context)
        return self.index.draft(k), None

    def feedback(self, drafted: int, accepted: int) -> None:
        self.index.feedback(drafted, accepted)


class ModelDrafter:
    """Drafts with a small model of the same vocabulary, one token at a time over its own KV cache.

    Greedy requests take the draft's argmax (deterministic, ``q`` one-hot); sampled ones draw from
    the draft's distribution after the same sampler chain and hand it to :func:`verify`. Drafting
    stops early once the draft's top probability is below ``p_min`` (llama.cpp's ``--draft-p-min``).
    """

    def __init__(self, model, device: torch.device, p_min: float, step=None):
        self.model, self.device, self.p_min = model, device, p_min
        self.step = step  # the fused CPU decode step of the draft model (kernels/cpu_step.py), or None
        self.rings = ring_caches(model)
        self.cached: list[int] = []  # tokens whose K/V the draft's cache holds (certain ones first)
        self.mark = 0  # positions >= this in the draft's cache are its own guesses

    def feedback(self, drafted: int, accepted: int) -> None:
        """Nothing: the draft model's own confidence (``p_min``) sets its draft length."""

    def _forward(self, ids: list[int], pos: int) -> torch.Tensor:
        if len(ids) == 1 and self.step is not None:
            return self.step(ids[0], pos)
        if self.step is not None and self.step.can_rows(len(ids)):  # catching up a few tokens: one batched step
            return self.step.rows(ids, pos, head_rows=1)[-1]
        return self.model(torch.tensor([ids], device=self.device), pos, last_only=True)[0, -1]

    def propose(self, context: list[int], k: int, sampler: Sampler, history: Sequence[int]):
        """Up to ``k`` tokens after ``context``: ``(drafts, q per draft or None when greedy)``."""
        c = 0
        while c < min(len(self.cached), len(context) - 1) and self.cached[c] == context[c]:
            c += 1
        if self.rings and c < self.mark:
            c = 0  # a ring cannot rewind into what it overwrote: prefill again
        for r in self.rings:
            r.rollback(c)
        logits = self._forward(context[c:], c)
        self.mark = len(context)
        for r in self.rings:
            r.mark(self.mark)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        tail = _tail(history, sampler)
        fed = len(context)
        while True:
            if sampler.greedy:
                pr = torch.softmax(logits.float(), dim=-1)
                d = int(torch.argmax(pr))
                conf = float(pr[d])
            else:
                q = sampler.probs(logits, tail + drafts)
                d = sampler.draw(q)
                conf = float(q.max())
                qs.append(q)
            if conf < self.p_min and drafts:
                qs = qs[:len(drafts)]
                break
            drafts.append(d)
            if len(drafts) >= k or conf < self.p_min:
                break
            logits = self._forward([d], fed)
            fed += 1
        self.cached = context + drafts[:fed - len(context)]
        return drafts, (None if sampler.greedy else qs)


def vocab_mismatch(a, b) -> str | None:
    """Why two llama.cpp vocabularies (``llama_vocab`` pointers) differ, or None if they are the same."""
    import llama_cpp as lc

    na, nb = lc.llama_vocab_n_tokens(a), lc.llama_vocab_n_tokens(b)
    if na != nb:
        return f"{nb} tokens vs the model's {na}"
    if lc.llama_vocab_type(a) != lc.llama_vocab_type(b):
        return "a different tokenizer type"
    for what, f in (("BOS", lc.llama_vocab_bos), ("EOS", lc.llama_vocab_eos)):
        if f(a) != f(b):
            return f"{what} token {f(b)} vs the model's {f(a)}"
    for i in range(na):
        ta, tb = lc.llama_vocab_get_text(a, i), lc.llama_vocab_get_text(b, i)
        if ta != tb:
            return f"token {i} is {tb!r}, the model's is {ta!r}"
    return None


class Speculator:
    """A drafter for one loaded target model, and the decode loop that verifies its drafts.

    Args:
        target: the target :class:`~edgeinfer.models.base.Transformer`.
        opts: the speculative options (a draft model, or prompt lookup).
        device: where the target runs (the draft model is loaded there too).
        draft_model: the loaded draft model when ``opts.draft`` is set (:meth:`load_draft`), else None
            (prompt lookup).
        draft_step: the draft model's fused CPU decode step (:func:`edgeinfer.kernels.cpu_step.build`),
            or None: its single-token steps then run its forward.
        target_step: the target's fused CPU decode step, or None. With it a verification pass of up
            to ``MAX_ROWS`` tokens is one batched step (the weights read once, no torch ops per layer);
            longer ones (a prompt's tail), models without it and those it cannot batch (``can_rows``)
            run the target's forward.
    """

    def __init__(self, target, opts: SpeculativeOptions, device: torch.device, draft_model=None,
                 draft_step=None, target_step=None):
        self.target, self.opts, self.device = target, opts, device
        self.target_step = target_step
        self.rings = ring_caches(target)
        window = min((r.size for r in self.rings), default=0)
        self.n_draft = max(1, opts.n_draft)
        if window and self.n_draft >= window:
            log.info("speculative: %d drafts do not fit the sliding window of %d; using %d", self.n_draft, window,
                     window - 1)
            self.n_draft = max(1, window - 1)
        self.window = window
        self.drafter = (ModelDrafter(draft_model, device, opts.p_min, draft_step) if draft_model is not None
                        else LookupDrafter(opts))
        self.kind = "draft model" if draft_model is not None else "prompt lookup"
        self.stats = SpecStats()

    @staticmethod
    def load_draft(path: str | Path, target_header, target_vocab, device, n_ctx: int, numerics: str):
        """Load the draft GGUF ``path`` for a target; refuse one whose vocabulary differs.

        Returns:
            (model, vocab llama) -- close the vocab llama when done.
        Raises:
            BackendError / InvalidModelError: unreadable file, or a vocabulary unlike the target's.
        """
        from edgeinfer.backends.common import load_vocab_model
        from edgeinfer.engine.loader import load_model
        from edgeinfer.gguf_check import validate_gguf

        path = Path(path)
        h = validate_gguf(path)
        vocab_llm = load_vocab_model(h)
        why = vocab_mismatch(target_vocab, vocab_llm._model.vocab)
        if why:
            vocab_llm.close()
            raise BackendError(f"{path}: the draft model's vocabulary differs from {target_header.path.name}'s "
                               f"({why}); speculative decoding needs a draft with the same tokenizer "
                               "(e.g. a smaller quant or a smaller model of the same family)")
        model, _ = load_model(path, device, n_ctx, h, numerics)
        return model, vocab_llm

    def tokens(self, tokens: list[int], cached: list[int], sampler: Sampler,
               first_logits: torch.Tensor | None = None) -> Iterator[int]:
        """Generate after ``tokens``; the target's cache holds ``cached`` (a prefix of ``tokens``),
        and ``cached`` is kept equal to what it holds as tokens are accepted.

        ``first_logits``: the prompt's last logits, when the caller prefilled the whole prompt (then
        ``cached == tokens``) -- as plain decoding does: with the target's fused step every later pass
        is a batched step whose rows are plain decoding's own steps, so greedy output is identical by
        construction, not up to rounding.
        """
        self.stats = st = SpecStats()
        model, dev, n_ctx = self.target, self.device, self.target.n_ctx
        context = list(tokens)
        history: list[int] = []  # generated tokens (the repeat penalty's window, as in plain decoding)
        while len(context) <= n_ctx:
            n = len(cached)
            todo = context[n:]
            if first_logits is not None:  # the prompt, prefilled by the caller: its token, no drafts
                logits, drafts, qs, first_logits = first_logits[None], [], None, None
                out = verify(logits, drafts, qs, sampler, history)
                for t in out:
                    yield t
                    history.append(t)
                    context.append(t)
                continue
            k = min(self.n_draft, n_ctx - len(context))
            drafts, qs = self.drafter.propose(context, k, sampler, history) if k > 0 else ([], None)
            if self.window and len(todo) + len(drafts) > self.window:  # a ring logs only one window's writes
                model(torch.tensor([todo[:-1]], device=dev), n, last_only=True)
                cached.extend(todo[:-1])
                n, todo = len(cached), todo[-1:]
            for r in self.rings:
                r.mark(len(context))
            rows = todo + list(drafts)
            if self.target_step is not None and self.target_step.can_rows(len(rows)):
                logits = self.target_step.rows(rows, n, head_rows=len(drafts) + 1)
            else:
                logits = model(torch.tensor([rows], device=dev), n, keep_last=len(drafts) + 1)[0]
            out = verify(logits, drafts, qs, sampler, history)
            n_acc = len(out) - 1
            self.drafter.feedback(len(drafts), n_acc)
            for r in self.rings:
                r.rollback(len(context) + n_acc)
            cached.extend(todo)
            cached.extend(out[:n_acc])
            st.steps += 1
            st.drafted += len(drafts)
            st.accepted += n_acc
            for t in out:
                yield t
                history.append(t)
                context.append(t)
