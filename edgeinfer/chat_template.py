"""Chat templates, rendered only in jinja2's ``ImmutableSandboxedEnvironment``.

A GGUF's ``tokenizer.chat_template`` is code written by whoever made the file. Rendering it in a
plain jinja2 Environment lets it reach Python internals (CVE-2024-34359, llama-cpp-python
< 0.2.72). Here it runs sandboxed; a template that tries to escape the sandbox, or that fails to
render, is refused and the documented default (ChatML, llama.cpp's own default) is used instead,
with a warning.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Sequence

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeinfer.errors import TemplateError

log = logging.getLogger(__name__)

# llama.cpp's fallback when a model has no template (LLM_CHAT_TEMPLATE_CHATML).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROBE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def _raise_exception(message: str):
    raise TemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's ``{% generation %}...{% endgeneration %}`` marks: render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _env() -> ImmutableSandboxedEnvironment:
    # Same options and extensions as Hugging Face transformers' chat-template rendering.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled, sandboxed chat template.

    Args:
        source: the template text (``None``: use ChatML).
        bos_token / eos_token: strings exposed to the template as ``bos_token``/``eos_token``.
        name: where the template came from, for messages.
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", name: str = "model"):
        self.bos_token, self.eos_token, self.name = bos_token, eos_token, name
        self.fallback_reason: str | None = None
        self.source = source
        if source is None:
            self.fallback_reason = f"{name} has no chat template"
            log.info("%s: no chat template; using ChatML", name)
        else:
            try:
                self._tmpl = _env().from_string(source)
                self._render(_PROBE, True)
            except (SecurityError, jinja2.TemplateError, TemplateError, TypeError, ValueError) as e:
                self.fallback_reason = f"{name}: chat template refused ({e.__class__.__name__}: {e})"
                log.warning("%s; using ChatML instead", self.fallback_reason)
        if self.fallback_reason is not None:
            self._tmpl = _env().from_string(CHATML_TEMPLATE)
            self.source = CHATML_TEMPLATE

    @property
    def is_fallback(self) -> bool:
        return self.fallback_reason is not None

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool, extra: dict | None = None) -> str:
        return self._tmpl.render(
            **(extra or {}),
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, extra: dict | None = None) -> str:
        """Render ``messages`` to a prompt string; ``extra`` are more template variables
        (``enable_thinking``, as transformers' ``apply_chat_template(**kwargs)`` passes them).

        Raises:
            TemplateError: the template refuses these messages (e.g. roles it does not accept).
                A template that tries to leave the sandbox is replaced by ChatML (logged).
        """
        try:
            return self._render(messages, add_generation_prompt, extra)
        except TemplateError:
            raise
        except SecurityError as e:
            # The template only misbehaves on some inputs: refuse it from now on, keep chatting.
            self.fallback_reason = f"{self.name}: chat template tried to leave the sandbox ({e})"
            log.warning("%s; using ChatML instead", self.fallback_reason)
            self._tmpl = _env().from_string(CHATML_TEMPLATE)
            self.source = CHATML_TEMPLATE
            return self._render(messages, add_generation_prompt, extra)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise TemplateError(f"{self.name}: chat template failed: {e}") from None


def template_from_gguf_metadata(meta: dict, token_text, name: str) -> ChatTemplate:
    """Build the chat template of a GGUF from its metadata.

    Args:
        meta: GGUF metadata (``tokenizer.chat_template``, BOS/EOS ids).
        token_text: ``callable(id) -> str`` giving a token's text, to resolve BOS/EOS strings.
        name: file name for messages.
    """
    src = meta.get("tokenizer.chat_template")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos = token_text(bos_id) if isinstance(bos_id, int) and bos_id >= 0 else ""
    eos = token_text(eos_id) if isinstance(eos_id, int) and eos_id >= 0 else ""
    return ChatTemplate(src if isinstance(src, str) else None, bos, eos, name)
