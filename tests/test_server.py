"""``edgeinfer serve`` with the llama.cpp backend, driven by the real ``openai`` and ``ollama`` clients.

The oracle for greedy text is ``edgeinfer run --temp 0`` on the same prompt (a separate process);
token counts are checked against llama.cpp's tokenizer of the same GGUF.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import ollama
import openai
import pytest

from _serve import Served, run_cli

KEY = "sekret-key"
PROMPT = "Name three colors."
RAW = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(["--backend", "llama.cpp", "--parallel", "2", "--ctx", "1024", "--api-key", KEY,
                "--max-body", "65536"], tmp_path_factory.mktemp("serve"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oll(srv):
    return ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    return {"chat": run_cli(d, "llama.cpp", PROMPT, N), "raw": run_cli(d, "llama.cpp", RAW, N, raw=True)}


@pytest.fixture(scope="module")
def vocab(default_gguf):
    from edgeinfer.backends.common import load_vocab_model
    from edgeinfer.gguf_check import validate_gguf

    llm = load_vocab_model(validate_gguf(default_gguf))
    yield llm
    llm.close()


def chat(oai, **kw):
    kw = {"temperature": 0, "max_tokens": N, **kw}
    return oai.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}], **kw)


# -- OpenAI ----------------------------------------------------------------------------------------
def test_models_listed(oai, oll):
    assert [m.id for m in oai.models.list().data] == ["default"]
    assert [m.model for m in oll.list().models] == ["default"]
    assert oai.models.retrieve("default").id == "default"


def test_chat_greedy_equals_run_and_usage_is_the_tokenizers(oai, oracle, vocab):
    r = chat(oai)
    text = r.choices[0].message.content
    print(f"server: {text!r}\nrun:    {oracle['chat']['text']!r}")
    assert text == oracle["chat"]["text"]
    assert r.usage.prompt_tokens == oracle["chat"]["timings"]["prompt_tokens"]
    n_text = len(vocab.tokenize(text.encode(), add_bos=False, special=True))
    assert r.usage.completion_tokens == n_text  # the end-of-generation token is not text and not counted
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == oracle["chat"]["finish_reason"]


def test_chat_stream_matches_and_ends_with_usage(oai, oracle):
    whole = chat(oai)
    chunks = list(chat(oai, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle["chat"]["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == oracle["chat"]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_greedy_equals_run_raw(oai, oracle):
    r = oai.completions.create(model="default", prompt=RAW, temperature=0, max_tokens=N)
    assert r.choices[0].text == oracle["raw"]["text"]
    assert r.usage.prompt_tokens == oracle["raw"]["timings"]["prompt_tokens"]
    s = oai.completions.create(model="default", prompt=RAW, temperature=0, max_tokens=N, stream=True)
    assert "".join(c.choices[0].text for c in s) == oracle["raw"]["text"]


def test_json_schema_answer_validates(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "colors": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "age", "colors"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Describe a person."}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    print("json_schema answer:", obj)
    assert set(obj) == {"name", "age", "colors"}
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert all(isinstance(c, str) for c in obj["colors"]) and len(obj["colors"]) <= 3
    r = oai.chat.completions.create(model="default", temperature=0, max_tokens=80,
                                    messages=[{"role": "user", "content": "Give me a JSON object with a name and an age."}],
                                    response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_logprobs_are_consistent(oai):
    r = chat(oai, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    for t in lp:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-9 and t.logprob <= 0


def test_sampling_with_a_seed_is_reproducible(oai):
    kw = dict(temperature=0.9, top_p=0.9, seed=42, presence_penalty=0.5, frequency_penalty=0.3, stop=["\n\n"])
    a, b = chat(oai, **kw), chat(oai, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content


# -- Ollama ----------------------------------------------------------------------------------------
def test_ollama_chat_and_generate_equal_run(oll, oracle, vocab):
    opts = {"temperature": 0, "num_predict": N}
    r = oll.chat(model="default", messages=[{"role": "user", "content": PROMPT}], options=opts)
    assert r.message.content == oracle["chat"]["text"]
    assert r.done and r.eval_count == len(vocab.tokenize(r.message.content.encode(), add_bos=False, special=True))
    assert r.prompt_eval_count == oracle["chat"]["timings"]["prompt_tokens"]
    assert r.eval_duration > 0 and r.total_duration >= r.eval_duration
    parts = list(oll.chat(model="default", messages=[{"role": "user", "content": PROMPT}], options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == oracle["chat"]["text"]
    assert parts[-1].done and parts[-1].done_reason == oracle["chat"]["finish_reason"] and not parts[0].done
    g = oll.generate(model="default:latest", prompt=RAW, raw=True, options=opts)
    assert g.response == oracle["raw"]["text"]
    assert len(g.context) == g.prompt_eval_count + g.eval_count


def test_ollama_format_show_ps_version(oll, srv):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = oll.chat(model="default", messages=[{"role": "user", "content": "Pick a city."}], format=schema,
                 options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(r.message.content)["city"], str)
    info = oll.show("default")
    assert info.details.format == "gguf" and info.details.family == "llama"
    assert info.modelinfo["general.architecture"] == "llama" and "im_start" in info.template
    ps = oll.ps().models
    assert [m.model for m in ps] == ["default"] and ps[0].context_length == 1024
    assert httpx.get(srv.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]


def test_ollama_keep_alive_0_unloads_and_the_next_request_reloads(oll):
    r = oll.generate(model="default", prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert oll.ps().models == []
    r = oll.generate(model="default", prompt="", keep_alive="10m")  # an empty prompt loads the model
    assert r.done_reason == "load" and [m.model for m in oll.ps().models] == ["default"]
    g = oll.generate(model="default", prompt=RAW, raw=True, options={"temperature": 0, "num_predict": 2})
    assert g.eval_count == 2


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys

    from _serve import env

    for args, needle in ((["-m", str(tmp_path / "missing.gguf")], "missing.gguf"),
                         (["--keep-alive", "soon"], "--keep-alive"), (["--memory-budget", "lots"], "--memory-budget")):
        p = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", "--port", "0", *args], capture_output=True,
                           text=True, env=env(tmp_path), timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("edgeinfer: error:") and needle in p.stderr
    p = subprocess.run([sys.executable, "-m", "edgeinfer", "serve", "--host", "0.0.0.0", "-m",
                        str(tmp_path / "missing.gguf")], capture_output=True, text=True, env=env(tmp_path), timeout=120)
    assert "WARNING: listening on 0.0.0.0 without --api-key" in p.stderr and p.returncode == 2


# -- errors ----------------------------------------------------------------------------------------
def test_bad_key_is_401(srv):
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(ollama.ResponseError) as e2:
        ollama.Client(host=srv.url).list()
    assert e2.value.status_code == 401


def test_unknown_model_is_404(oai, oll):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error", "param": "model",
                            "code": "model_not_found"}
    with pytest.raises(ollama.ResponseError) as e2:
        oll.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e2.value.status_code == 404 and "not served" in e2.value.error


def test_bad_requests_are_400(oai):
    for kw in ({"n": 2}, {"temperature": -1}, {"top_p": 0}, {"response_format": {"type": "xml"}},
               {"logprobs": True, "top_logprobs": 50}):
        with pytest.raises(openai.BadRequestError) as e:
            chat(oai, **kw)
        print(kw, "->", e.value.body["message"])
        assert e.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_413_and_big_body_is_413(oai, srv):
    long = "word " * 1500  # > 1024 tokens, < 64 KiB
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model="default", messages=[{"role": "user", "content": long}])
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b'{"model": "default", "messages": [' + b" " * 70000 + b"]}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


_ANY = [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00", b'{"model": 5}', b'"just a string"', b"null"]
_GEN = [b'{"model": "default", "stream": "yes", "options": 3, "max_tokens": "many", "prompt": 7, "messages": 7}']
_CHAT = [b'{"model": "default", "messages": "hi"}', b'{"model": "default", "messages": [{"role": "x"}]}',
         b'{"model": "default", "messages": [{"role": "user", "content": 3}]}', b'{"model": "default", "messages": [1]}',
         b'{"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}']
_CASES = [(p, b) for p in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show")
          for b in _ANY] + [(p, b) for p in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")
                   for b in _GEN] + [(p, b) for p in ("/v1/chat/completions", "/api/chat") for b in _CHAT] + [
    ("/v1/completions", b'{"model": "default"}'), ("/v1/completions", b'{"model": "default", "prompt": [1, 2]}'),
    ("/api/generate", b'{"model": "default", "prompt": "x", "options": {"num_predict": "many"}}'),
    ("/api/generate", b'{"model": "default", "prompt": "x", "format": 5}'),
    ("/api/chat", b'{"model": "default", "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}')]


@pytest.mark.parametrize("path,body", _CASES)
def test_malformed_bodies_never_give_a_traceback(srv, path, body):
    r = httpx.post(srv.url + path, headers={"Authorization": f"Bearer {KEY}"}, content=body)
    assert r.status_code in (400, 404), (r.status_code, r.text)
    assert "Traceback" not in r.text and "File \"" not in r.text
    err = r.json()["error"]
    assert isinstance(err["message"] if path.startswith("/v1") else err, str)


def test_raw_socket_garbage_does_not_kill_the_server(srv, oai):
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9999\r\n\r\n{\"a\"")
    assert oai.models.list().data


# -- one slot, no queue: 503, disconnect, crash ----------------------------------------------------
@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    s = Served(["--backend", "llama.cpp", "--parallel", "1", "--queue", "0", "--ctx", "1024"],
               tmp_path_factory.mktemp("tight"))
    yield s
    s.close()


def _stream_a_few(url: str, n: int = 3) -> bool:
    """Start a long streaming chat, read ``n`` chunks, then drop the connection; False if refused with 503."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000,
            "temperature": 0.8, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        if r.status_code == 503:
            return False
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got >= n:
                    return True
    raise AssertionError("the stream ended early")


