"""Gemma 3n end to end: convert, llama.cpp and the torch engine against transformers.

Two tiny random checkpoints (``tests/_tiny_models.py``, rows ``gemma3n`` and ``gemma3n_small``), both
with AltUp, LAuReL, per-layer embeddings, activation sparsity, KV-shared layers and a sliding window
of 4 (shorter than the 24 test tokens). ``gemma3n`` fits what stock llama.cpp hard-codes (22 layers,
20 with K/V, PLE 256, LAuReL 64, 4 streams, sparsity 0.95 on layers 0-9); ``gemma3n_small`` does not
(6 layers, 3 streams with stream 1 active, per-layer FFN widths...) and is converted ``--torch-only``.

Oracles and tolerances (relative L2 error of the logits, KL per position), with what was measured:

* file format: our F32 and Q8_0 files against llama.cpp's own converter on the same checkpoint --
  the same keys, tensor names, shapes, types and bytes, except the documented differences: rows of
  ``per_layer_token_embd`` past the per-layer vocabulary (ours repeat row 0, which is what
  transformers looks those ids up as; llama.cpp's are zeros), ``tokenizer.ggml.pre`` and the score
  of padding tokens.
* torch engine, F32: vs transformers < 1e-4 (measured 1e-5; float32 summation order through 22
  layers, amplified by the gaussian top-k, see below).
* torch engine, Q8_0 on its dequantize path (float32 activations): vs transformers run with the
  same dequantized weights < 1e-4 (measured 6e-6). That checks the quantized file and the loader
  exactly. The fast path rounds activations and scales to bf16 (~3e-3 per matmul,
  kernels/cpu_packed.py): < 0.3, KL < 1e-2 (measured 0.12 / 3e-3).
* llama.cpp, F32: vs transformers with llama.cpp's two numerics emulated -- its gaussian top-k takes
  the *unbiased* std (1/(n-1), ``gemma3n.cpp`` ``gaussian_topk``; transformers 1/n) and ggml-cpu
  computes GELU through an fp16 table -- < 2e-3 (measured 3.6e-4). Against plain transformers < 0.2
  (measured 9.7e-2, all of it the std: with FFN width 128 the cut-off moves by 1.6448 * (sqrt(128/127)
  - 1) = 0.0065 std; the real 8192-wide FFNs move it 64x less).
* llama.cpp, Q8_0: vs that emulated transformers with dequantized weights < 0.4, KL < 2e-2 (measured
  0.20 / 8e-3). llama.cpp rounds every quantized matmul's activations to 8 bits (~0.4 %), and this
  model amplifies small errors: gaussian top-k keeps the excess ``g - cutoff`` of the ~5 % largest
  gate values, whose relative error is ``g / (g - cutoff)`` ~ 5x that of ``g``. Measured on the
  tiny model: a 1e-3 relative perturbation of every weight moves the logits by 6.9e-2 (9.7e-3
  without sparsity). The sharp checks of the quantized file are the byte comparison with
  llama.cpp's converter and the torch engine's dequantize path above.
* greedy text: the torch engine's equals transformers' greedy tokens; llama.cpp's differs on the
  tiny model after a few tokens because of the unbiased std -- the torch engine with llama.cpp's std
  and fp16 GELU swapped in gives llama.cpp's text exactly.
* KV cache: prefill + steps / chunks (past the window) equal one full pass to 1e-5.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import _tiny_models
import test_convert_parity
from test_models import kl, rel

LLAMA_CPP_SRC = Path(os.environ.get("EDGEINFER_LLAMA_CPP_SRC", "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp"))
TOKENS = [int(t) for t in np.random.default_rng(11).integers(3, 300, size=24)]
SHARED_KV_STEMS = ("attn_k", "attn_v", "attn_k_norm")


# --------------------------------------------------------------------------- references


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's ``ggml_vec_gelu_f32`` with ``GGML_GELU_FP16``: fp16 in, tanh GELU, fp16 out."""
    y = F.gelu(x.to(torch.float16).float(), approximate="tanh").to(torch.float16).float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@contextlib.contextmanager
