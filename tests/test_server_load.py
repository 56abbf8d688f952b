"""A bounded load test on loopback: 8 concurrent clients x 25 requests against ``serve --parallel 4``,
0 errors, and the memory of the server (with its runner) flat between the first and the last 50 requests."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from _serve import Served

pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT = 8, 25


@pytest.mark.parametrize("backend", ["llama.cpp", "torch"])
def test_8_clients_x_25_requests_no_errors_flat_rss(tmp_path, backend):
    srv = Served(["--backend", backend, "--parallel", "4", "--queue", "8", "--ctx", "512"], tmp_path)
    try:
        base = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        base.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        done = 0
        lock = threading.Lock()
        rss_at: dict[str, int] = {}
        errors: list[str] = []
        total = CLIENTS * PER_CLIENT

        def client(i: int) -> None:
            nonlocal done
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            for j in range(PER_CLIENT):
                try:
                    msgs = [{"role": "user", "content": f"Client {i} asks question {j}: name a fruit."}]
                    if j % 2:
                        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                            model="default", messages=msgs, max_tokens=6, temperature=0.7, seed=j, stream=True)
                            if ch.choices)
                    else:
                        text = c.chat.completions.create(model="default", messages=msgs, max_tokens=6,
                                                         temperature=0.7, seed=j).choices[0].message.content
                    assert isinstance(text, str)
                except Exception as e:  # noqa: BLE001 -- counted, reported below
                    errors.append(f"client {i} request {j}: {type(e).__name__}: {e}")
                with lock:
                    done += 1
                    if done == 50:
                        rss_at["first50"] = srv.rss()
                    elif done == total - 50:
                        rss_at["before_last50"] = srv.rss()
                    elif done == total:
                        rss_at["last50"] = srv.rss()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1200)
        wall = time.perf_counter() - t0
        first, last = rss_at["first50"], rss_at["last50"]
        print(f"{backend}: {total} requests in {wall:.1f} s, {len(errors)} errors; RSS after the first 50 "
              f"{first / 2**20:.1f} MiB, after the last 50 {last / 2**20:.1f} MiB ({(last / first - 1) * 100:+.1f} %)")
        assert not errors, errors[:5]
        assert abs(last / first - 1) <= 0.10
    finally:
        srv.close()
