"""``numerics="llama.cpp"``: reproduce the roundings llama.cpp's CPU backend applies, for parity checks.

The fast paths (:mod:`cpu_packed`, Triton) keep activations in float/bf16. llama.cpp does not: in
every matmul with a quantized weight, ggml first converts the float activations to the weight
type's ``vec_dot_type`` (``type_traits_cpu`` in ``ggml/src/ggml-cpu/ggml-cpu.c``) and computes
the dot products block by block on those 8-bit codes. With the default KV cache type (f16) and
without flash attention (llama-cpp-python's defaults) the attention matmuls round too. This module
reproduces, on the CPU x86 build that llama-cpp-python ships (AVX2/AVX-512 ``arch/x86/quants.c``):

==============================  ===================================================================
weight type                     activations become (per block, float32 arithmetic)
==============================  ===================================================================
Q4_0, Q5_0, Q8_0                Q8_0: ``amax`` of 32; ``d = amax/127`` stored fp16; codes
                                ``round_half_even(x * (127/amax))`` -- the x86 SIMD variant
                                (``_mm256_round_ps``, multiplier ``127/amax``), NOT the reference
                                ``roundf(x * (1/d))`` (round half away from zero)
Q4_1, Q5_1                      Q8_1: same codes and ``d``, plus ``s = fp16(d * sum(codes))``;
                                the dot product is ``sum_b d_w*d_a*isum_b + m_w*s_a`` (``s``
                                replaces ``m * sum(x)``: its fp16 rounding is part of the result)
Q4_K, Q5_K, Q6_K                Q8_K (``quantize_row_q8_K_ref``, also what x86 runs): ``max`` = the
                                element of largest |x| (first one), ``iscale = -127/max``, codes
                                ``min(127, nearest_int(iscale*x))`` (magic-number: half to even),
                                ``d = 1/iscale`` kept float32
F16 / BF16 / F32                rounded to fp16 / bf16 / unchanged
==============================  ===================================================================

Weights are dequantized once, exactly (:func:`edgeinfer.kernels.dequant.dequantize`), to float32
(4 bytes per weight: this mode trades memory and speed for fidelity; it is not a fast path).
Attention (:func:`attention`): K and V live in an fp16 cache; ``KQ = mul_mat(K_f16, Q)`` converts
Q to fp16 (F16's vec_dot_type), softmax is float32, ``KQV = mul_mat(V_f16, KQ)`` converts the
probabilities to fp16; products accumulate in float32.

Other x86 paths checked (``ggml-cpu/repack.cpp``, ``llamafile/sgemm.cpp``): Q4_1/Q5_1 have no
repacked or tinyBLAS kernel; Q8_0 weights (also the tied ``token_embd``/output of the default model)
are repacked only on NEON/RISC-V and take tinyBLAS or ``vec_dot_q8_0_q8_0`` -- the same Q8_0
activations either way. Q4_0 and Q4_K are repacked on AVX2 (``q4_0_8x8``, ``q4_K_8x8``); for 4+
rows they quantize activations with ``ggml_quantize_mat_q8_0_4x8`` / ``q8_K_4x8`` (x86
``arch/x86/repack.cpp``), the same formulas as above except that q8_K_4x8 takes the positive
element when +a and -a tie for the largest |x|.

What stays different: float32 summation order (ggml accumulates per block in SIMD lanes, torch's
sgemm in its own order; RMSNorm, SiLU's and softmax's exp, RoPE angles) -- ~1e-7 relative. With
8-bit activation codes that is NOT negligible: a 1-ulp change flips an occasional code and 30
layers amplify it; on the default model this alone moves the logits by ~2.6e-2 relative (top-1
~97 %), as much as llama.cpp differs from itself between decode steps and a batched pass
(``tests/test_ggml_numerics.py`` measures both). Only a bit-exact replica of ggml's kernel order
would agree better than that floor.

Oracle: ``quantize_row_q8_0/q8_1/q8_K`` exported by llama-cpp-python's ``libggml-cpu``, called
through ctypes in ``tests/test_ggml_numerics.py`` (byte-exact), and llama.cpp's logits.
"""

