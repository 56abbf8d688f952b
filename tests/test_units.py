"""Byte sizes: one formatter (edgeinfer.units) for ls, inspect, run --stats, convert and the TUI.

The oracles are the expressions each place used before it called the shared helper; the output
must stay the same, except ``edgeinfer ls``, which printed MiB values labelled "MB".
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeinfer.units import fmt_bytes, fmt_bytes_short

SIZES = [0, 1, 512, 1023, 1024, 1536, 10 * 2**10 - 1, 2**20 - 1, 2**20, 123456789, 2**30 - 1, 2**30,
         int(2.04 * 2**30), 5 * 2**30 + 7, 1000 * 2**30]


def old_convert_size(n):  # cli/convert.py's _size before
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def old_status(n):  # tui/widgets/status_bar.fmt_bytes before
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@pytest.mark.parametrize("n", SIZES)
def test_same_text_as_the_formatters_it_replaced(n):
    got = (fmt_bytes(n), fmt_bytes_short(n), fmt_bytes(n, 0, unit="MiB"), fmt_bytes(n, unit="MiB"))
    want = (old_convert_size(n), old_status(n), f"{n / 2**20:.0f} MiB", f"{n / 2**20:.1f} MiB")
    print(n, got)
    assert got == want


def test_larger_units_and_bad_unit():
    assert fmt_bytes(3 * 2**40) == "3.0 TiB" and fmt_bytes(2**20, 2) == "1.00 MiB"
    with pytest.raises(ValueError, match="MB"):
        fmt_bytes(1, unit="MB")


def test_ls_sizes_are_labelled_binary(cli_env, default_gguf):
    r = subprocess.run([sys.executable, "-m", "edgeinfer", "ls"], capture_output=True, text=True, env=cli_env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("default "))
    print(r.stdout)
    assert fmt_bytes(default_gguf.stat().st_size) in row and "MB " not in row