def hf_with_llama_cpp_numerics():
    """transformers' Gemma 3n with llama.cpp's gaussian top-k (unbiased std) and fp16 GELU table."""
    import transformers.models.gemma3n.modeling_gemma3n as G

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return ggml_gelu(x)

    def topk(self, x):
        z = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.activation_sparsity, dtype=torch.float32))
        std, mean = torch.std_mean(x, dim=-1, keepdim=True, correction=1)
        return F.relu(x - (mean + std * z))

    real_act, real_topk = G.ACT2FN, G.Gemma3nTextMLP._gaussian_topk

    class Table(dict):
        def __getitem__(self, k):
            return GgmlGelu() if k == "gelu_pytorch_tanh" else real_act[k]

    G.ACT2FN, G.Gemma3nTextMLP._gaussian_topk = Table(), topk
    try:
        yield
    finally:
        G.ACT2FN, G.Gemma3nTextMLP._gaussian_topk = real_act, real_topk


def quantize_like_plan(model, folder, qtype: str) -> int:
    """Every weight of ``model`` replaced by ``dequantize(quantize(W))`` in the type the converter's
    plan gives its GGUF tensor (the gguf package's reference quantizers; a stacked AltUp projection
    is quantized row by row, so per part). Returns how many were replaced."""
    import gguf

    from edgeinfer.quant.convert import plan_conversion

    types = {r.name: t.ggml_type for t in plan_conversion(folder, qtype, torch_only=True).tensors
             for r in t.source.refs}
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


def hf_model(folder, llama_cpp_numerics: bool = False, qtype: str | None = None):
    from transformers import AutoModelForCausalLM

    with hf_with_llama_cpp_numerics() if llama_cpp_numerics else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if qtype is not None:
            assert quantize_like_plan(model, folder, qtype) > 0
    return model


def hf_logits(folder, tokens=TOKENS, llama_cpp_numerics: bool = False, qtype: str | None = None) -> np.ndarray:
    """transformers' logits [len(tokens), vocab] float64 (options: see :func:`hf_model`)."""
    model = hf_model(folder, llama_cpp_numerics, qtype)
    with hf_with_llama_cpp_numerics() if llama_cpp_numerics else contextlib.nullcontext(), torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_logits(path, tokens=TOKENS) -> np.ndarray:
    """llama.cpp's logits for every position (F32 KV cache)."""
    return test_convert_parity.llama_logits(path, tokens)


def torch_logits(path, tokens=TOKENS, **kw) -> np.ndarray:
    from edgeinfer.engine.loader import load_model

    model, _ = load_model(path, torch.device("cpu"), 64, **kw)
    return model(torch.tensor([tokens]), 0)[0].double().numpy()


