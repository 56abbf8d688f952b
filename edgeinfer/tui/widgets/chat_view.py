"""The message list: one :class:`MessageView` per message, reasoning collapsed, Markdown answers."""

from __future__ import annotations

import re

from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Collapsible, Label, Markdown, Static

from edgeinfer.tui.reasoning import Segment, split_reasoning

_CODE_RE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "system": "System"}


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of ``markdown`` (an unclosed last block counts)."""
    return [m.group(1).rstrip("\n") for m in _CODE_RE.finditer(markdown)]


class ThinkingBlock(Collapsible):
    """A reasoning segment, collapsed by default."""

    def __init__(self, text: str, closed: bool) -> None:
        self._body = Static(text, classes="thinking-text", markup=False)
        super().__init__(self._body, title=self._title(text, closed), collapsed=True, classes="thinking")
        self.text = text

    @staticmethod
    def _title(text: str, closed: bool) -> str:
        words = len(text.split())
        return f"Thought ({words} words)" if closed else f"Thinking… ({words} words)"

    def set_text(self, text: str, closed: bool) -> None:
        if text != self.text:
            self.text = text
            self._body.update(text)
        self.title = self._title(text, closed)


class MessageView(Vertical, can_focus=True):
    """One message. Focus it (tab / alt+↑↓) to copy it, copy its code or toggle its reasoning."""

    BINDINGS = [
        Binding("c", "copy_message", "Copy", id="message.copy", tooltip="Copy the focused message"),
        Binding("k", "copy_code", "Copy code", id="message.copy_code", tooltip="Copy its last code block"),
        Binding("t", "toggle_thinking", "Thinking", id="message.toggle_thinking",
                tooltip="Show / hide its reasoning"),
    ]

    def __init__(self, role: str, text: str = "", *, title: str | None = None, message_id: int | None = None,
                 footer: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = ""
        self.message_id = message_id
        self._title = title or ROLE_TITLES.get(role, role)
        self._initial = text
        self._footer = footer
        self._parts: list = []  # widgets, one per segment

    def compose(self):
        yield Label(self._title, classes="message-title")

    def on_mount(self) -> None:
        if self._initial:
            self.set_text(self._initial)
        if self._footer:
            self.set_footer(self._footer)

    # -- content -----------------------------------------------------------------------------
    def segments(self, streaming: bool = False) -> list[Segment]:
        if self.role != "assistant":
            return [Segment("answer", self.text)] if self.text else []
        return split_reasoning(self.text, streaming=streaming)

    def set_text(self, text: str, streaming: bool = False) -> None:
        """Show ``text`` (the whole message so far); only changed segments are re-rendered."""
        self.text = text
        segs = self.segments(streaming)
        footer = self.query(".message-footer")
        anchor = footer.first() if footer else None
        for i, seg in enumerate(segs):
            if i < len(self._parts) and self._kind(self._parts[i]) != seg.kind:
                for w in self._parts[i:]:
                    w.remove()
                del self._parts[i:]
            if i >= len(self._parts):
                w = (ThinkingBlock(seg.text, seg.closed) if seg.kind == "thinking"
                     else Markdown(seg.text, classes="answer"))
                w._shown = seg.text
                self._parts.append(w)
                self.mount(w, before=anchor) if anchor is not None else self.mount(w)
                continue
            w = self._parts[i]
            if seg.kind == "thinking":
                w.set_text(seg.text, seg.closed)
            elif seg.text != w._shown:
                if seg.text.startswith(w._shown):
                    w.append(seg.text[len(w._shown):])
                else:
                    w.update(seg.text)
                w._shown = seg.text
        for w in self._parts[len(segs):]:
            w.remove()
        del self._parts[len(segs):]

    @staticmethod
    def _kind(w) -> str:
        return "thinking" if isinstance(w, ThinkingBlock) else "answer"

    def set_footer(self, text: str) -> None:
        """A dim line under the message (finish reason, speed)."""
        q = self.query(".message-footer")
        if q:
            q.first().update(text)
        else:
            self.mount(Static(text, classes="message-footer", markup=False))

    def answer_text(self) -> str:
        return "\n\n".join(s.text for s in self.segments() if s.kind == "answer")

    # -- actions -----------------------------------------------------------------------------
    def action_copy_message(self) -> None:
        self.app.copy_to_clipboard(self.answer_text())
        self.notify("Message copied", timeout=2)

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.answer_text())
        if not blocks:
            self.notify("No code block in this message", severity="warning", timeout=2)
            return
        self.app.copy_to_clipboard(blocks[-1])
        self.notify(f"Code block copied ({len(blocks[-1].splitlines())} lines)", timeout=2)

    def action_toggle_thinking(self) -> None:
        blocks = list(self.query(ThinkingBlock))
        if not blocks:
            self.notify("No reasoning in this message", timeout=2)
            return
        expand = all(b.collapsed for b in blocks)
        for b in blocks:
            b.collapsed = not expand


class ChatView(VerticalScroll):
    """All messages of the current conversation, newest at the bottom."""

    can_focus = False

    def clear(self) -> None:
        self.remove_children()

    def add_message(self, role: str, text: str = "", **kwargs) -> MessageView:
        view = MessageView(role, text, **kwargs)
        self.mount(view)
        self.scroll_end(animate=False)
        return view

    def add_notice(self, text: str, before=None) -> Static:
        """A one-line notice in the flow of messages (context trimmed, model switched, errors)."""
        w = Static(text, classes="notice", markup=False)
        self.mount(w, before=before)
        self.scroll_end(animate=False)
        return w

    def on_mount(self) -> None:
        self.anchor()  # stay at the bottom while a reply streams, until the user scrolls up

    def messages(self) -> list[MessageView]:
        return list(self.query(MessageView))
