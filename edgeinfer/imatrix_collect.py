"""Collect an importance matrix (per-input-column activation statistics) with the torch engine.

What is measured is what llama.cpp's ``llama-imatrix`` measures: for every weight matrix of the
transformer blocks (``blk.*``; ``output.weight`` only with ``process_output``), the sum over all
activation rows of ``x[col]**2`` for the matrix's input ``x``, and the number of rows. The text is
cut into chunks of ``n_ctx`` tokens (BOS first when the model adds it), each run as one
teacher-forced forward pass. The result is saved in llama.cpp's imatrix formats by
:mod:`edgeinfer.quant.imatrix`, so files interchange with ``llama-imatrix`` / ``llama-quantize``.
"""

from __future__ import annotations

from typing import Callable

import torch

from edgeinfer.evaluate import chunks
from edgeinfer.errors import EdgeinferError
from edgeinfer.kernels.qlinear import FusedLinear, QuantExpertLinear, QuantLinear
from edgeinfer.quant.imatrix import Imatrix


def _wanted(name: str, process_output: bool) -> bool:
    return name.startswith("blk.") or (process_output and name == "output.weight")


Target = tuple[torch.nn.Module, list[str], int, int]  # module, weight names, expert, experts


def _targets(model: torch.nn.Module, process_output: bool) -> list[Target]:
    """(module whose input to record, GGUF weight names that read that input, expert, n_expert).

    A fused projection (:class:`FusedLinear`, e.g. q/k/v) records one input for all its parts.
    Expert projections (``ffn_*_exps``: :class:`QuantExpertLinear`, one :class:`QuantLinear` per
    expert) record each expert's input rows -- the tokens routed to it -- into its slice of the
    stacked entry, with one count per expert, as llama-imatrix does for ``MUL_MAT_ID``.
    """
    out: list[Target] = []
    for m in model.modules():
        if isinstance(m, FusedLinear):
            names = [n for n in m.names if _wanted(n, process_output)]
        elif isinstance(m, QuantExpertLinear):
            if _wanted(m.name, process_output):
                out += [(m.expert(e), [m.name], e, m.n_expert) for e in range(m.n_expert)]
            continue
        elif isinstance(m, QuantLinear) and m.path != "fused" and "[" not in m.name:
            names = [m.name] if _wanted(m.name, process_output) else []
        else:
            continue
        if names:
            out.append((m, names, 0, 1))
    return out


def collect_imatrix(backend, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                    process_output: bool = False, dataset: str = "",
                    on_chunk: Callable[[int, int], None] | None = None) -> Imatrix:
    """Run ``text`` through ``backend`` (a :class:`~edgeinfer.backends.torch_engine.TorchBackend`).

    Args:
        backend: the loaded torch engine (its ``model`` and ``logits(tokens)`` are used).
        text: calibration text.
        n_ctx: tokens per chunk (llama-imatrix's ``-c``, default 512).
        max_chunks: stop after this many chunks.
        process_output: also collect ``output.weight`` (llama-imatrix's ``--process-output``).
        dataset: name recorded in the file.
        on_chunk: progress callback ``(done, total)``.
    Returns:
        an :class:`~edgeinfer.quant.imatrix.Imatrix` with one entry per weight matrix.
    Raises:
        EdgeinferError: the text is shorter than one chunk, or ``n_ctx`` exceeds the context.
    """
    if n_ctx > backend.n_ctx:
        raise EdgeinferError(f"--ctx {n_ctx} exceeds the loaded context ({backend.n_ctx}); load with a larger context")
    tokens = backend.tokenize(text, add_special=False)
    add_bos, bos = backend.adds_bos(), backend.bos_token_id()  # llama.cpp's vocab, as llama-imatrix
    todo = list(chunks(tokens, n_ctx, add_bos and bos >= 0, bos, max_chunks))
    if not todo:
        raise EdgeinferError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    hooks = []

    def make_hook(names: list[str], mat: int, n_mat: int):
        def hook(_module, args):
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [rows, K]
            sq = (x2 * x2).sum(dim=0).cpu().numpy()
            for n in names:
                im.add(n, sq, x2.shape[0], mat, n_mat)

        return hook

    for module, names, mat, n_mat in _targets(backend.model, process_output):
        hooks.append(module.register_forward_pre_hook(make_hook(names, mat, n_mat)))
    if not hooks:
        raise EdgeinferError(f"{backend.path}: found no weight matrices to collect statistics for")
    try:
        with torch.inference_mode():
            for i, chunk in enumerate(todo):
                backend.logits(chunk)
                im.chunk_count += 1
                if on_chunk:
                    on_chunk(i + 1, len(todo))
    finally:
        for h in hooks:
            h.remove()
    return im
