"""The torch engine's sampler vs llama.cpp's own sampler chain (llama-cpp-python's C API).

Oracle: ``penalties -> top_k -> top_p -> min_p`` built from ``llama_sampler_init_*`` exactly as
``Llama._init_sampler`` builds it, applied to the same logits; the surviving candidates (ids and
penalized logits) must match ours. The final draw uses torch's RNG (llama.cpp's mt19937 is not
reproducible from Python), so it is checked statistically against the softmax it samples from.
"""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest
import torch

from edgeinfer.backend import SamplingParams
from edgeinfer.sampling import Sampler, apply_penalties, filter_candidates

V = 400


def llama_chain(logits: np.ndarray, history: list[int], *, penalty: float, last_n: int, top_k: int, top_p: float,
                min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Surviving (ids, logits) after llama.cpp's chain, in its order."""
    import llama_cpp as lc

    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(V, last_n, penalty, 0.0, 0.0))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(min_p, 1))
    for t in history:
        lc.llama_sampler_accept(chain, t)
    data = (lc.llama_token_data * V)(*[lc.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    arr = lc.llama_token_data_array(data, V, -1, False)
    lc.llama_sampler_apply(chain, ctypes.byref(arr))
    ids = np.array([data[i].id for i in range(arr.size)])
    vals = np.array([data[i].logit for i in range(arr.size)], dtype=np.float32)
    lc.llama_sampler_free(chain)
    order = np.argsort(-vals, kind="stable")
    return ids[order], vals[order]


@pytest.mark.parametrize("case", [
    dict(penalty=1.0, last_n=64, top_k=40, top_p=0.95, min_p=0.05),
    dict(penalty=1.3, last_n=8, top_k=0, top_p=0.9, min_p=0.0),
    dict(penalty=1.1, last_n=64, top_k=5, top_p=1.0, min_p=0.2),
    dict(penalty=0.8, last_n=-1, top_k=100, top_p=0.5, min_p=0.01),
])
def test_candidates_match_llamacpp_chain(case):
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    history = [int(t) for t in rng.integers(0, V, 30)]
    ref_ids, ref_vals = llama_chain(logits, history, **case)
    pen = apply_penalties(torch.from_numpy(logits), history, case["penalty"], case["last_n"])
    ids, vals = filter_candidates(pen, case["top_k"], case["top_p"], case["min_p"])
    print(f"{case}: llama.cpp keeps {len(ref_ids)}, torch keeps {len(ids)}")
    assert ids.tolist() == ref_ids.tolist()
    assert np.allclose(vals.numpy(), ref_vals, rtol=0, atol=1e-6)


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.2), seed=0)
    assert s(logits, []) == 1
    assert s(logits, [1]) == 2  # 3.0 / 1.2 = 2.5 < 2.9


def test_draws_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -5.0])
    p = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0)
    s = Sampler(p, seed=123)
    n = 4000
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=5) / n
    expected = torch.softmax(logits / 0.7, -1).numpy()
    err = np.abs(counts - expected).max()
    print(f"empirical {counts.round(3)} vs softmax {expected.round(3)}: max diff {err:.3f} (tol 0.03)")
    assert err < 0.03
    a, b = Sampler(p, seed=123), Sampler(p, seed=123)
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]  # seeded: repeatable
