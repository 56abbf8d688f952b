"""The message box: Enter sends, ctrl+j / shift+enter / alt+enter insert a newline, ↑/↓ walk history."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter", "ctrl+enter")


class PromptInput(TextArea):
    """A multi-line input with a history of sent messages.

    ↑ on the first line recalls older messages, ↓ on the last line newer ones (and finally the
    draft that was being written).
    """

    class Submitted(Message):
        """The user pressed Enter on a non-empty message."""

        def __init__(self, text: str) -> None:
            self.text = text
            super().__init__()

    def __init__(self, history: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        super().__init__(**kwargs)
        self.sent_history: list[str] = list(history or [])
        self._hist_pos: int | None = None  # index into history while browsing
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                self.remember(self.text.rstrip())
                self.post_message(self.Submitted(self.text.rstrip()))
                self.clear()
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def remember(self, text: str) -> None:
        """Add ``text`` to the history (no consecutive duplicates) and stop browsing."""
        if not self.sent_history or self.sent_history[-1] != text:
            self.sent_history.append(text)
        self._hist_pos = None

    def _show_history(self, pos: int | None) -> None:
        self._hist_pos = pos
        self.load_text(self._draft if pos is None else self.sent_history[pos])
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self.sent_history:
            if self._hist_pos is None:
                self._draft = self.text
                self._show_history(len(self.sent_history) - 1)
            elif self._hist_pos > 0:
                self._show_history(self._hist_pos - 1)
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if not select and self.cursor_location[0] == last_row and self._hist_pos is not None:
            nxt = self._hist_pos + 1
            self._show_history(nxt if nxt < len(self.sent_history) else None)
            return
        super().action_cursor_down(select)