from __future__ import annotations

import os

import gguf
import torch
import torch.nn.functional as F

from edgeinfer.errors import BackendError
from edgeinfer.kernels.dequant import dequantize

T = gguf.GGMLQuantizationType

#: Engine numeric policies: "fast" (default: the device's fast kernels), "llama.cpp" (this module).
NUMERICS = ("fast", "llama.cpp")
ENV = "EDGEINFER_NUMERICS"

#: ggml's ``vec_dot_type`` per weight type (ggml-cpu.c ``type_traits_cpu``): what activations become.
VEC_DOT_TYPE = {
    T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0,
    T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1,
    T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K,
    T.F16: T.F16, T.BF16: T.BF16, T.F32: T.F32,
}
#: Weight types whose blocks carry an offset ``m`` (``w = d*q + m``), dotted with Q8_1's ``s``.
OFFSET_TYPES = (T.Q4_1, T.Q5_1)


def resolve_numerics(value: str | None) -> str:
    """The numeric policy to use: ``value``, else ``$EDGEINFER_NUMERICS``, else ``"fast"``.

    Raises:
        BackendError: an unknown name (the message lists the valid ones).
    """
    v = value or os.environ.get(ENV) or "fast"
    if v not in NUMERICS:
        src = "numerics=" if value else f"${ENV}="
        raise BackendError(f"unknown engine numerics {src}{v!r}; choose one of {', '.join(NUMERICS)}")
    return v


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x86 ``quantize_row_q8_0`` on float32 x [..., K] (K % 32 == 0).

    Returns:
        (q, d): codes [..., K/32, 32] (float32 holding integers in [-128, 127]) and the fp16
        block scales as float32 [..., K/32, 1].
    """
    q, d, _ = _q8_blocks(x)
    return q, d.half().float()


def quantize_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x86 ``quantize_row_q8_1``: :func:`quantize_q8_0` plus ``s = fp16(d * sum(q))`` [..., K/32, 1] (float32)."""
    q, d, _ = _q8_blocks(x)
    s = (d * q.sum(-1, keepdim=True)).half().float()
    return q, d.half().float(), s


def _q8_blocks(x: torch.Tensor):
    xb = x.float().reshape(*x.shape[:-1], -1, 32)  # [..., nb, 32]
    amax = xb.abs().amax(-1, keepdim=True)  # [..., nb, 1]
    d = amax / 127.0
    # a tensor numerator: ``scalar / tensor`` is reciprocal-then-multiply in torch (two roundings)
    mul = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * mul).clamp_(-128, 127)  # torch.round: half to even, like _MM_ROUND_NEAREST
    return q, d, amax


