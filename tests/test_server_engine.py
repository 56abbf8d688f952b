"""The server's pieces without HTTP: the torch engine's multi-sequence decode against single-sequence
forwards (the oracle), the pool's fair bounded queue, LRU unload and keep-alive, durations."""

from __future__ import annotations

import asyncio
import pytest
import torch

from edgeinfer.server import pool as pool_mod
from edgeinfer.server.pool import FOREVER, ModelPool, parse_duration
from edgeinfer.server.request import ApiError


@pytest.fixture(scope="module")
def torch_default(default_gguf):
    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.torch_engine import TorchBackend

    b = TorchBackend(default_gguf, LoadOptions(n_ctx=256, n_threads=2))
    yield b
    b.close()


def test_forward_rows_equals_one_sequence_at_a_time(torch_default):
    m = torch_default.model
    m.add_sequences(3)
    a = torch_default.tokenize("The capital of France is")
    b = torch_default.tokenize("One, two, three, four, five, six")
    ta, tb = 1234, 567
    ref = []
    for seq, toks, t in ((0, a, ta), (2, b, tb)):  # each sequence alone, in its own cache set
        m(torch.tensor([toks]), 0, seq=seq)
        ref.append(m(torch.tensor([[t]]), len(toks), last_only=True, seq=seq)[0, -1])
    m(torch.tensor([a]), 0, seq=0)  # rewrite both prefixes, then one batched step of both
    m(torch.tensor([b]), 0, seq=2)
    got = m.forward_rows(torch.tensor([[ta], [tb]]), [(0, len(a)), (2, len(b))])  # [2, V]
    err = max(float((got[i] - ref[i]).abs().max()) for i in range(2))
    scale = max(float(r.abs().max()) for r in ref)
    print(f"forward_rows vs single-sequence decode: max |diff| {err:.3g} (logits up to {scale:.3g})")
    assert err <= 1e-4 * scale
    assert [int(g.argmax()) for g in got] == [int(r.argmax()) for r in ref]
    # sequence 0's cache was not disturbed by sequence 2's rows: decoding it alone again gives the same
    again = m(torch.tensor([[ta]]), len(a), last_only=True, seq=0)[0, -1]
    assert float((again - ref[0]).abs().max()) <= 1e-4 * scale


def test_fused_step_of_another_sequence_reads_and_writes_its_own_caches(torch_default):
    """The server decodes a lone sequence with the fused CPU step over that sequence's caches: the
    same logits as sequence 0's step after the same prompt, and sequence 0's cache untouched."""
    from edgeinfer.kernels import cpu_step

    m = torch_default.model
    if torch_default._step is None:
        pytest.skip("the fused CPU step is not built here (no compiled kernels)")
    m.add_sequences(3)
    step2 = cpu_step.build(m, seq=2)
    assert step2 is not None
    a = torch_default.tokenize("The capital of France is")
    b = torch_default.tokenize("Hi")  # shorter than a: its steps land on positions sequence 0 holds
    assert len(b) + 3 <= len(a)
    m(torch.tensor([a]), 0, seq=0)
    m(torch.tensor([a]), 0, seq=2)
    ref = torch_default._step(1234, len(a))  # sequence 0
    got = step2(1234, len(a))  # sequence 2, the same prompt and token
    print(f"fused step, sequence 2 vs sequence 0: max |diff| {float((got - ref).abs().max()):.3g}")
    assert torch.equal(got, ref)
    k0 = m.layers[3].attn.caches[0].k[:, :, :len(a) + 1].clone()
    m(torch.tensor([b]), 0, seq=2)  # another prompt and steps in sequence 2 ...
    for i, t in enumerate((11, 22, 33)):
        step2(t, len(b) + i)
    assert torch.equal(m.layers[3].attn.caches[0].k[:, :, :len(a) + 1], k0)  # ... leave sequence 0 alone
    assert torch.equal(torch_default._step(1234, len(a)), ref)


def test_batched_fused_step_equals_each_sequence_alone(torch_default):
    """The server's several sequences decode in one batched call of the fused step (the weights read
    once): each row's logits equal that sequence's own step exactly (each activation row is quantized
    and summed on its own), and each sequence's cache gets only its own token."""
    from edgeinfer.kernels import cpu_step

    m = torch_default.model
    if torch_default._step is None:
        pytest.skip("the fused CPU step is not built here (no compiled kernels)")
    m.add_sequences(3)
    steps = [torch_default._step, cpu_step.build(m, seq=1), cpu_step.build(m, seq=2)]
    prompts = [torch_default.tokenize(t) for t in ("The capital of France is", "Hi", "One, two, three,")]
    toks = [1234, 42, 777]

    def prefill():
        for seq, p in enumerate(prompts):
            m(torch.tensor([p]), 0, seq=seq)

    prefill()
    alone = [st(t, len(p)) for st, t, p in zip(steps, toks, prompts)]
    prefill()
    together = cpu_step.batch(steps, toks, [len(p) for p in prompts])
    print(f"batched step of 3 sequences vs each alone: max |diff| {float((together - torch.stack(alone)).abs().max()):.3g}")
    assert torch.equal(together, torch.stack(alone))
    nxt = [int(g.argmax()) for g in together]  # the next step reads what the batch wrote
    again = cpu_step.batch(steps, nxt, [len(p) + 1 for p in prompts])
    prefill()
    for st, t, p in zip(steps, toks, prompts):
        st(t, len(p))
    assert torch.equal(again, torch.stack([st(t, len(p) + 1) for st, t, p in zip(steps, nxt, prompts)]))


