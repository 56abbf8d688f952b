"""Byte sizes for people: one formatter for the CLI, ``inspect`` and the TUI.

Binary units throughout (1 KiB = 1024 B), spelled KiB/MiB/GiB/TiB so a size is never mistaken
for a decimal megabyte.
"""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
GiB = 2**30


def fmt_bytes(n: float, decimals: int = 1, *, unit: str | None = None, min_unit: str = "B") -> str:
    """``n`` bytes as text: ``fmt_bytes(123456789) == '117.7 MiB'``, ``fmt_bytes(512) == '512 B'``.

    Args:
        n: a byte count.
        decimals: digits after the point (whole bytes never get any).
        unit: force this unit (e.g. ``"MiB"`` for a column of memory figures); default: the
            largest unit in which ``n`` is at least 1 (but not smaller than ``min_unit``).
        min_unit: the smallest unit to use (``"MiB"``: 300 KiB shows as ``0 MiB`` with 0 decimals).
    Raises:
        ValueError: ``unit`` or ``min_unit`` is not one of :data:`UNITS`.
    """
    for name in (unit, min_unit):
        if name is not None and name not in UNITS:
            raise ValueError(f"unknown byte unit {name!r}; use one of {', '.join(UNITS)}")
    if unit is None:
        i = UNITS.index(min_unit)
        while i + 1 < len(UNITS) and abs(n) >= 1024 ** (i + 1):
            i += 1
        unit = UNITS[i]
    value = n / 1024 ** UNITS.index(unit)
    return f"{value:.0f} B" if unit == "B" else f"{value:.{decimals}f} {unit}"


def fmt_bytes_short(n: float) -> str:
    """The narrow form for the status bar and the model picker: whole MiB below 1 GiB
    (``'118 MiB'``), GiB with one decimal from there on (``'2.0 GiB'``)."""
    return fmt_bytes(n, decimals=0 if n < GiB else 1, min_unit="MiB")
