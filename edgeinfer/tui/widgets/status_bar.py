"""The live status line: model, quant, backend, device, context, TTFT, decode speed, memory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from textual.widgets import Static

from edgeinfer.units import fmt_bytes_short


@dataclass
class Status:
    """Everything the status bar shows; ``None`` hides a field."""

    model: str = "no model"
    quant: str = ""
    backend: str = ""
    device: str = ""
    ctx_used: int = 0
    ctx_total: int = 0
    ttft_s: float | None = None
    tok_s: float | None = None
    rss: int = 0
    vram: int = 0
    state: str = ""  # "loading", "generating", "" ...
    extra: dict = field(default_factory=dict)


def _fit(text: str, width: int) -> str:
    return text if width <= 0 or len(text) <= width else text[: max(width - 1, 0)] + "…"


def format_status(s: Status, width: int = 0) -> str:
    """The status text: one line when it fits in ``width``, else two (model line, speed line)."""
    name = s.model if len(s.model) <= 28 else s.model[:27] + "…"
    model = [name]
    if s.quant:
        model.append(s.quant)
    if s.backend:
        model.append(f"{s.backend}/{s.device}" if s.device else s.backend)
    if s.rss:
        model.append(f"RSS {fmt_bytes_short(s.rss)}")
    if s.vram:
        model.append(f"VRAM {fmt_bytes_short(s.vram)}")
    speed = []
    if s.ctx_total:
        speed.append(f"ctx {s.ctx_used}/{s.ctx_total}")
    if s.ttft_s is not None:
        speed.append(f"TTFT {s.ttft_s * 1000:.0f} ms")
    if s.tok_s is not None:
        speed.append(f"{s.tok_s:.1f} tok/s")
    if s.state:
        speed.append(s.state)
    one = " │ ".join(model + speed)
    if width <= 0 or len(one) <= width:
        return one
    return _fit(" │ ".join(model), width) + "\n" + _fit(" │ ".join(speed), width)


class StatusBar(Static):
    """One line at the bottom of the chat; :meth:`set` changes some fields and redraws."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", markup=False, **kwargs)  # text comes from render()
        self.status = Status()

    def set(self, **fields) -> None:
        self.status = replace(self.status, **fields)
        self._relayout()

    def _relayout(self) -> None:
        text = format_status(self.status, self.content_size.width)
        lines = text.count("\n") + 1
        if self.styles.height is None or self.styles.height.value != lines:
            self.styles.height = lines
        self.refresh()

    def on_resize(self) -> None:
        self._relayout()

    def render(self) -> str:
        return format_status(self.status, self.content_size.width)
