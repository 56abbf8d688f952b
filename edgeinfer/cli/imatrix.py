"""Compute an importance matrix (llama.cpp's imatrix format) by running calibration text through the torch engine."""

from __future__ import annotations

import sys

from edgeinfer.cli.args import _num


def add_arguments(p) -> None:
    p.add_argument("model", help="GGUF path or model name (ideally the F16/F32 file you will quantize from)")
    p.add_argument("--text", default="@stdlib-calib",
                   help="calibration text file, or @stdlib-calib (default): Python stdlib docstrings, "
                        "disjoint from eval's @stdlib-eval")
    p.add_argument("-o", "--output", required=True, help="output file: .gguf (llama.cpp's current format) or .dat (legacy)")
    p.add_argument("--ctx", type=_num(int, 2), default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=_num(int, 1), default=None, help="process at most N chunks")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight")
    p.add_argument("--threads", type=_num(int, 1), default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def main(args) -> int:
    from pathlib import Path

    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.corpus import load_text
    from edgeinfer.errors import EdgeinferError
    from edgeinfer.imatrix_collect import collect_imatrix
    from edgeinfer.quant.imatrix import ImatrixError, save_imatrix
    from edgeinfer.resolve import resolve_model

    out = Path(args.output)
    if out.exists() and not args.force:
        raise EdgeinferError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise EdgeinferError(f"{out.parent}: no such folder")
    text = load_text(args.text)
    backend = TorchBackend(resolve_model(args.model), LoadOptions(n_ctx=args.ctx, n_threads=args.threads,
                                                                 device=args.device))
    from tqdm import tqdm

    bar = tqdm(desc="imatrix", unit="chunk", disable=not sys.stderr.isatty())

    def on_chunk(done, total):
        bar.total = total
        bar.update(1)

    try:
        im = collect_imatrix(backend, text, n_ctx=args.ctx, max_chunks=args.chunks,
                             process_output=args.process_output, dataset=args.text, on_chunk=on_chunk)
    finally:
        bar.close()
        backend.close()
    try:
        save_imatrix(im, out)
    except ImatrixError as e:
        raise EdgeinferError(str(e)) from None
    print(f"wrote {out}: {len(im.entries)} matrices, {im.chunk_count} chunks of {args.ctx} tokens")
    return 0
