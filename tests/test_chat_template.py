"""Chat templates: same prompt as llama.cpp's own chat handling; malicious templates refused."""

from __future__ import annotations

import ctypes

import pytest

from edgeinfer.backend import DoneEvent, SamplingParams
from edgeinfer.chat_template import CHATML_TEMPLATE, ChatTemplate

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Café — naïve 😀?"}],
]


def _native_apply(template: str, messages, add_ass=True) -> str:
    """llama.cpp's C++ chat-template engine (llama_chat_apply_template)."""
    import llama_cpp

    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_ass, buf, size)
    assert 0 < n <= size
    return buf.raw[:n].decode()


@pytest.mark.parametrize("chat", CHATS)
def test_default_template_matches_llama_cpp_python(llama_default, chat):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llama_default._vocab_llm.metadata
    tmpl = meta["tokenizer.chat_template"]
    ours = llama_default.format_chat(chat)
    ref = Jinja2ChatFormatter(tmpl, eos_token=llama_default._token_text(int(meta["tokenizer.ggml.eos_token_id"])),
                              bos_token=llama_default._token_text(int(meta["tokenizer.ggml.bos_token_id"])))(
        messages=chat).prompt
    assert ours == ref
    print(repr(ours))


def test_default_template_matches_native_llama_cpp(llama_default):
    # llama.cpp's C++ engine recognizes this template as ChatML; the model's Jinja template adds a
    # default system prompt when none is given, which the C++ engine does not, so compare with one.
    chat = CHATS[1]
    tmpl = llama_default._vocab_llm.metadata["tokenizer.chat_template"]
    assert llama_default.format_chat(chat) == _native_apply(tmpl, chat)


def test_chatml_fallback_matches_native(llama_default):
    t = ChatTemplate(None, name="x")
    assert t.is_fallback and t.source == CHATML_TEMPLATE
    assert t.render(CHATS[1]) == _native_apply("chatml", CHATS[1])


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{{ messages.append({'role': 'x'}) }}",  # the immutable sandbox refuses mutation
]


@pytest.mark.parametrize("src", MALICIOUS)
def test_malicious_template_refused(src, caplog):
    t = ChatTemplate(src, name="evil.gguf")
    assert t.is_fallback, "the sandbox should have refused this template"
    assert "evil.gguf" in t.fallback_reason
    assert t.render(CHATS[0]).startswith("<|im_start|>user\nWhat is 2+2?")
    print(t.fallback_reason)


def test_template_that_attacks_only_on_some_input_falls_back_at_render_time():
    src = ("{% for m in messages %}{% if 'attack' in m.content %}{{ m.__class__.__mro__ }}{% endif %}"
           "{{ m.role }}: {{ m.content }}\n{% endfor %}")
    t = ChatTemplate(src, name="sneaky")
    assert not t.is_fallback
    assert t.render([{"role": "user", "content": "hi"}]) == "user: hi\n"
    out = t.render([{"role": "user", "content": "attack"}])
    assert t.is_fallback and out.startswith("<|im_start|>user\nattack")


def test_chat_still_works_with_malicious_template(llama_default):
    saved = llama_default.prompts.template
    try:
        llama_default.prompts.template = ChatTemplate(MALICIOUS[1], name="evil")
        evs = list(llama_default.generate(CHATS[0], SamplingParams(temperature=0, max_tokens=8)))
        assert isinstance(evs[-1], DoneEvent) and evs[-1].text.strip()
    finally:
        llama_default.prompts.template = saved


def test_think_switch_sets_enable_thinking():
    """``SamplingParams.think`` reaches the template as ``enable_thinking`` (Qwen3 / Gemma 4 style);
    None leaves the template's own default."""
    from edgeinfer.backends.common import PromptBuilder

    src = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
           "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% else %}<think>{% endif %}")
    pb = PromptBuilder({"tokenizer.chat_template": src}, lambda i: "", "x.gguf", add_bos=False)
    msgs = [{"role": "user", "content": "hi"}]
    out = {t: pb.prompt_text(msgs, think=t)[0] for t in (None, True, False)}
    print(out)
    assert out == {None: "hi<think>", True: "hi<think>", False: "hi<no-think>"}
