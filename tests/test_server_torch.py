"""``edgeinfer serve --backend torch``: greedy text equals ``edgeinfer run --backend torch`` through both
APIs, also while two requests decode together in one batched step; grammar-constrained output."""

from __future__ import annotations

import json
import threading

import ollama
import openai
import pytest

from _serve import Served, run_cli

pytestmark = pytest.mark.slow  # two `edgeinfer run --backend torch` oracles and a server: ~1-2 min on 2 cores

PROMPT = "Name three colors."
RAW = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(["--backend", "torch", "--parallel", "2", "--ctx", "1024"], tmp_path_factory.mktemp("serve"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    return {"chat": run_cli(d, "torch", PROMPT, N), "raw": run_cli(d, "torch", RAW, N, raw=True)}


def test_torch_greedy_equals_run_for_both_apis(srv, oracle):
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    oll = ollama.Client(host=srv.url, timeout=300)
    r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                    max_tokens=N)
    print(f"server: {r.choices[0].message.content!r}\nrun:    {oracle['chat']['text']!r}")
    assert r.choices[0].message.content == oracle["chat"]["text"]
    assert r.usage.prompt_tokens == oracle["chat"]["timings"]["prompt_tokens"]
    c = oai.completions.create(model="default", prompt=RAW, temperature=0, max_tokens=N)
    assert c.choices[0].text == oracle["raw"]["text"]
    o = oll.chat(model="default", messages=[{"role": "user", "content": PROMPT}],
                 options={"temperature": 0, "num_predict": N})
    assert o.message.content == oracle["chat"]["text"]
    g = oll.generate(model="default", prompt=RAW, raw=True, options={"temperature": 0, "num_predict": N})
    assert g.response == oracle["raw"]["text"]


def test_torch_two_requests_batched_give_the_sequential_text(srv, oracle):
    """Two greedy requests running together (one batched fused step per step) each give the text run alone gives."""
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    out: dict = {}

    def go(key, **kw):
        if key == "chat":
            s = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=N, stream=True)
            out[key] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        else:
            s = oai.completions.create(model="default", prompt=RAW, temperature=0, max_tokens=N, stream=True)
            out[key] = "".join(ch.choices[0].text for ch in s)

    ts = [threading.Thread(target=go, args=(k,)) for k in ("chat", "raw")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert out == {"chat": oracle["chat"]["text"], "raw": oracle["raw"]["text"]}


def test_torch_json_schema_and_logprobs(srv):
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Give a person as JSON."}], temperature=0,
        max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        logprobs=True, top_logprobs=2)
    obj = json.loads(r.choices[0].message.content)
    print("torch json_schema answer:", obj)
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)
    lp = r.choices[0].logprobs.content
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)
