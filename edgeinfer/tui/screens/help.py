"""The help screen: every key binding with its id, from the bindings themselves."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label


def binding_rows(*classes) -> list[tuple[str, str, str]]:
    """``(keys, description, id)`` of every binding with an id declared on ``classes``."""
    rows = []
    for cls in classes:
        for b in cls.BINDINGS:
            if isinstance(b, Binding) and b.id:
                keys = b.key.split(",")
                shown = " / ".join(keys[:2]) + (" …" if len(keys) > 2 else "")
                rows.append((shown, b.tooltip or b.description or b.action, b.id))
    return rows


class HelpScreen(ModalScreen[None]):
    """Key bindings. Esc, q or F1 closes it."""

    BINDINGS = [Binding("escape,q,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self):
        with Vertical(id="help-box", classes="modal-box"):
            yield Label("Keys  (Esc closes)", classes="modal-title")
            table = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("key", "action", "id")
            table.add_rows(self.rows)
            yield table
