"""The runner's decode loop: requests in sequence slots, one ``llama_decode`` per step for all of them.

Each slot is a llama.cpp sequence (``seq_id``) with its own sampler chain and the tokens whose
K/V it holds. A step puts the next token of every generating slot and a chunk of every waiting
prompt into one ``llama_batch`` (continuous batching, as llama-server does), decodes it once and
samples one token per slot that produced logits. A new request takes the free slot whose cached
tokens share the longest prefix with its prompt, and only the rest of the prompt is decoded.

The sampler chain is llama-cpp-python's (``Llama._init_sampler``): penalties, then greedy when
``temperature <= 0``, else top-k, typical (1.0), top-p, min-p, temperature, a seeded dist --
so the same seed gives the same tokens as ``llama_cpp.Llama.generate``. A request may add a GBNF
``grammar`` (after the penalties, where ``Llama._init_sampler`` puts it) and ask for ``n_probs``:
the log-probability of each sampled token and the ``n_probs`` most likely ones, from the log-softmax
of the raw logits (the model's distribution, as OpenAI's ``logprobs`` report it).

Prompt lookup (a request's ``spec``, :mod:`edgeinfer.engine.prompt_lookup`): a generating slot puts
its next token *and* up to ``n_draft`` guessed tokens into the batch, all with logits; the slot's
sampler then samples row by row and stops at the first token that differs from the guess (that
token is the step's last). Sampling and comparing is exact speculative sampling for deterministic
drafts (accept ``d`` with probability ``p(d)``, else a token from ``p`` without ``d``), and the
sampler sees exactly the tokens emitted, so its penalties and RNG advance as in plain decoding
(greedy output is plain greedy's). The K/V of rejected guesses are dropped with ``seq_rm``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from edgeinfer.engine.prompt_lookup import PromptLookup


@dataclass
class Request:
    """One generation: the prompt, how many tokens at most, the sampling fields (runner_protocol)."""

    id: int
    tokens: list[int]
    n_max: int
    sampling: dict
    seed: int = 0
    spec: dict | None = None  # prompt lookup: n_draft, ngram_max, ngram_min (runner_protocol)


@dataclass
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V this sequence holds, in order
    req: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_tok: int | None = None  # sampled, not decoded yet
    sampler: object = None
    n_gen: int = 0
    n_reused: int = 0
    t_start: float = 0.0  # when the request got this slot
    t_first: float = 0.0  # when its first token was sampled
    t_last: float = 0.0
    out_index: int = -1  # row of this slot's logits in the current batch, -1 if none
    lookup: PromptLookup | None = None  # prompt-lookup drafting, when the request asks for it
    drafts: list[int] = field(default_factory=list)  # guesses in the current batch, after next_tok
    spec: list[int] = field(default_factory=lambda: [0, 0, 0])  # drafted, accepted, verify steps


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotEngine:
    """Runs requests on ``n_seq`` sequences of one llama.cpp context; events go to ``emit``."""

    def __init__(self, lc, model, ctx, n_seq: int, n_batch: int, n_ctx_seq: int, emit: Callable[[dict], None]):
        self.lc, self.ctx = lc, ctx
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.mem = lc.llama_get_memory(ctx)
        self.n_batch, self.n_ctx_seq = n_batch, n_ctx_seq
        self.emit = emit
        self.slots = [Slot(seq) for seq in range(n_seq)]
        self.queue: deque[Request] = deque()
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    # -- requests --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(s.req is not None for s in self.slots)

    def submit(self, req: Request) -> None:
        self.queue.append(req)

    def cancel(self, req_id: int) -> None:
        for i, r in enumerate(self.queue):
            if r.id == req_id:
                del self.queue[i]
                self.emit({"ev": "end", "id": req_id, "reason": "cancelled", "n_cached": 0})
                return
        for s in self.slots:
            if s.req is not None and s.req.id == req_id:
                self._finish(s, "cancelled")
                return

    def _assign(self) -> None:
        while self.queue:
            free = [s for s in self.slots if s.req is None]
            if not free:
                return
            req = self.queue.popleft()
            slot = max(free, key=lambda s: common_prefix(s.cached, req.tokens))
            self._start(slot, req)

    def _start(self, slot: Slot, req: Request) -> None:
        keep = common_prefix(slot.cached, req.tokens)
        if keep == len(req.tokens):
            keep -= 1  # decode the last prompt token again: its logits are needed
        if not self.lc.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
            keep = 0
            self.lc.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        slot.cached = req.tokens[:keep]
        slot.pending = req.tokens[keep:]
        slot.req, slot.n_gen, slot.n_reused, slot.next_tok = req, 0, keep, None
        slot.t_start = slot.t_first = slot.t_last = time.perf_counter()
        slot.sampler = self._sampler(req.sampling, req.seed)
        sp = req.spec
        slot.lookup = PromptLookup(int(sp["n_draft"]), int(sp.get("ngram_max", 5)), int(sp.get("ngram_min", 3))) \
            if sp and int(sp.get("n_draft", 0)) > 0 else None
        slot.drafts, slot.spec = [], [0, 0, 0]
        if slot.sampler is None:
            self._finish(slot, "error", "the grammar does not parse (llama.cpp's GBNF parser refused it)")

    def _sampler(self, s: dict, seed: int):
        """The sampler chain of one request; None if its grammar does not parse."""
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda smpl: lc.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        add(lc.llama_sampler_init_penalties(self.n_vocab, s["repeat_last_n"], s["repeat_penalty"],
                                            s["frequency_penalty"], s["presence_penalty"]))
        if s.get("grammar"):
            g = lc.llama_sampler_init_grammar(self.vocab, s["grammar"].encode("utf-8"), b"root")
            if not g:
                lc.llama_sampler_free(chain)
                return None
            add(g)
        if s["temperature"] <= 0:
            add(lc.llama_sampler_init_greedy())
        else:
            add(lc.llama_sampler_init_top_k(s["top_k"]))
            add(lc.llama_sampler_init_typical(1.0, 1))
            add(lc.llama_sampler_init_top_p(s["top_p"], 1))
            add(lc.llama_sampler_init_min_p(s["min_p"], 1))
            add(lc.llama_sampler_init_temp(s["temperature"]))
            add(lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _finish(self, slot: Slot, reason: str, error: str = "") -> None:
        req = slot.req
        if slot.sampler is not None:
            self.lc.llama_sampler_free(slot.sampler)
        slot.req, slot.sampler, slot.pending, slot.next_tok, slot.out_index = None, None, [], None, -1
        slot.lookup, slot.drafts = None, []
        if error:
            self.emit({"ev": "error", "id": req.id, "message": error})
            return
        self.emit({"ev": "end", "id": req.id, "reason": reason, "n_cached": slot.n_reused, "n_gen": slot.n_gen,
                   "prefill_s": slot.t_first - slot.t_start, "decode_s": slot.t_last - slot.t_first,
                   "spec": slot.spec})

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        """Decode one batch and sample a token for every slot whose logits it produced."""
        self._assign()
        b, n = self.batch, 0
        fed: list[tuple[Slot, list[int]]] = []  # what each slot put into this batch
        waiting = sum(1 for s in self.slots if s.req is not None and s.next_tok is not None)
        for s in self.slots:  # generating slots first: one token each (and their guesses)
            s.out_index = -1
            if s.req is None or s.next_tok is None:
                continue
            if len(s.cached) >= self.n_ctx_seq:
                waiting -= 1
                self._finish(s, "context")
                continue
            s.out_index = n
            n = self._add(b, n, s.next_tok, len(s.cached), s.seq, True)
            waiting -= 1
            s.drafts = self._drafts(s, n + waiting)
            for i, tok in enumerate(s.drafts):
                n = self._add(b, n, tok, len(s.cached) + 1 + i, s.seq, True)
            fed.append((s, [s.next_tok]))
        for s in self.slots:  # then prompt chunks, as far as the batch goes
            if s.req is None or not s.pending or n >= self.n_batch:
                continue
            take = s.pending[: self.n_batch - n]
            pos = len(s.cached)
            for i, tok in enumerate(take):
                n = self._add(b, n, tok, pos + i, s.seq, False)
            del s.pending[: len(take)]
            if not s.pending:
                b.logits[n - 1] = 1
                s.out_index = n - 1
            fed.append((s, take))
        if n == 0:
            return
        b.n_tokens = n
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            for s, _ in fed:
                self.emit({"ev": "error", "id": s.req.id, "message": f"llama_decode returned {rc}"})
                self.lc.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
                s.cached = []
                self._finish(s, "error")
            return
        for s, toks in fed:
            s.cached.extend(toks)
            s.next_tok = None
            if s.out_index >= 0:
                self._sample(s)

    def _drafts(self, s: Slot, n: int) -> list[int]:
        """Prompt-lookup guesses after ``s.next_tok`` that fit the batch (``n`` rows used), the
        context and the request's token budget."""
        if s.lookup is None:
            return []
        s.lookup.sync(s.cached + [s.next_tok])
        room = min(self.n_batch - n, self.n_ctx_seq - len(s.cached) - 1, s.req.n_max - s.n_gen - 1)
        return s.lookup.draft(room) if room > 0 else []

    def _sample(self, s: Slot) -> None:
        """Sample the slot's rows of the batch: one token, or with guesses up to the first that the
        sampled token differs from; drop the K/V of the guesses that were not accepted."""
        drafts, s.drafts = s.drafts, []
        out: list[int] = []
        lps: list = []
        n_probs = s.req.sampling.get("n_probs")  # 0: the sampled token's log-probability only
        reason = None
        for i in range(len(drafts) + 1):
            tok = self.lc.llama_sampler_sample(s.sampler, self.ctx, s.out_index + i)
            out.append(tok)
            s.n_gen += 1
            if n_probs is not None:
                lps.append(self._logprobs(s.out_index + i, tok, int(n_probs)))
            if self.lc.llama_vocab_is_eog(self.vocab, tok):
                reason = "eog"
            elif s.n_gen >= s.req.n_max:
                reason = "length"
            if reason is None and i < len(drafts) and tok == drafts[i]:
                s.cached.append(tok)  # its K/V were computed in this batch
                continue
            break
        s.t_last = time.perf_counter()
        if s.n_gen == len(out):
            s.t_first = s.t_last
        if s.lookup is not None:
            s.lookup.feedback(len(drafts), len(out) - 1)
            s.spec[0] += len(drafts)
            s.spec[1] += len(out) - 1 if reason is None else sum(1 for a, b in zip(out, drafts) if a == b)
            s.spec[2] += 1
        if drafts:
            self.lc.llama_memory_seq_rm(self.mem, s.seq, len(s.cached), -1)
        for j, tok in enumerate(out):
            msg = {"ev": "tok", "id": s.req.id, "tok": tok}
            if lps:
                msg["lp"] = lps[j]
            if s.lookup is not None:
                msg["spec"] = s.spec
            self.emit(msg)
        if reason is not None:
            self._finish(s, reason)
        else:
            s.next_tok = out[-1]  # decoded (its K/V written) in the next step

    def _logprobs(self, row: int, tok: int, n_top: int) -> list:
        """``[logprob of tok, [[id, logprob], ...n_top best]]`` from the raw logits of batch row ``row``."""
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)  # [V], a copy
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top = []
        if n_top > 0:
            ids = np.argpartition(-logits, n_top - 1)[:n_top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            top = [[int(i), float(logits[i] - lse)] for i in ids]
        return [float(logits[tok] - lse), top]

    @staticmethod
    def _add(b, n: int, tok: int, pos: int, seq: int, logits: bool) -> int:
        b.token[n] = tok
        b.pos[n] = pos
        b.n_seq_id[n] = 1
        b.seq_id[n][0] = seq
        b.logits[n] = 1 if logits else 0
        return n + 1

    def close(self) -> None:
        for s in self.slots:
            if s.sampler is not None:
                self.lc.llama_sampler_free(s.sampler)
                s.sampler = None
        self.lc.llama_batch_free(self.batch)
