"""Prompt-lookup drafting: guess the next tokens by finding the text's latest n-gram earlier in it.

Prompt lookup decoding (Saxena 2023; llama.cpp's ``lookup`` / ``--spec-type ngram`` drafts): when
the output copies from its input -- code being edited, a document being summarized or quoted, a
table being reformatted -- the tokens that followed the last occurrence of the current suffix are a
good guess for what comes next. No draft model: the guesses cost a dictionary lookup, and the model
verifies them in one batched forward pass (:mod:`edgeinfer.engine.speculative`, and the llama.cpp
runner's :mod:`edgeinfer.backends.llama_slots`), so a wrong guess costs only that pass's extra width.

Pure Python (no torch): the llama.cpp runner process imports it too.
"""

from __future__ import annotations

from typing import Iterable


class PromptLookup:
    """An incrementally indexed token sequence that proposes continuations of its own suffix.

    Args:
        n_draft: tokens proposed at most.
        ngram_max / ngram_min: the suffix lengths tried, longest first.

    Each n-gram (``ngram_min <= n <= ngram_max``) maps to the position right after its latest
    occurrence that is followed by a token; :meth:`draft` copies from there. The copy may run into
    the tokens it proposes itself, so a periodic text ("a b a b a b") drafts its whole period.
    """

    def __init__(self, n_draft: int, ngram_max: int = 5, ngram_min: int = 3):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"prompt lookup needs 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.n_draft, self.ngram_max, self.ngram_min = n_draft, ngram_max, ngram_min
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self.k = n_draft  # current draft length (:meth:`feedback`)

    def feedback(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length: double it after a fully accepted draft, else one past what was
        accepted (a wrong guess costs a wider verification pass; long runs of right ones pay)."""
        if drafted:
            self.k = min(self.n_draft, 2 * self.k) if accepted == drafted else max(1, accepted + 1)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens (the prompt, then every accepted or sampled token)."""
        t = self.tokens
        for tok in tokens:
            i = len(t)  # the n-grams ending at i-1 are now followed by tok
            for n in range(self.ngram_min, min(self.ngram_max, i) + 1):
                self._next[tuple(t[i - n:i])] = i
            t.append(int(tok))

    def sync(self, tokens: list[int]) -> None:
        """Make the indexed sequence equal ``tokens``, which must extend it (else it is re-indexed)."""
        n = len(self.tokens)
        if tokens[:n] != self.tokens:
            self.tokens, self._next, self.k = [], {}, self.n_draft
            n = 0
        self.extend(tokens[n:])

    def draft(self, limit: int | None = None) -> list[int]:
        """Up to ``min(limit, current draft length)`` tokens that followed the longest suffix found
        earlier ([] if none)."""
        t = self.tokens
        k = self.k if limit is None else min(limit, self.k)
        if k <= 0:
            return []
        for n in range(min(self.ngram_max, len(t)), self.ngram_min - 1, -1):
            j = self._next.get(tuple(t[len(t) - n:]))
            if j is None:
                continue
            out: list[int] = []
            while len(out) < k:  # past the end, keep copying from what was just proposed
                out.append(t[j] if j < len(t) else out[j - len(t)])
                j += 1
            return out
        return []
