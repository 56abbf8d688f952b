"""Shared by the Gemma 4 tests: transformers reference logits (optionally with ggml's fp16 GELU and
with the weights the GGUF plan quantizes), llama.cpp logits, llama.cpp's own converter as an oracle.

ggml's CPU backend computes GELU through a 65536-entry fp16 table (``GGML_GELU_FP16`` in
``ggml-cpu/vec.h``): ``y = fp16(gelu(fp16(x)))`` for ``-10 < x < 10``. Gemma's gelu MLPs (and the
PLE gate) make that the largest difference between llama.cpp and transformers (about 1e-2 relative
on the tiny random models, where activations are large); :func:`hf_logits` with ``ggml_gelu=True``
applies the same rounding in transformers, which leaves float32 summation order (~1e-3).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LLAMA_CPP_SRC = Path(os.environ.get("EDGEINFER_LLAMA_CPP_SRC", "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp"))
#: 24 test tokens: BOS then ids past the control and byte tokens (longer than the window of 4)
TOKENS = [2] + [int(t) for t in np.random.default_rng(7).integers(19, 384, size=23)]


def ggml_gelu(x):
    """ggml-cpu's ``ggml_vec_gelu_f32`` with ``GGML_GELU_FP16``: fp16 in, tanh GELU, fp16 out."""
    import torch
    import torch.nn.functional as F

    y = F.gelu(x.to(torch.float16).float(), approximate="tanh").to(torch.float16).float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@contextlib.contextmanager
def gelu_as_ggml():
    """transformers' Gemma 4 built with :func:`ggml_gelu` as its ``gelu_pytorch_tanh``."""
    import torch
    import transformers.models.gemma4.modeling_gemma4 as G

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return ggml_gelu(x)

    real = G.ACT2FN

    class Table(dict):
        def __getitem__(self, k):
            return GgmlGelu() if k == "gelu_pytorch_tanh" else real[k]

    G.ACT2FN = Table()
    try:
        yield
    finally:
        G.ACT2FN = real


def hf_model(folder, ggml: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    with gelu_as_ggml() if ggml else contextlib.nullcontext():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def quantize_like_plan(model, folder, qtype: str) -> int:
    """Replace every weight of ``model`` by ``dequantize(quantize(W))`` in the type the converter's
    plan gives it (the gguf package's reference quantizers). Returns how many were replaced."""
    import gguf
    import torch

    from edgeinfer.quant.convert import plan_conversion

    types = {t.source.name: t.ggml_type for t in plan_conversion(folder, qtype).tensors if t.source.name}
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = types.get(name)
            if t is None or t == gguf.GGMLQuantizationType.F32:
                continue
            w = p.detach().numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)))
            n += 1
    return n


def hf_logits(folder, tokens=TOKENS, ggml: bool = False, qtype: str | None = None) -> np.ndarray:
    """transformers' logits [len(tokens), vocab] (float64), see the module docstring for the options."""
    import torch

    model = hf_model(folder, ggml)
    if qtype is not None:
        assert quantize_like_plan(model, folder, qtype) > 0
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_logits(path, tokens=TOKENS, n_threads: int = 2) -> np.ndarray:
    """llama.cpp's logits for every position (F32 KV cache: ``type_k = type_v = 0``)."""
    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(path, n_ctx=64, n_threads=n_threads, n_batch=64, logits_all=True, verbose=False,
                     type_k=0, type_v=0)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def llama_cpp_convert(folder: Path, out: Path, outtype: str) -> Path:
    """Run llama.cpp's own ``convert_hf_to_gguf.py`` (the oracle; never imported, never copied)."""
    script = LLAMA_CPP_SRC / "convert_hf_to_gguf.py"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, str(script), str(folder), "--outtype", outtype.lower(), "--outfile", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def gguf_contents(path) -> tuple[dict, dict]:
    """(metadata without the GGUF header counts, {tensor: (GGUF shape, type name, raw bytes)})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}
    return kv, ts


def top1_disagreements(ref: np.ndarray, got: np.ndarray) -> list[tuple[int, float, float]]:
    """Positions where the top-1 token differs and it is not a near-tie: (position, the reference's
    margin between the two tokens, the largest logit difference there). A margin below twice the
    largest difference is a tie at this precision, not a disagreement."""
    out = []
    for i in np.nonzero(ref.argmax(-1) != got.argmax(-1))[0]:
        a, b = int(ref[i].argmax()), int(got[i].argmax())
        margin, diff = float(ref[i, a] - ref[i, b]), float(np.abs(ref[i] - got[i]).max())
        if margin >= 2 * diff:
            out.append((int(i), margin, diff))
    return out


#: Load a GGUF in a fresh process, generate 16 tokens greedily, print the model process's peak RSS
#: (VmHWM -- its own, where ru_maxrss would include the forking parent's) and file-backed RSS as JSON.
#: ``torch``: the torch engine in this process; ``llama.cpp``: edgeinfer's llama.cpp backend, whose
#: model lives in its runner process (measured there); ``raw``: llama-cpp-python's ``Llama`` with
#: llama.cpp's own defaults (lazy_mode AUTO), what stock llama.cpp does with the file.
PEAK_RSS = r"""
import json, sys
def status(key, pid="self"):
    return next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith(key + ":"))
how, path = sys.argv[1], sys.argv[2]
prompt = "The quick brown fox jumps over the lazy dog"
if how == "raw":
    from llama_cpp import Llama
    llm = Llama(path, n_ctx=256, n_threads=2, verbose=False)
    out = []
    for t in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, top_k=1):
        if len(out) == 16 or llm.token_eos() == t:
            break
        out.append(t)
    print(json.dumps({"peak": status("VmHWM"), "file_rss": status("RssFile"), "tokens": len(out),
                      "text": llm.detokenize(out).decode("utf-8", "replace")}))
    sys.exit(0)
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.backends import load_backend
b = load_backend(how, path, LoadOptions(n_ctx=256, n_threads=2))
done = list(b.generate(prompt, SamplingParams(temperature=0, max_tokens=16)))[-1]
pid = getattr(b, "runner_pid", None) or "self"
print(json.dumps({"peak": status("VmHWM", pid), "file_rss": status("RssFile", pid),
                  "tokens": done.timings.generated_tokens, "text": done.text}))
"""


def peak_rss(how: str, path) -> dict:
    """Run :data:`PEAK_RSS` (``how``: torch, llama.cpp or raw) on ``path``; its JSON result."""
    import json

    r = subprocess.run([sys.executable, "-c", PEAK_RSS, how, str(path)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{how} on {path}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
