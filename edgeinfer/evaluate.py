"""Quality evaluation: perplexity, and KL-divergence / top-1 agreement against a reference.

Method (llama.cpp's ``llama-perplexity``): the text is tokenized once and cut into chunks of
``n_ctx`` tokens; each chunk starts fresh (BOS first when the model adds BOS) and only the second
half of each chunk is scored, so every scored token has at least ``n_ctx/2`` tokens of context.
KL-divergence is ``KL(P_ref || P_model)`` per scored token, from full-vocabulary log-probs.

The logits come from a :class:`LogitsSource`; :class:`LlamaCppLogits` (llama.cpp with
``logits_all``) is the default. Reference log-probs can be saved (``--save-logits``, float16 .npz)
so a large reference model need not be loaded again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from edgeinfer.errors import EdgeinferError


class LogitsSource(Protocol):
    """Anything that returns next-token logits for every position of a token sequence."""

    n_vocab: int
    add_bos: bool
    bos_id: int

    def tokenize(self, text: str) -> list[int]: ...

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``tokens`` [T] -> logits float32 [T, n_vocab] (row i predicts token i+1)."""
        ...


class LlamaCppLogits:
    """Logits from llama.cpp (a fresh sequence per call)."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None):
        from edgeinfer.backends.common import default_threads
        from edgeinfer.backends.llamacpp import check_known_architecture
        from edgeinfer.gguf_check import validate_gguf

        check_known_architecture(validate_gguf(path))
        import llama_cpp

        from edgeinfer.backends.llama_placement import open_llama

        threads = n_threads or default_threads()
        self.llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.llm._model.vocab))
        self.bos_id = self.llm.token_bos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (x: [T, V])."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class EvalResult:
    """Scores over ``n_tokens`` scored positions."""

    n_tokens: int
    n_chunks: int
    n_ctx: int
    perplexity: float
    nll: float
    ref_perplexity: float | None = None
    mean_kl: float | None = None
    p99_kl: float | None = None
    max_kl: float | None = None
    top1_agreement: float | None = None
    kl_per_token: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("kl_per_token")
        return d


def chunks(tokens: list[int], n_ctx: int, add_bos: bool, bos_id: int, max_chunks: int | None) -> Iterator[list[int]]:
    """Cut ``tokens`` into evaluation chunks of exactly ``n_ctx`` tokens (BOS first if the model uses it)."""
    body = n_ctx - 1 if add_bos else n_ctx
    n = len(tokens) // body
    if max_chunks:
        n = min(n, max_chunks)
    for i in range(n):
        part = tokens[i * body:(i + 1) * body]
        yield ([bos_id] + part) if add_bos else part


def evaluate(model: LogitsSource, text: str, n_ctx: int = 512, max_chunks: int | None = None,
             ref: LogitsSource | None = None, ref_logprobs: dict | None = None,
             save_logprobs: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Perplexity of ``model`` on ``text``; with a reference, KL-divergence and top-1 agreement.

    Args:
        model: the model under test.
        text: evaluation text.
        n_ctx: chunk length in tokens; the second half of each chunk is scored.
        max_chunks: evaluate at most this many chunks.
        ref: a reference model run on the same tokens (same vocabulary required).
        ref_logprobs: saved reference (from ``save_logprobs``): {"tokens", "logprobs", "n_ctx"}.
        save_logprobs: write this model's scored log-probs (float16) to an .npz for later use as ref.
    Raises:
        EdgeinferError: text too short for one chunk, vocabulary mismatch with the reference.
    """
    tokens = model.tokenize(text)
    all_chunks = list(chunks(tokens, n_ctx, model.add_bos, model.bos_id, max_chunks))
    if not all_chunks:
        raise EdgeinferError(f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {n_ctx}; "
                             "use a longer text or a smaller --ctx")
    if ref is not None and ref.n_vocab != model.n_vocab:
        raise EdgeinferError(f"reference vocabulary ({ref.n_vocab}) differs from the model's ({model.n_vocab})")
    if ref_logprobs is not None:
        if int(ref_logprobs["n_ctx"]) != n_ctx:
            raise EdgeinferError(f"saved reference used --ctx {int(ref_logprobs['n_ctx'])}, not {n_ctx}")
        ref_tokens = np.asarray(ref_logprobs["tokens"])
        if not np.array_equal(ref_tokens[: len(all_chunks)], np.asarray(all_chunks)[: len(ref_tokens)]):
            raise EdgeinferError("saved reference was computed on different tokens (other text or tokenizer)")
        all_chunks = all_chunks[: len(ref_tokens)]
    first = n_ctx // 2
    nll_sum, ref_nll_sum, count = 0.0, 0.0, 0
    kls: list[np.ndarray] = []
    agree = 0
    saved: list[np.ndarray] = []
    it = all_chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(all_chunks, desc="evaluating", unit="chunk")
    for ci, chunk in enumerate(it):
        lp = log_softmax(model.logits(chunk)[first:-1])  # [S, V] predicts chunk[first+1:]
        targets = np.asarray(chunk[first + 1:])
        nll_sum -= lp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        if save_logprobs is not None:
            saved.append(lp.astype(np.float16))
        rlp = None
        if ref is not None:
            rlp = log_softmax(ref.logits(chunk)[first:-1])
        elif ref_logprobs is not None:
            rlp = ref_logprobs["logprobs"][ci].astype(np.float64)
        if rlp is not None:
            ref_nll_sum -= rlp[np.arange(len(targets)), targets].sum()
            kl = (np.exp(rlp) * (rlp - lp)).sum(axis=-1)
            kls.append(kl)
            agree += int((rlp.argmax(-1) == lp.argmax(-1)).sum())
    if save_logprobs is not None:
        np.savez_compressed(save_logprobs, tokens=np.asarray(all_chunks), logprobs=np.stack(saved), n_ctx=n_ctx)
    nll = nll_sum / count
    res = EvalResult(n_tokens=count, n_chunks=len(all_chunks), n_ctx=n_ctx, perplexity=math.exp(nll), nll=nll)
    if kls:
        kl = np.concatenate(kls)
        res.ref_perplexity = math.exp(ref_nll_sum / count)
        res.mean_kl = float(kl.mean())
        res.p99_kl = float(np.percentile(kl, 99))
        res.max_kl = float(kl.max())
        res.top1_agreement = agree / count
        res.kl_per_token = kl.tolist()
    return res


def load_saved_logprobs(path: str | Path) -> dict:
    """Load an .npz written by ``evaluate(save_logprobs=...)`` (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("tokens", "logprobs", "n_ctx")}
    except (OSError, ValueError, KeyError) as e:
        raise EdgeinferError(f"{path}: not a saved-logits file written by `edgeinfer eval --save-logits` ({e})") from None
