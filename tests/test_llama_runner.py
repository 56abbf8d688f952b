"""The supervised llama.cpp runner: the pipe protocol, crashes, restarts, cancellation, several sequences."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest

from edgeinfer.backend import DoneEvent, LoadOptions, SamplingParams
from edgeinfer.backends.llamacpp import LlamaCppBackend
from edgeinfer.backends.runner_client import RunnerProcess, exit_reason
from edgeinfer.backends.runner_protocol import FrameReader, FrameWriter, ProtocolError, sampling_dict
from edgeinfer.errors import BackendCrashedError, BackendError

CHAT = [{"role": "user", "content": "Write a long story about a dragon who bakes bread."}]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


# -- protocol ------------------------------------------------------------------------------------
def _pipe_pair():
    r, w = os.pipe()
    return FrameReader(r), FrameWriter(w), r, w


def test_frames_round_trip_and_end_of_file():
    reader, writer, r, w = _pipe_pair()
    msgs = [{"op": "generate", "id": 1, "tokens": list(range(1000)), "text": "café 😀"}, {"ev": "tok", "id": 1, "tok": 7}]
    for m in msgs:
        writer.send(m)
    os.close(w)
    assert [reader.recv(), reader.recv(), reader.recv()] == [*msgs, None]
    os.close(r)


@pytest.mark.parametrize("raw,match", [
    ((2**31).to_bytes(4, "little"), "limit"),
    ((5).to_bytes(4, "little") + b"\xff\xfe{}x", "not UTF-8 JSON"),
    ((2).to_bytes(4, "little") + b"[]", "not an object"),
    ((10).to_bytes(4, "little") + b"{}", "inside a frame"),
])
def test_malformed_frames_are_refused(raw, match):
    reader, _, r, w = _pipe_pair()
    os.write(w, raw)
    os.close(w)
    with pytest.raises(ProtocolError, match=match):
        reader.recv()
    os.close(r)


def test_exit_reasons_in_words():
    assert exit_reason(-signal.SIGSEGV) == "SIGSEGV (segmentation fault)"
    assert exit_reason(-signal.SIGKILL) == "SIGKILL (killed; out of memory?)"
    assert exit_reason(-signal.SIGABRT).startswith("SIGABRT (abort")
    assert exit_reason(1) == "exit code 1"


# -- the backend through its runner ------------------------------------------------------------
@pytest.fixture
def backend(default_gguf):
    b = LlamaCppBackend(default_gguf, LoadOptions(n_ctx=1024, n_threads=2, seed=0))
    yield b
    b.close()


def _text(backend, request=CHAT, params=GREEDY):
    evs = list(backend.generate(request, params))
    assert isinstance(evs[-1], DoneEvent)
    return evs[-1]


def test_the_model_lives_in_the_runner(backend):
    pid = backend.runner_pid
    assert pid and pid != os.getpid()
    mem = backend.memory_bytes()
    print(f"runner pid {pid}: RSS {mem['rss'] / 2**20:.0f} MiB, this process {mem['host_rss'] / 2**20:.0f} MiB; "
          f"buffers {backend.info().extra['buffers']}")
    assert mem["rss"] > 50 * 2**20 and mem["peak"] >= mem["rss"] > 0
    assert sum(backend.info().extra["buffers"].values()) > 50 * 2**20


@pytest.mark.parametrize("sig,words", [(signal.SIGSEGV, "SIGSEGV (segmentation fault)"),
                                       (signal.SIGKILL, "SIGKILL (killed; out of memory?)")])
def test_a_crash_mid_generation_is_one_error_and_the_next_request_restarts(backend, default_gguf, sig, words):
    before = _text(backend).text
    pid = backend.runner_pid
    seen = 0
    with pytest.raises(BackendCrashedError) as err:
        for ev in backend.generate(CHAT, SamplingParams(temperature=0, max_tokens=400)):
            seen += 1
            if seen == 3:
                os.kill(pid, sig)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg and words in msg and str(default_gguf) in msg
    assert "--backend torch" in msg and "EDGEINFER_LLAMA_REPACK=0" in msg
    assert seen < 400
    after = _text(backend)
    assert backend.runner_pid != pid and backend.info().extra["runner_restarts"] == 1
    assert after.text == before, "a fresh runner answers like the old one"


def test_cancel_reaches_the_runner_inside_a_long_prompt(backend):
    long_prompt = "word " * 900
    out = {}

    def run():
        out["done"] = list(backend.generate(long_prompt, SamplingParams(temperature=0, max_tokens=50)))[-1]

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    backend.cancel()
    t.join(30)
    print(f"cancelled {1000 * (time.perf_counter() - t0):.0f} ms after cancel(): {out['done'].finish_reason}, "
          f"{out['done'].timings.generated_tokens} tokens")
    assert out["done"].finish_reason == "cancelled"
    assert _text(backend).text.strip()  # the runner is still fine


def test_a_load_failure_in_the_runner_is_a_clear_error(tmp_path, default_gguf):
    """A file whose header claims one layer more than it has: Python's checks pass, the vocabulary
    loads here, and llama.cpp refuses the model in the runner ("tensor 'blk.30.attn_norm.weight' not found")."""
    import gguf

    bad = tmp_path / "one-layer-short.gguf"
    shutil.copyfile(default_gguf, bad)
    r = gguf.GGUFReader(bad, "r+")
    f = r.fields["llama.block_count"]
    f.parts[f.data[0]][0] += 1
    del r
    with pytest.raises(BackendError) as err:
        LlamaCppBackend(bad, LoadOptions(n_ctx=64, n_threads=1))
    print(err.value)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert "'blk.30.attn_norm.weight' not found" in str(err.value) and not isinstance(err.value, BackendCrashedError)


def test_sequences_of_one_runner_decode_together_like_alone(default_gguf, backend):
    """Two requests on a 2-sequence runner, in flight at once, give the tokens each gives alone."""
    prompts = [backend.tokenize(backend.format_chat([{"role": "user", "content": q}]))
               for q in ("Name three primary colors.", "What is the capital of France?")]
    alone = []
    for toks in prompts:
        rid = backend.runner.submit(toks, 20, sampling_dict(GREEDY), 0)
        alone.append([m["tok"] for m in backend.runner.events(rid) if m["ev"] == "tok"])
    r = RunnerProcess({"path": str(default_gguf), "n_ctx": 1024, "n_seq": 2, "n_threads": 2,
                       "policy": {"allow_amx": False, "allow_extra": True}})
    try:
        info = r.wait_ready()
        assert info["n_seq"] == 2 and info["n_ctx"] == 1024
        ids = [r.submit(toks, 20, sampling_dict(GREEDY), 0) for toks in prompts]
        together = [[m["tok"] for m in r.events(i) if m["ev"] == "tok"] for i in ids]
    finally:
        r.close()
    print("alone:   ", alone, "\ntogether:", together)
    assert together == alone
