"""MoE expert offload for the torch engine (``--cpu-moe`` / ``--n-cpu-moe N``): the experts of a
layer stay in host memory and only the few a token routes to are copied to the device.

:class:`OffloadedExpertLinear` replaces :class:`~edgeinfer.kernels.qlinear.QuantExpertLinear` for
the layers chosen for offload. It keeps the layer's GGML blocks in host memory (pinned, so copies
are asynchronous DMA), a small LRU cache of experts already on the device, and copies on a side
stream: :meth:`will_use` (called by the MoE block with every expert a batch chose, before it computes
any) starts the copies of the missing ones, and :meth:`expert` makes the compute stream wait only
for that expert's copy -- so expert ``i + 1`` crosses PCIe while expert ``i`` computes.

On a CPU-only machine there is nothing to offload (the weights are in host memory already): the
loader keeps the plain quantized experts and the options change nothing. The class itself works on
any device (on CPU a "transfer" is a host copy), which is how its logic is tested here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import gguf
import torch
from torch import nn

from edgeinfer.kernels.qlinear import QuantLinear

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType


def _pinned_copy(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` copied into page-locked host memory (falls back to the pageable tensor where pinning is refused)."""
    try:
        out = torch.empty(raw.shape, dtype=raw.dtype, pin_memory=True)
    except RuntimeError as e:  # no CUDA driver, or the OS refuses to lock that much memory
        log.warning("cannot pin %d MiB of expert weights (%s); copies will be synchronous", raw.numel() >> 20, e)
        return raw
    out.copy_(raw)
    return out


class OffloadedExpertLinear(nn.Module):
    """One projection of every expert (GGUF ``ffn_*_exps``) held in host memory, with a device LRU cache.

    Args:
        raw: ``uint8 [E, N, row_bytes]`` (a view of the memory map).
        qtype, n_expert, n, k, name, numerics: as :class:`QuantExpertLinear`.
        device: where experts compute.
        cache_size: experts kept on the device (least recently used evicted first).
        pin: copy the blocks into pinned host memory (CUDA); False keeps the memory-mapped view.
    """

    def __init__(self, raw: torch.Tensor, qtype: T, n_expert: int, n: int, k: int, device: torch.device | str,
                 name: str = "", numerics: str = "fast", cache_size: int = 8, pin: bool | None = None):
        super().__init__()
        self.qtype, self.n_expert, self.in_features, self.out_features = T(qtype), n_expert, k, n
        self.name, self.numerics, self.device = name, numerics, torch.device(device)
        self.cache_size = max(1, cache_size)
        cuda = self.device.type == "cuda"
        self.host = _pinned_copy(raw) if (cuda if pin is None else pin) else raw
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._cache: OrderedDict[int, QuantLinear] = OrderedDict()
        self._pending: dict[int, tuple[QuantLinear, object]] = {}
        self.transfers = 0  # experts copied to the device so far (a figure for benchmarks and tests)
        self.path = "offload"

    def extra_repr(self) -> str:
        return (f"{self.n_expert} x {self.in_features}->{self.out_features}, {self.qtype.name}, host memory, "
                f"device cache {self.cache_size}")

    def nbytes(self) -> int:
        """Bytes on the device (the cache), not the host copy."""
        return sum(q.nbytes() for q in self._cache.values())

    def _copy(self, e: int) -> tuple[QuantLinear, object]:
        if self._stream is None:
            return self._make(self.host[e].to(self.device, copy=True)), None
        with torch.cuda.stream(self._stream):
            dev = torch.empty(self.host.shape[1:], dtype=self.host.dtype, device=self.device)
            dev.copy_(self.host[e], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return self._make(dev), done

    def _make(self, raw_dev: torch.Tensor) -> QuantLinear:
        self.transfers += 1
        return QuantLinear(raw_dev, self.qtype, self.out_features, self.in_features, None, self.device, self.name,
                           numerics=self.numerics)

    def will_use(self, experts: list[int]) -> None:
        """Start copying the experts in ``experts`` that are not on the device yet (in that order)."""
        for e in experts:
            if e in self._cache:
                self._cache.move_to_end(e)
            elif e not in self._pending:
                self._pending[e] = self._copy(e)

    def expert(self, e: int) -> QuantLinear:
        """Expert ``e`` on the device (copied now if :meth:`will_use` did not ask for it)."""
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        q, done = self._pending.pop(e, None) or self._copy(e)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            q.raw.record_stream(compute)  # allocated on the copy stream, read on this one: freed only after it
        self._cache[e] = q
        while len(self._cache) > max(self.cache_size, len(self._pending) + 1):
            self._cache.popitem(last=False)
        return q