# -- the pool with a fake engine -------------------------------------------------------------------
class FakeEngine:
    kind = "fake"
    n_ctx = 64

    def __init__(self, name, path, opts, parallel):
        self.name, self.parallel, self.closed = name, parallel, False

    def memory_bytes(self):
        return 100

    def close(self):
        self.closed = True


@pytest.fixture
def fake_pool(monkeypatch, tmp_path):
    monkeypatch.setattr(pool_mod, "load_engine", lambda backend, name, path, opts, parallel:
                        FakeEngine(name, path, opts, parallel))
    files = {}
    for n in ("a", "b"):
        f = tmp_path / f"{n}.gguf"
        f.write_bytes(b"x" * 100)
        files[n] = f

    def make(**kw):
        return ModelPool(files, "llama.cpp", None, **kw)

    return make


def test_queue_is_fair_bounded_and_cancellable(fake_pool):
    async def go():
        p = fake_pool(parallel=2, max_queue=2)
        s1, s2 = await p.acquire("a"), await p.acquire("a")
        order = []

        async def wait(tag):
            s = await p.acquire("a")
            order.append(tag)
            return s

        w1 = asyncio.ensure_future(wait("w1"))
        await asyncio.sleep(0)
        w2 = asyncio.ensure_future(wait("w2"))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as e:  # 2 running + 2 waiting: the fifth is refused at once
            await p.acquire("a")
        assert e.value.status == 503
        w1.cancel()  # a client that leaves while waiting gives up its place
        await asyncio.sleep(0)
        w3 = asyncio.ensure_future(wait("w3"))
        await asyncio.sleep(0)
        s1.release()
        s1.release()  # idempotent
        await asyncio.sleep(0)
        s2.release()
        await asyncio.sleep(0)
        assert order == ["w2", "w3"]
        (await w2).release()
        (await w3).release()
        assert p.models["a"].active == 0

    asyncio.run(go())


def test_lru_unload_and_keep_alive(fake_pool):
    async def go():
        p = fake_pool(max_loaded=1, keep_alive=FOREVER)
        sa = await p.acquire("a")
        ea = sa.engine
        with pytest.raises(ApiError) as e:  # "a" is busy: "b" cannot make room
            await p.acquire("b")
        assert e.value.status == 503
        sa.release()
        sb = await p.acquire("b")  # "a" is idle now: unloaded for "b"
        await p.wait_closed()
        assert ea.closed and p.models["a"].engine is None and p.models["b"].engine is sb.engine
        sb.release()
        p.models["b"].keep_alive = 0.0
        p.models["b"].last_used -= 1
        p.reap()
        assert p.models["b"].engine is None
        with pytest.raises(ApiError) as e:
            await p.acquire("c")
        assert e.value.status == 404
        s = await p.acquire("a:latest")
        assert s.served.name == "a"
        s.release()

    asyncio.run(go())


def test_memory_budget_unloads_the_least_recently_used(fake_pool):
    async def go():
        p = fake_pool(memory_budget=150, keep_alive=FOREVER)  # one model of 100 bytes fits, two do not
        (await p.acquire("a")).release()
        (await p.acquire("b")).release()
        assert p.models["a"].engine is None and p.models["b"].engine is not None

    asyncio.run(go())


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), (0, 0),
                                          ("-1", FOREVER), (-1, FOREVER), ("10", 10), (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5x", True, "", [1]])
def test_bad_durations(text):
    with pytest.raises(ApiError):
        parse_duration(text)



def test_serve_takes_the_load_options_of_run(default_gguf):
    """serve's loading flags are run's (one definition): --cpu-moe / --n-cpu-moe reach the engines."""
    import argparse

    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.cli import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    for flags, want in ((["--cpu-moe"], ALL_LAYERS), (["--n-cpu-moe", "3"], 3), ([], 0)):
        pool = serve.build_pool(p.parse_args(["-m", str(default_gguf), "--ctx", "512", *flags]))
        assert pool.opts.n_cpu_moe == want and pool.opts.n_ctx == 512
    with pytest.raises(SystemExit):
        p.parse_args(["--cpu-moe", "--n-cpu-moe", "2"])
