"""Gemma 4's chat template and thinking channel (issue 12).

* The real template (google/gemma-4-31B-it, embedded in the tiny checkpoint and hence in the GGUF)
  renders in edgeinfer's sandbox exactly as transformers' ``apply_chat_template`` renders it,
  thought channels of earlier replies stripped, with the thinking switch on, off or unset.
* The backends' prompt: the GGUF's template, BOS once, the turn markers single control tokens.
* The TUI on a real Gemma 4 GGUF (its vocabulary, template and llama.cpp's token pieces; only the
  generated token ids are scripted, since a random model never writes a thought channel): the
  ``<|channel>thought ... <channel|>`` segment is collapsed like ``<think>``, the answer shown, and the
  thought is not sent back.
"""

from __future__ import annotations

import time

import pytest

import _tiny_models
from _tui_fake import run_async
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.chat_template import ChatTemplate

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<|channel>thought\nThe user greets me.<channel|>Hello!"},
     {"role": "user", "content": "Café — naïve 😀?"}],
]
THOUGHT, ANSWER = "I add 2 and 2, which gives 4.", "The answer is 4."


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(checkpoint folder, Q8_0 GGUF) of the tiny E2B-like model."""
    from edgeinfer.quant.convert import convert

    root = tmp_path_factory.mktemp("gemma4_chat")
    folder = _tiny_models.make_tiny_checkpoint("gemma4_e2b", root / "ck")
    return folder, convert(folder, root / "g.gguf", "Q8_0")


@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_template_renders_in_the_sandbox_like_transformers(gemma4, chat, think):
    """Also with the thinking switch (``enable_thinking``): on, the system turn opens with <|think|>
    and the model's turn is left open for its thought channel; off (the default), an empty thought
    channel is closed in the prompt."""
    from transformers import AutoTokenizer

    folder, _ = gemma4
    ours = ChatTemplate(_tiny_models.GEMMA4_CHAT_TEMPLATE, bos_token="<bos>", eos_token="<turn|>", name="gemma4")
    assert not ours.is_fallback, ours.fallback_reason
    kw = {} if think is None else {"enable_thinking": think}
    ref = AutoTokenizer.from_pretrained(folder).apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                                    **kw)
    got = ours.render(chat, extra=kw or None)
    print(repr(got))
    assert got == ref and "greets" not in got
    if think:
        assert got.startswith("<bos><|turn>system\n<|think|>") and got.endswith("<|turn>model\n")
    else:
        assert got.endswith("<|turn>model\n<|channel>thought\n<channel|>")


def test_backend_prompt_uses_the_gguf_template(gemma4):
    from edgeinfer.backends import load_backend

    _, path = gemma4
    b = load_backend("llama.cpp", path, LoadOptions(n_ctx=256, n_threads=2))
    try:
        ref = ChatTemplate(_tiny_models.GEMMA4_CHAT_TEMPLATE, bos_token="<bos>", eos_token="<turn|>").render(CHATS[1])
        assert b.format_chat(CHATS[1]) == ref and not b.prompts.template.is_fallback
        text, add_special = b.prompts.prompt_text(CHATS[1])
        ids = b.tokenize(text, add_special)
        turn, bos = b.tokenize("<|turn>", False), b.bos_token_id()
        print(f"{len(ids)} prompt tokens, first {ids[:4]}; <|turn> -> {turn}; BOS {bos}")
        assert ids[0] == bos and ids.count(bos) == 1 and len(turn) == 1 and ids.count(turn[0]) == 5  # system, user, model, user + the prompt's model turn
    finally:
        b.close()


def _scripted_backend(path, script: list[int]):
    """The llama.cpp backend on ``path`` whose generation yields ``script`` (token ids) instead of
    sampling: the prompt, the token pieces, end-of-generation and the text stream are the real ones."""
    from edgeinfer.backends.llamacpp import LlamaCppBackend

    class Scripted(LlamaCppBackend):
        requests: list = []

        def generate(self, prompt, params):
            self.requests.append([dict(m) for m in prompt])
            tokens = self._prompt_tokens(prompt, self.n_ctx, params.think)
            self._cancel.clear()
            return self._stream((t for t in script), tokens, params, self.n_ctx, time.perf_counter())

    return Scripted(path, LoadOptions(n_ctx=512, n_threads=2))


@run_async
async def test_tui_collapses_the_thought_channel_and_does_not_send_it_back(gemma4, tmp_path):
    from edgeinfer.storage import ChatStore
    from edgeinfer.tui.app import ChatApp
    from edgeinfer.tui.widgets.chat_view import ThinkingBlock

    _, path = gemma4
    probe = _scripted_backend(path, [])
    script = probe.tokenize(f"<|channel>thought\n{THOUGHT}<channel|>{ANSWER}<turn|>", add_special=False)
    assert probe.is_eog(script[-1])
    probe.close()
    backends = []

    def loader(model, backend, opts):
        backends.append(_scripted_backend(path, script))
        return backends[-1]

    app = ChatApp(store=ChatStore(tmp_path / "chat.sqlite3"), params=SamplingParams(max_tokens=64), loader=loader,
                  model_lister=lambda: [], export_dir=tmp_path / "exports", memory_poll_s=0)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(500):
            if app.host.backend is not None:
                break
            await pilot.pause(0.02)
        for text in ("2+2?", "thanks"):
            app.prompt.load_text(text)
            await pilot.press("enter")
            for _ in range(500):
                await pilot.pause(0.02)
                if not app.generating:
                    break
            await pilot.pause(0.05)
            if text == "2+2?":
                view = app.chat.messages()[-1]
                blocks = list(view.query(ThinkingBlock))
                print("streamed reply:", repr(view.text))
                assert view.text.startswith("<|channel>thought\n") and "<turn|>" not in view.text
                assert len(blocks) == 1 and blocks[0].collapsed and blocks[0].text == THOUGHT
                assert view.answer_text() == ANSWER
        sent = backends[-1].requests[-1]
        prompt = backends[-1].format_chat(sent)
        print("second request:", sent)
        assert sent[1] == {"role": "assistant", "content": ANSWER} and THOUGHT not in prompt
    for b in backends:
        b.close()