def _soon(fn, limit_s: float = 5.0) -> float:
    """Call ``fn`` until it does not meet a 503 (the slot of a dropped client is freed after the runner's
    current step); returns the seconds it took, failing past ``limit_s``."""
    t0 = time.perf_counter()
    while not fn():
        assert time.perf_counter() - t0 < limit_s, "the slot of a disconnected client was not freed"
        time.sleep(0.02)
    return time.perf_counter() - t0


def test_busy_is_503_and_a_disconnect_frees_the_slot(tight):
    c = openai.OpenAI(base_url=tight.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def short() -> bool:
        try:
            r = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, temperature=0)
        except openai.APIStatusError as err:
            assert err.status_code == 503 and err.body["code"] == "overloaded"
            return False
        assert r.usage.completion_tokens == 2
        return True

    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000,
            "stream": True}
    with httpx.stream("POST", tight.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: a dropped line iterator, once collected, closes the stream (a disconnect)
        next(line for line in lines if line.startswith("data: "))
        assert not short()  # one slot, no queue: busy
    for attempt in range(3):  # each dropped stream frees the slot for the next request at once
        waited = _soon(lambda: _stream_a_few(tight.url))
        waited2 = _soon(short)
        print(f"disconnect {attempt}: next stream started after {waited * 1000:.0f} ms, "
              f"next request after {waited2 * 1000:.0f} ms")


def test_runner_crash_is_500_then_a_fresh_runner(tight):
    import signal

    c = openai.OpenAI(base_url=tight.url + "/v1", api_key="x", max_retries=0, timeout=120)
    c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    runner = tight.runner()
    killer = threading.Timer(0.5, lambda: runner.send_signal(signal.SIGSEGV))
    killer.start()
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Tell a long story."}],
                                  max_tokens=3000, temperature=0.8)
    print("crash answer:", e.value.body)
    assert e.value.status_code == 500 and "SIGSEGV" in e.value.body["message"]
    assert e.value.body["code"] == "model_crashed"
    r = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert tight.runner().pid != runner.pid
