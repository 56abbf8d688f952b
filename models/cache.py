"""Per-layer attention caches. Each attention module owns one (:meth:`Attention.setup_cache`),
possibly shared with another layer's (KV-shared layers read the producer's keys and values).

:class:`KVCache` keeps keys/values of full or sliding-window layers (a ring buffer of the window
when the window is shorter than the context). Caches with another layout (a compressed latent,
as DeepSeek's multi-head latent attention caches) implement the same ``update``/``shared``/``nbytes``.

Rolling back (speculative decoding, :mod:`edgeinfer.engine.speculative`): a cache that is not a ring
needs nothing -- the next write at position ``p`` overwrites what was there and a query at ``p`` reads
only positions ``< p + 1``. A ring buffer overwrites the slots of older positions still inside the
window, so :meth:`KVCache.mark` starts logging what each write replaces and :meth:`KVCache.rollback`
puts it back.
"""

from __future__ import annotations

import torch

from edgeinfer.errors import InvalidModelError


class KVCache:
    """Static, preallocated keys/values of one layer: [1, H_kv, L, D].

    A sliding-window layer whose window is shorter than the context keeps only its window
    as a ring buffer (position p lives in slot ``p % window``).
    """

    def __init__(self, n_kv_head: int, head_dim: int, n_ctx: int, window: int, device, dtype,
                 v_dim: int | None = None):
        self.window = window
        self.ring = 0 < window < n_ctx
        self.size = window if self.ring else n_ctx
        # uninitialised: a slot is written before any query can see it (every read is of positions
        # already stored), and untouched pages cost neither load time nor resident memory
        self.k = torch.empty(1, n_kv_head, self.size, head_dim, device=device, dtype=dtype)
        self.v = torch.empty(1, n_kv_head, self.size, v_dim or head_dim, device=device, dtype=dtype)
        self._last: tuple | None = None  # (pos0, s, keys, values, mask) of the latest update
        self._mark: int | None = None  # ring buffers: writes of positions >= this are logged
        self._log: list[tuple] = []  # (position, slot, old keys, old values), oldest first

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def bytes_per_token(self) -> int:
        """Cache bytes one position costs (keys + values)."""
        return self.nbytes() // self.size

    def shared(self, pos0: int, s: int):
        """What the latest :meth:`update` returned, for a layer that reuses this layer's keys and
        values (KV sharing): the same ``(keys, values, mask)`` for queries ``pos0 .. pos0+s-1``.

        Raises:
            RuntimeError: the producing layer has not run for these positions yet.
        """
        last = self._last
        if last is None or last[0] != pos0 or last[1] != s:
            raise RuntimeError(f"shared KV cache read for positions {pos0}+{s} before the producing layer ran")
        return last[2:]

    def mark(self, pos: int) -> None:
        """Positions ``>= pos`` written from now on may be undone by :meth:`rollback` (ring buffers
        log what each write replaces; other caches need nothing). Forgets the previous log."""
        self._mark = pos if self.ring else None
        self._log.clear()

    def rollback(self, pos: int) -> None:
        """Undo the writes of positions ``>= pos`` made since :meth:`mark` (``pos >= `` the mark)."""
        while self._log and self._log[-1][0] >= pos:
            _, slot, k, v = self._log.pop()
            self.k[:, :, slot] = k
            self.v[:, :, slot] = v
        self._last = None

    def _save(self, first: int, end: int) -> None:
        """Log the ring slots that positions ``first .. end-1`` are about to overwrite (from the mark on)."""
        for p in range(max(first, self._mark), end):
            slot = p % self.size
            self._log.append((p, slot, self.k[:, :, slot].clone(), self.v[:, :, slot].clone()))

    def update(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store k, v [1, H_kv, S, D] for positions pos0..pos0+S-1 (see :meth:`_update`)."""
        out = self._update(k, v, pos0)
        self._last = (pos0, k.shape[2], *out)
        return out

    def _update(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store k, v [1, H_kv, S, D] for positions pos0..pos0+S-1.

        Returns:
            (keys, values, mask): what the S queries attend to; ``mask`` is a bool [S, L]
            (True = visible) or None when every returned key is visible to every query.
        """
        s, dev = k.shape[2], k.device
        end = pos0 + s
        if not self.ring and end > self.size:
            raise IndexError(f"KV cache holds {self.size} positions, asked for {end}")
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if not self.ring:
            self.k[:, :, pos0:end] = k
            self.v[:, :, pos0:end] = v
            keys, vals = self.k[:, :, :end], self.v[:, :, :end]
            if s == 1 and (self.window == 0 or end <= self.window):
                return keys, vals, None  # decode: every cached key is visible
            kpos = torch.arange(end, device=dev)
        elif s == 1:  # decode: after writing, the ring holds exactly the visible window
            if self._mark is not None:
                self._save(pos0, end)
            self.k[:, :, pos0 % self.size] = k[:, :, 0]
            self.v[:, :, pos0 % self.size] = v[:, :, 0]
            n = min(end, self.size)
            return self.k[:, :, :n], self.v[:, :, :n], None
        else:
            w = self.size
            old = torch.arange(max(0, pos0 - w), pos0, device=dev)
            keys = torch.cat([self.k[:, :, old % w], k], dim=2)
            vals = torch.cat([self.v[:, :, old % w], v], dim=2)
            kpos = torch.cat([old, torch.arange(pos0, end, device=dev)])
            n = min(s, w)
            slots = torch.arange(end - n, end, device=dev) % w
            if self._mark is not None:
                self._save(end - n, end)
            self.k[:, :, slots] = k[:, :, s - n:]
            self.v[:, :, slots] = v[:, :, s - n:]
        qpos = torch.arange(pos0, end, device=dev)[:, None]
        mask = kpos[None, :] <= qpos
        if self.window:
            mask &= (qpos - kpos[None, :]) < self.window
        return keys, vals, mask


def kv_sources(swa: tuple, n_shared: int, path: str = "") -> list[int | None]:
    """Per layer: the layer whose keys and values it reads (None: its own), for the last ``n_shared``
    layers reading those of the last earlier non-shared layer of their own type (sliding or full;
    ``swa[i]`` True for sliding) -- transformers' ``kv_sharing_modes`` of Gemma 3n and Gemma 4.

    Raises:
        InvalidModelError: a shared layer's type has no earlier layer with its own K/V.
    """
    n = len(swa)
    first = n - n_shared
    out: list[int | None] = [None] * n
    for i in range(first, n):
        src = next((j for j in range(first - 1, -1, -1) if swa[j] == swa[i]), None)
        if src is None:
            raise InvalidModelError(f"{path}: layer {i} shares K/V but no earlier layer of its type has any")
        out[i] = src
    return out