def llama_cpp_convert(folder: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` (the oracle; run, never imported or copied). Its
    source is the llama-cpp-python sdist's ``vendor/llama.cpp`` (``$EDGEINFER_LLAMA_CPP_SRC``)."""
    if not (LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter is not at {LLAMA_CPP_SRC} (set EDGEINFER_LLAMA_CPP_SRC)")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, str(LLAMA_CPP_SRC / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                        outtype.lower(), "--outfile", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def gguf_contents(path) -> tuple[dict, dict]:
    """(metadata without the GGUF header counts, {tensor: (GGUF shape, type name, raw bytes)})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}
    return kv, ts


@contextlib.contextmanager
def torch_engine_with_llama_cpp_numerics():
    """The torch engine's Gemma 3n with llama.cpp's gaussian top-k (unbiased std) and fp16 GELU."""
    import edgeinfer.models.gemma3n as GM
    import edgeinfer.models.ple as P

    def mlp(self, x):
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.ffn_gate(x), self.ffn_up(x))
        if self.z is not None:
            std, mean = torch.std_mean(gate.float(), dim=-1, keepdim=True, correction=1)
            gate = F.relu(gate - (mean + std * self.z))
        return self.ffn_down(ggml_gelu(gate) * up)

    real = GM.SparseMLP.forward, P.PerLayerGate.forward
    GM.SparseMLP.forward = mlp
    P.PerLayerGate.forward = lambda self, x, p: self.post_norm(self.proj(ggml_gelu(self.inp_gate(x)) * p))
    try:
        yield
    finally:
        GM.SparseMLP.forward, P.PerLayerGate.forward = real


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (the machine is shared)
    root = tmp_path_factory.mktemp("gemma3n")
    return {a: _tiny_models.make_tiny_checkpoint(a, root / a) for a in _tiny_models.GEMMA3N_ARCHS}


@pytest.fixture(scope="module")
def refs(ckpts):
    """Cached transformers logits on TOKENS: ``refs(arch, llama_cpp_numerics=False, qtype=None)``."""
    cache = {}

    def get(arch, llama_cpp_numerics=False, qtype=None):
        key = (arch, llama_cpp_numerics, qtype)
        if key not in cache:
            cache[key] = hf_logits(ckpts[arch], llama_cpp_numerics=llama_cpp_numerics, qtype=qtype)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def files(ckpts, tmp_path_factory):
    """(arch, qtype) -> our GGUF (gemma3n_small: --torch-only)."""
    from edgeinfer.quant.convert import convert

    root = tmp_path_factory.mktemp("gemma3n_gguf")
    out = {}
    for arch, qtypes in (("gemma3n", ("F32", "Q8_0")), ("gemma3n_small", ("F32", "Q8_0"))):
        for q in qtypes:
            out[arch, q] = convert(ckpts[arch], root / f"{arch}-{q}.gguf", q, torch_only=arch == "gemma3n_small")
    return out


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("qtype", ["F32", pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_file_matches_llama_cpp_converter(ckpts, files, tmp_path, qtype):
    ours = gguf_contents(files["gemma3n", qtype])
    theirs = gguf_contents(llama_cpp_convert(ckpts["gemma3n"], tmp_path / "lc.gguf", qtype))
    keys = {k for k in ours[0] if k.startswith("gemma3n.")}
    assert keys == {k for k in theirs[0] if k.startswith("gemma3n.")} and len(keys) == 19
    diff_keys = [k for k in keys if ours[0][k] != theirs[0][k]]
    assert set(ours[1]) == set(theirs[1]) and len(ours[1]) == 535
    layout = [n for n in ours[1] if ours[1][n][:2] != theirs[1][n][:2]]
    data = sorted(n for n in ours[1] if ours[1][n][2] != theirs[1][n][2])
    print(f"{qtype}: {len(keys)} gemma3n.* keys, {len(ours[1])} tensors; differing keys {diff_keys}, shapes/types "
          f"{layout}, bytes {data}")
    assert not diff_keys and not layout and data == ["per_layer_token_embd.weight"]
    # the only difference: rows past vocab_size_per_layer_input repeat row 0 (llama.cpp: zeros)
    import gguf

    rows = {}
    for name, path in (("ours", files["gemma3n", qtype]), ("theirs", tmp_path / "lc.gguf")):
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "per_layer_token_embd.weight")
        rows[name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(352, -1)
    n_ple = _tiny_models.TINY_VOCAB
    assert np.array_equal(rows["ours"][:n_ple], rows["theirs"][:n_ple])
    assert np.array_equal(rows["ours"][n_ple:], np.repeat(rows["ours"][:1], 352 - n_ple, 0))
    assert not rows["theirs"][n_ple:].any()


def test_ids_past_the_per_layer_table(ckpts, files):
    """Token ids >= vocab_size_per_layer_input (Gemma 3n's image/audio ids) read per-layer row 0 in
    transformers; both engines do the same on our file."""
    tokens = TOKENS[:8] + list(range(_tiny_models.TINY_VOCAB, 352, 4))
    path = files["gemma3n", "F32"]
    r_t = rel(hf_logits(ckpts["gemma3n"], tokens), torch_logits(path, tokens))
    r_l = rel(hf_logits(ckpts["gemma3n"], tokens, llama_cpp_numerics=True), llama_logits(path, tokens))
    print(f"ids past the per-layer table: torch engine vs transformers {r_t:.1e}, llama.cpp vs transformers "
          f"(llama.cpp numerics) {r_l:.1e}")
    assert r_t < 1e-4 and r_l < 2e-3


def test_config_llama_cpp_cannot_run_needs_torch_only(ckpts, files, tmp_path, capsys):
    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends import load_backend
    from edgeinfer.cli import main as cli
    from edgeinfer.errors import InvalidModelError
    from edgeinfer.gguf_check import validate_gguf

    out = tmp_path / "x.gguf"
    assert cli(["convert", str(ckpts["gemma3n_small"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    for why in ("4 layers with their own K/V", "altup_num_inputs=3", "altup_active_idx=1", "laurel_rank=32",
                "hidden_size_per_layer_input=32", "activation_sparsity_pattern", "FFN widths per layer",
                "final_logit_softcapping=25.0", "--torch-only"):
        assert why in err, why
    assert not out.exists()
    h = validate_gguf(files["gemma3n_small", "F32"])
    assert h.architecture == "edgeinfer-gemma3n" and "laurel_rank=32" in h.torch_only
    with pytest.raises(InvalidModelError, match="torch engine only.*--backend torch"):
        load_backend("llama.cpp", files["gemma3n_small", "F32"], LoadOptions(n_ctx=64))


def test_multimodal_checkpoint_gives_the_text_model(ckpts, files, tmp_path, caplog):
    """The text model of a Gemma3nForConditionalGeneration checkpoint (``model.language_model.*``)
    converts to the same tensors as the text-only checkpoint; the towers are skipped with a notice."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from edgeinfer.quant.convert import convert

    src, mm = ckpts["gemma3n"], tmp_path / "mm"
    shutil.copytree(src, mm)
    text_cfg = json.loads((src / "config.json").read_text())
    cfg = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
           "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"},
           "vision_config": {"model_type": "gemma3n_vision", "hidden_size": 32},
           "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 32}}
    (mm / "config.json").write_text(json.dumps(cfg))
    sd = {"model.language_model." + k[len("model."):]: v for k, v in load_file(src / "model.safetensors").items()}
    g = torch.Generator().manual_seed(3)
    for name in ("model.vision_tower.timm_model.conv_stem.conv.weight", "model.embed_vision.embedding.weight",
                 "model.audio_tower.subsample_conv_projection.input_proj_linear.weight",
                 "model.embed_audio.embedding_projection.weight"):
        sd[name] = torch.randn(32, 32, generator=g)
    save_file(sd, mm / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        path = convert(mm, tmp_path / "mm.gguf", "Q8_0")
    notice = [r.getMessage() for r in caplog.records if "text model only" in r.getMessage()]
    print(notice)
    assert len(notice) == 1 and "vision tower (2 tensors)" in notice[0] and "audio tower (2 tensors)" in notice[0]
    a, b = gguf_contents(path)[1], gguf_contents(files["gemma3n", "Q8_0"])[1]
    assert a == b


def test_shared_layers_without_kv_get_placeholders(ckpts, files, tmp_path):
    """A checkpoint as transformers 5 saves it (no K/V in the KV-shared layers): the converter writes
    zero / one placeholders llama.cpp requires, which neither engine reads -- the logits are
    bit-identical to those of the file with the released checkpoints' real (unused) tensors."""
    import shutil

    import gguf

    from edgeinfer.quant.convert import convert

    folder = _tiny_models.drop_shared_kv(Path(shutil.copytree(ckpts["gemma3n"], tmp_path / "ck")))
    path = convert(folder, tmp_path / "p.gguf", "F32")
    ts = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    for i in (20, 21):
        assert not ts[f"blk.{i}.attn_k.weight"].any() and not ts[f"blk.{i}.attn_v.weight"].any()
        assert (ts[f"blk.{i}.attn_k_norm.weight"] == 1).all()
    full = files["gemma3n", "F32"]
    assert np.array_equal(llama_logits(path), llama_logits(full))
    assert np.array_equal(torch_logits(path), torch_logits(full))


# --------------------------------------------------------------------------- logits


def test_torch_engine_matches_transformers(refs, files):
    lines, failures = [], []
    for arch in _tiny_models.GEMMA3N_ARCHS:
        r32 = rel(refs(arch), torch_logits(files[arch, "F32"]))
        oracle = refs(arch, qtype="Q8_0")
        import edgeinfer.kernels.qlinear as QL

        QL.FORCE_PATH = "dequant"
        try:
            got = torch_logits(files[arch, "Q8_0"])
        finally:
            QL.FORCE_PATH = None
        r8d = rel(oracle, got)
        fast = torch_logits(files[arch, "Q8_0"])
        r8, k8 = rel(oracle, fast), kl(oracle, fast)
        lines.append(f"{arch}: F32 vs transformers {r32:.1e} (tol 1e-4) | Q8_0 dequantize path vs transformers with "
                     f"the dequantized weights {r8d:.1e} (tol 1e-4) | Q8_0 fast path {r8:.2e} KL {k8:.1e} "
                     f"(tol 0.3 / 1e-2)")
        if not (r32 < 1e-4 and r8d < 1e-4 and r8 < 0.3 and k8 < 1e-2):
            failures.append(lines[-1])
    print("\n".join(lines))
    assert not failures, failures


def test_llama_cpp_matches_transformers(refs, files):
    lc32 = llama_logits(files["gemma3n", "F32"])
    r_emul, r_plain = rel(refs("gemma3n", llama_cpp_numerics=True), lc32), rel(refs("gemma3n"), lc32)
    lc8 = llama_logits(files["gemma3n", "Q8_0"])
    oracle = refs("gemma3n", llama_cpp_numerics=True, qtype="Q8_0")
    r8, k8 = rel(oracle, lc8), kl(oracle, lc8)
    print(f"llama.cpp F32 vs transformers with llama.cpp's std + fp16 GELU {r_emul:.1e} (tol 2e-3), vs plain "
          f"transformers {r_plain:.2e} (tol 0.2) | Q8_0 vs emulated transformers with the dequantized weights "
          f"{r8:.2e} KL {k8:.1e} (tol 0.4 / 2e-2)")
    assert r_emul < 2e-3 and r_plain < 0.2 and r8 < 0.4 and k8 < 2e-2


def test_greedy_text(ckpts, files):
    """Greedy decoding on the F32 file: the torch engine's tokens equal transformers'; llama.cpp's
    equal the torch engine's once llama.cpp's two numerics (unbiased std, fp16 GELU) are swapped in."""
    from edgeinfer.backend import LoadOptions, SamplingParams
    from edgeinfer.backends import load_backend

    path, params = files["gemma3n", "F32"], SamplingParams(temperature=0, max_tokens=20)

    def run(name):
        b = load_backend(name, path, LoadOptions(n_ctx=128, n_threads=1))
        try:
            prompt = b.tokenize("The quick brown fox")
            ev = list(b.generate("The quick brown fox", params))
            return prompt, [e.token_id for e in ev if e.kind == "token"], ev[-1].text
        finally:
            b.close()

    prompt, toks_lc, text_lc = run("llama.cpp")
    prompt_t, toks_t, text_t = run("torch")
    with torch_engine_with_llama_cpp_numerics():
        _, toks_tl, text_tl = run("torch")
    model = hf_model(ckpts["gemma3n"])
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt_t]), max_new_tokens=20, do_sample=False)[0, len(prompt_t):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(toks_lc, toks_t)) if a != b), len(toks_t))
    print(f"greedy: llama.cpp {text_lc!r}\n        torch     {text_t!r} (the first {same} tokens equal)\n"
          f"        torch with llama.cpp's std + GELU {text_tl!r}\n        transformers == torch: {hf == toks_t}")
    assert prompt == prompt_t and len(toks_t) == 20
    assert hf == toks_t and toks_tl == toks_lc and text_tl == text_lc


# --------------------------------------------------------------------------- engine structure


@pytest.mark.parametrize("arch", _tiny_models.GEMMA3N_ARCHS)
def test_kv_cache_past_the_window_and_shared_layers(files, arch):
    from edgeinfer.engine.loader import load_model

    model, _ = load_model(files[arch, "F32"], torch.device("cpu"), 32)
    a = model.args
    shared = {i: c.kv_from for i, c in enumerate(a.attn) if c.kv_from is not None}
    want = {20: 18, 21: 19} if arch == "gemma3n" else {4: 3, 5: 2}
    assert shared == want
    for i, src in shared.items():
        assert model.layers[i].attn.cache is model.layers[src].attn.cache and not hasattr(model.layers[i].attn, "attn_k")
    own = a.n_layer - len(shared)  # float32 K and V of the layers with their own cache
    assert model.cache_bytes_per_token() == own * 2 * a.n_kv_head * a.head_dim * 4
    assert all(layer.attn.cache.size == 4 for i, layer in enumerate(model.layers) if a.swa_layers[i])
    full = model(torch.tensor([TOKENS]), 0)[0]
    # 22 layers whose gaussian top-k amplifies float32 differences of other matmul shapes (as it
    # takes the F32 engine-vs-transformers difference to 1e-5): the floor is what one full pass over
    # the first 12 tokens differs from the 24-token pass, no cache involved (measured 2.8e-5)
    floor = float((model(torch.tensor([TOKENS[:12]]), 0)[0] - full[:12]).abs().max() / full.abs().max())
    tol, errs = (1e-4 if a.n_layer > 10 else 1e-5), {"floor: 12-token full pass": floor}
    for name, chunks in {"prefill 3 + steps": [3] + [1] * 21, "prefill 10 (> window) + steps": [10] + [1] * 14,
                         "chunks 5,7,1,6,5": [5, 7, 1, 6, 5]}.items():
        outs, pos = [], 0
        for n in chunks:
            outs.append(model(torch.tensor([TOKENS[pos:pos + n]]), pos)[0])
            pos += n
        err = float((torch.cat(outs) - full).abs().max() / full.abs().max())
        errs[name] = err
    print(f"{arch}: step / chunked decode vs one full pass, max rel diff {errs} (tol {tol:g})")
    assert max(errs.values()) < tol


def _mapping_of(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process (Linux ``/proc/self/maps``), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_per_layer_table_stays_in_the_memory_map(files):
    """The PLE table is a host-resident QuantEmbedding whose blocks are the file's memory map (not a
    copy; not counted as device weights): a forward pass reads only the rows of its tokens."""
    import gguf

    from edgeinfer.engine.loader import load_model
    from edgeinfer.kernels.qlinear import QuantEmbedding

    path = files["gemma3n", "Q8_0"]
    model, _ = load_model(path, torch.device("cpu"), 32)
    emb = model.ple.per_layer_token_embd
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "per_layer_token_embd.weight")
    where = _mapping_of(emb.raw.data_ptr())
    print(f"per_layer_token_embd: {emb} ({t.n_bytes} bytes of a {os.path.getsize(path)}-byte file) mapped "
          f"from {where}")
    assert isinstance(emb, QuantEmbedding) and emb.host and emb.nbytes() == 0
    assert emb.raw.dtype == torch.uint8 and emb.raw.numel() == t.n_bytes
    assert where is not None and Path(where).resolve() == Path(path).resolve()
    model(torch.tensor([TOKENS[:4]]), 0)  # gathers 4 rows


def test_cpu_moe_leaves_the_altup_stacks_alone(files, monkeypatch):
    """``--cpu-moe`` keeps MoE experts in host memory; Gemma 3n has none: its 3-D AltUp stacks (built
    like experts) stay where they are and the logits do not change."""
    import edgeinfer.engine.loader as L
    from edgeinfer.kernels.expert_offload import OffloadedExpertLinear

    path = files["gemma3n", "Q8_0"]
    plain = torch_logits(path)
    monkeypatch.setattr(L, "OFFLOAD_ON_CPU", True)  # run the offload logic on this CPU-only machine
    model, report = L.load_model(path, torch.device("cpu"), 64, offload_layers=22)
    assert not any(isinstance(m, OffloadedExpertLinear) for m in model.modules()) and report.offloaded_bytes == 0
    assert np.array_equal(model(torch.tensor([TOKENS]), 0)[0].double().numpy(), plain)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q6_K"])
def test_k_quant_mix_matches_llama_quantize(ckpts, tmp_path, recipe):
    """A llama.cpp mix converted directly = llama-quantize on llama.cpp's own F32 conversion (same
    per-tensor types: altup / laurel / per_layer_model_proj never quantized; same bytes), except the
    padded per-layer rows; and both engines load it."""
    import _llama_quant

    from edgeinfer.quant.convert import convert

    ref = _llama_quant.llama_quantize(llama_cpp_convert(ckpts["gemma3n"], tmp_path / "lc.gguf", "F32"),
                                      tmp_path / "lq.gguf", recipe)
    ours = convert(ckpts["gemma3n"], tmp_path / "ours.gguf", recipe)
    a, b = gguf_contents(ours)[1], gguf_contents(ref)[1]
    layout = [n for n in a if a[n][:2] != b.get(n, (None, None))[:2]]
    data = [n for n in a if a[n][2] != b[n][2]]
    types = sorted({v[1] for v in a.values()})
    print(f"{recipe}: {len(a)} tensors, types {types}; different layout {layout}, bytes {data}")
    assert set(a) == set(b) and not layout and data == ["per_layer_token_embd.weight"]
    assert llama_logits(ours).shape == torch_logits(ours).shape == (len(TOKENS), 352)


def test_config_defaults_and_older_keys(ckpts, tmp_path):
    """Config fields left out take transformers' defaults (layer types, sparsity pattern), older keys
    (``rope_theta`` / ``rope_local_base_freq``, one ``intermediate_size``) are read, and a config the
    gemma3n GGUF cannot express is refused naming the key. Planning only (no tensor is read)."""
    import json
    import shutil

    from transformers import AutoConfig

    from edgeinfer.errors import ConversionError
    from edgeinfer.quant.convert import plan_conversion

    folder = Path(shutil.copytree(ckpts["gemma3n"], tmp_path / "ck"))
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("layer_types", "activation_sparsity_pattern", "rope_parameters"):
        del cfg[k]
    cfg.update(intermediate_size=128, rope_theta=500000.0, rope_local_base_freq=20000.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = AutoConfig.from_pretrained(folder)
    hp = {k.split(".", 1)[1]: v.value for k, v in plan_conversion(folder, "F32").hparams.items()}
    print({k: hp[k] for k in ("feed_forward_length", "rope.freq_base", "rope.freq_base_swa")},
          "layer types as transformers:", hp["attention.sliding_window_pattern"] ==
          [t == "sliding_attention" for t in hf.layer_types])
    assert hp["attention.sliding_window_pattern"] == [t == "sliding_attention" for t in hf.layer_types]
    z = [float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p))) for p in hf.activation_sparsity_pattern]
    assert hp["activation_sparsity_scale"] == pytest.approx(z) and hp["feed_forward_length"] == 128
    assert (hp["rope.freq_base"], hp["rope.freq_base_swa"]) == (500000.0, 20000.0)
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_activation": "gelu"}))
    with pytest.raises(ConversionError, match="hidden_activation='gelu'"):
        plan_conversion(folder, "F32")


def test_altup_correct_scale_off(tmp_path):
    """``altup_correct_scale=false``: transformers skips the scale (the checkpoint still has one), the
    file holds ones in its place, so both engines (llama.cpp always multiplies) compute the same."""
    import gguf

    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("gemma3n_small", tmp_path / "ck", altup_correct_scale=False)
    path = convert(folder, tmp_path / "s.gguf", "F32", torch_only=True)
    scales = [np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith("altup_correct_scale.weight")]
    r = rel(hf_logits(folder), torch_logits(path))
    print(f"altup_correct_scale=false: {len(scales)} scales written as ones; torch engine vs transformers {r:.1e}")
    assert len(scales) == 6 and all((s == 1).all() for s in scales) and r < 1e-4
