"""Fused dequant+matmul Triton kernels vs reference dequantize + float64 matmul.

Runs everywhere: on CPU the kernels execute under the Triton interpreter (``TRITON_INTERPRET=1``
is set below, before triton and the kernel module are imported; the interpreter computes
``tl.dot`` in fp32, so the tolerance is fp32 summation error, 1e-5 relative). On a CUDA machine
run ``EDGEINFER_TRITON_CUDA=1 pytest tests/test_kernels_triton.py`` to check the compiled kernels
(fp16 dot operands: 2e-3). Shapes are small because the interpreter is slow.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ON_CUDA = os.environ.get("EDGEINFER_TRITON_CUDA") == "1"
# Triton decides "interpreted or compiled" when it is first imported: if another test module
# imported it already, the checks run in a fresh interpreter instead (this same file).
FRESH = "triton" not in sys.modules
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

if not FRESH and not ON_CUDA:

    def test_fused_kernels_in_fresh_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
                           env=env, capture_output=True, text=True, timeout=600)
        print(r.stdout[-4000:], r.stderr[-2000:])
        assert r.returncode == 0

else:
    import gguf
    import torch

    from test_kernels import random_blocks
    from edgeinfer.kernels.dequant import dequantize

    if "edgeinfer.kernels.triton_qmm" in sys.modules:
        importlib.reload(sys.modules["edgeinfer.kernels.triton_qmm"])
    from edgeinfer.kernels import triton_qmm

    T = gguf.GGMLQuantizationType
    DEVICE = "cuda" if ON_CUDA else "cpu"
    TOL = 2e-3 if ON_CUDA else 1e-5

    @pytest.mark.parametrize("qtype", triton_qmm.SUPPORTED, ids=lambda t: t.name)
    def test_fused_kernels_match_reference(qtype):
        n, k = 40, 256  # N not a multiple of the tile: exercises the row masks
        raw = torch.from_numpy(random_blocks(qtype, n, k, seed=11 + int(qtype), scale=0.05)).to(DEVICE)
        w = dequantize(raw.cpu(), qtype).double()
        g = torch.Generator().manual_seed(int(qtype))
        for m, kind in ((1, "gemv"), (2, "gemv"), (5, "mm")):
            x = torch.randn(m, k, generator=g)
            y = triton_qmm.qmatmul(x.to(DEVICE), raw, qtype, n, force=kind).cpu()
            ref = x.double() @ w.T
            err = float((y.double() - ref).norm() / ref.norm())
            print(f"triton {kind} {qtype.name} M={m}: rel err {err:.2e} (tol {TOL:g})")
            assert y.shape == (m, n) and err < TOL

    def test_fused_kernel_rejects_partial_blocks():
        raw = torch.zeros(4, 144, dtype=torch.uint8)
        with pytest.raises(ValueError, match="Q4_K"):
            triton_qmm.qmatmul(torch.zeros(1, 128), raw, T.Q4_K, 4)

    def test_tiny_model_through_the_triton_path(tmp_path, monkeypatch):
        # The whole CUDA code path of the engine (QuantLinear -> qmatmul, GEMV for decode, tiled
        # for prefill) on a tiny converted llama, vs the same file through the exact dequantize
        # path. Both are fp32 here, so the tolerance is summation order: 1e-4.
        import _tiny_models

        from edgeinfer.engine.loader import load_model
        from edgeinfer.kernels import qlinear
        from edgeinfer.quant.convert import convert

        path = convert(_tiny_models.make_tiny_checkpoint("qwen2", tmp_path / "ck"), tmp_path / "m.gguf", "Q8_0")
        toks = [5, 77, 123, 9, 250, 31, 64, 18, 199, 3, 41, 160, 7, 88, 300]
        out = {}
        for forced in ("dequant", "triton"):
            monkeypatch.setattr(qlinear, "FORCE_PATH", forced)
            model, report = load_model(path, torch.device("cpu"), 32)
            assert set(report.paths) == {f"Q8_0:{forced}"}
            prefill = model(torch.tensor([toks[:12]]), 0)[0]  # M=12 > GEMV_MAX_M -> tiled kernel
            steps = [model(torch.tensor([[t]]), 12 + i)[0] for i, t in enumerate(toks[12:])]  # M=1 -> GEMV
            out[forced] = torch.cat([prefill] + steps)
        err = float((out["triton"] - out["dequant"]).abs().max() / out["dequant"].abs().max())
        print(f"tiny qwen2 Q8_0, Triton path vs dequantize path: max rel diff {err:.2e} (tol 1e-4)")
        assert err < 1e-4