def quantize_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_row_q8_K_ref`` on float32 x [..., K] (K % 256 == 0).

    Returns:
        (q, d): codes [..., K/256, 256] (float32 integers) and float32 scales [..., K/256, 1].
    """
    xb = x.float().reshape(*x.shape[:-1], -1, 256)  # [..., nb, 256]
    idx = xb.abs().argmax(-1, keepdim=True)  # first element of largest |x|, as the C loop
    mx = torch.gather(xb, -1, idx)  # [..., nb, 1], signed
    nz = mx != 0
    one = torch.ones_like(mx)
    iscale = torch.where(nz, torch.full_like(mx, -127.0) / torch.where(nz, mx, one), torch.zeros_like(mx))
    q = torch.round(xb * iscale).clamp_(max=127)  # nearest_int (magic number): half to even
    d = torch.where(nz, one / torch.where(nz, iscale, one), torch.zeros_like(mx))
    return q, d


class GGMLMatmul:
    """``y = x @ W.T`` as llama.cpp's CPU backend rounds it (module docstring), for one weight.

    Args:
        raw: uint8 [N, row_bytes] GGML blocks, or a float [N, K] tensor.
        qtype: the weight's GGML type (a key of :data:`VEC_DOT_TYPE`).
        n, k: output / input features.
        device: where the dequantized weights live and the matmul runs.
    """

    #: Accumulation dtype of the matmuls (tests set float64 to measure how much 1-ulp summation
    #: differences alone move the model's output: the reproducibility floor).
    ACCUM = torch.float32

    def __init__(self, raw: torch.Tensor, qtype: T, n: int, k: int, device: torch.device | str = "cpu"):
        self.qtype, self.act = T(qtype), VEC_DOT_TYPE.get(T(qtype))
        if self.act is None:
            raise BackendError(f"numerics='llama.cpp' has no activation rule for {self.qtype.name} weights")
        self.offsets = None  # [N, K/32] block offsets m of Q4_1/Q5_1
        if raw.dtype != torch.uint8:
            w = raw.float()
        elif self.qtype in OFFSET_TYPES:
            blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[self.qtype][1]).clone()
            self.offsets = blocks[:, 2:4].contiguous().view(torch.float16).float().reshape(n, k // 32)
            blocks[:, 2:4] = 0  # m = +0.0: dequantize gives d*q exactly (d*q + 0.0)
            w = dequantize(blocks, self.qtype)
        else:
            w = dequantize(raw, self.qtype)
        self.weight = w.reshape(n, k).to(device).contiguous()  # [N, K] float32: d*q (without m for OFFSET_TYPES)
        if self.offsets is not None:
            self.offsets = self.offsets.to(device)

    def nbytes(self) -> int:
        return self.weight.numel() * 4 + (0 if self.offsets is None else self.offsets.numel() * 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N] float32."""
        x = x.float()
        m = x.shape[0]
        s = None
        if self.act == T.F32:
            xq = x
        elif self.act == T.F16:
            xq = x.half().float()
        elif self.act == T.BF16:
            xq = x.bfloat16().float()
        elif self.act == T.Q8_K:
            q, d = quantize_q8_k(x)
            xq = (q * d).reshape(m, -1)
        elif self.act == T.Q8_0:
            q, d = quantize_q8_0(x)
            xq = (q * d).reshape(m, -1)
        else:  # Q8_1 with an offset weight: sum_b d_w d_a isum_b + m_w s_a
            q, d, s = quantize_q8_1(x)
            xq = (q * d).reshape(m, -1)
        a = self.ACCUM
        w = self.weight if a == torch.float32 else self.weight.to(a)
        y = xq.to(a) @ w.T
        if s is not None:
            y = y + s.reshape(m, -1).to(a) @ self.offsets.to(a).T
        return y.float()


def attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """llama.cpp's non-flash attention on an fp16 KV cache (``build_attn_mha`` in llama-graph.cpp).

    Args:
        q: [B, H, S, D] float32 (after RoPE); keys, vals: [B, H_kv, L, D] (the fp16 cache);
        mask: bool [S, L] (True = visible) or None; scale: the KQ scale.
    Returns:
        [B, H, S, D] float32.
    """
    g = q.shape[1] // keys.shape[1]  # query head h reads kv head h // g (ggml's broadcast)
    k = keys.float().repeat_interleave(g, dim=1)  # [B, H, L, D]
    v = vals.float().repeat_interleave(g, dim=1)
    kq = torch.matmul(q.half().float(), k.transpose(-1, -2)) * scale  # Q -> fp16 (vec_dot_type F16); [B, H, S, L]
    if mask is not None:
        kq = kq.masked_fill(~mask, float("-inf"))
    p = F.softmax(kq, dim=-1).half().float()  # KQ -> fp16 as src1 of mul_mat(V_f16, KQ)
    return torch.matmul(p, v)  # [B, H, S, D]
