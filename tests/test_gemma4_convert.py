"""Gemma 4 conversion (issue 12): tiny random checkpoints -> GGUF, against llama.cpp's converter,
llama.cpp's quantizer and transformers.

Variants (``tests/_tiny_models.py``, sliding window 4 < the 24 test tokens): ``gemma4_e2b`` (PLE,
3 KV-shared layers, double-wide MLP), ``gemma4_moe`` (MoE beside the dense MLP, attention_k_eq_v,
1 vs 2 KV heads), ``gemma4_dense`` (irregular layer pattern, half the global head rotated), each as
``Gemma4ForCausalLM`` and, ``*_mm``, as ``Gemma4ForConditionalGeneration`` (text only, or with
vision and audio towers that must be skipped).

Tolerances, llama.cpp (F32 KV cache) vs transformers on the same 24 tokens (relative L2 error of the
logits; measured values in brackets):

* F32 file vs transformers with ggml's fp16 GELU table emulated (``_gemma4.ggml_gelu``): rel < 5e-3
  [4e-4 .. 1.8e-3] -- float32 summation order in 6-8 layers with large random activations;
* F32 file vs plain transformers: rel < 3e-2 [6e-3 .. 1.3e-2] -- ggml's GELU rounds its input and
  output to fp16 (relative 2^-11 each), in every MLP and the PLE gate; top-1 equal at every position;
* F32: top-1 equal at every position but near-ties (margin below twice the largest logit difference);
* Q8_0 file vs transformers whose weights went through the same quantize -> dequantize round trip
  (gguf package reference quantizers, the plan's type per tensor), GELU as ggml: rel < 0.1, KL < 2e-3
  [rel 4e-2 .. 5e-2] -- what is left is llama.cpp's 8-bit quantization of activations in quantized
  matmuls (~0.4 % per value, as in test_convert_parity.py), amplified ~10x by these random models; a
  wrong block layout, scale or expert order gives rel ~1. Against the float model the quantized
  weights themselves move the logits (in the MoE model they flip some routing decisions, also in
  transformers): rel < (oracle vs float) + 0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import _gemma4
import _tiny_models
from edgeinfer.cli import main as cli

VARIANTS = {"gemma4_e2b": {}, "gemma4_moe": {}, "gemma4_dense": {},
            "gemma4_moe_mm": {"multimodal": True}, "gemma4_dense_towers": {"multimodal": "towers"}}


def _arch(name: str) -> str:
    return name.removesuffix("_mm").removesuffix("_towers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> checkpoint folder, built on first use."""
    root = tmp_path_factory.mktemp("gemma4")
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = _tiny_models.make_tiny_checkpoint(_arch(name), root / name, **VARIANTS[name])
        return made[name]

    return get


def convert(folder, out, qtype):
    from edgeinfer.quant.convert import convert as _convert

    return _convert(folder, out, qtype, force=True)


# --------------------------------------------------------------------------- same file as llama.cpp's converter

needs_llama_cpp_src = pytest.mark.skipif(not (_gemma4.LLAMA_CPP_SRC / "convert_hf_to_gguf.py").is_file(),
                                         reason=f"llama.cpp's converter not found at {_gemma4.LLAMA_CPP_SRC} "
                                                f"(set EDGEINFER_LLAMA_CPP_SRC)")
ORACLE_CASES = [("gemma4_e2b", "F32"), ("gemma4_moe_mm", "Q8_0"),
                pytest.param("gemma4_moe", "F32", marks=pytest.mark.slow),
                pytest.param("gemma4_dense", "F32", marks=pytest.mark.slow),
                pytest.param("gemma4_e2b", "Q8_0", marks=pytest.mark.slow),
                pytest.param("gemma4_dense", "BF16", marks=pytest.mark.slow),
                pytest.param("gemma4_dense_towers", "Q8_0", marks=pytest.mark.slow)]


@needs_llama_cpp_src
@pytest.mark.parametrize("name,qtype", ORACLE_CASES)
def test_same_file_as_llama_cpp_converter(ckpt, tmp_path, name, qtype):
    """Every metadata key and value (tokenizer included), tensor name, shape, type and byte equals what
    llama.cpp's convert_hf_to_gguf.py writes for the same checkpoint (names from the folder aside)."""
    folder = ckpt(name)
    ours = _gemma4.gguf_contents(convert(folder, tmp_path / "ours.gguf", qtype))
    ref = _gemma4.gguf_contents(_gemma4.llama_cpp_convert(folder, tmp_path / "ref.gguf", qtype))
    naming = {"general.name", "general.basename", "general.size_label", "general.finetune"}
    keys = sorted((set(ours[0]) | set(ref[0])) - naming)
    kv_diff = [k for k in keys if ours[0].get(k, "<missing>") != ref[0].get(k, "<missing>")]
    t_diff = sorted(n for n in set(ours[1]) | set(ref[1]) if ours[1].get(n, ())[:2] != ref[1].get(n, ())[:2])
    b_diff = sorted(n for n in ref[1] if n in ours[1] and ours[1][n] != ref[1][n])
    print(f"{name} {qtype}: {len(keys)} keys, {len(ref[1])} tensors; differing keys {kv_diff}, "
          f"tensors (name/shape/type) {t_diff}, bytes {b_diff}")
    assert not kv_diff and not t_diff and not b_diff


# --------------------------------------------------------------------------- llama.cpp runs them like transformers


@pytest.mark.parametrize("name", ["gemma4_e2b", "gemma4_moe", "gemma4_dense", "gemma4_moe_mm"])
def test_llama_cpp_logits_match_transformers(ckpt, tmp_path, name):
    folder = ckpt(name)
    ref = _gemma4.hf_logits(folder)
    ref_ggml = _gemma4.hf_logits(folder, ggml=True)
    failures, lines = [], []
    for qtype in ("F32", "Q8_0"):
        got = _gemma4.llama_logits(convert(folder, tmp_path / f"{qtype}.gguf", qtype))
        r, k = _gemma4.rel(ref, got), _gemma4.kl(ref, got)
        if qtype == "F32":
            rg, top1 = _gemma4.rel(ref_ggml, got), _gemma4.top1_disagreements(ref, got)
            ok = rg < 5e-3 and r < 3e-2 and not top1
            lines.append(f"{name} F32: vs transformers rel={r:.2e} (tol 3e-2) KL={k:.1e}, top-1 disagreements "
                         f"(not near-ties) {top1}; vs transformers with ggml's fp16 GELU rel={rg:.2e} (tol 5e-3)")
        else:
            oracle = _gemma4.hf_logits(folder, ggml=True, qtype=qtype)
            ro, ko, floor = _gemma4.rel(oracle, got), _gemma4.kl(oracle, got), _gemma4.rel(ref_ggml, oracle)
            ok = ro < 0.1 and ko < 2e-3 and r < floor + 0.1
            lines.append(f"{name} Q8_0: vs dequantized oracle rel={ro:.2e} (tol 0.1) KL={ko:.1e} (tol 2e-3); "
                         f"vs float rel={r:.2e} (tol: the oracle's own {floor:.2e} + 0.1) KL={k:.1e}")
        if not ok:
            failures.append(lines[-1])
    print("\n".join(lines))
    assert not failures, failures


def test_tokenizer_is_llama_cpps_gemma4_and_tokenizes_like_transformers(ckpt, tmp_path):
    """tokenizer.ggml.model=gemma4; llama.cpp splits text (control tokens included) exactly like the
    HF tokenizer; the thinking-channel markers are rendered as text (user-defined tokens)."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    folder = ckpt("gemma4_e2b")
    path = convert(folder, tmp_path / "t.gguf", "Q8_0")
    md = _gemma4.gguf_contents(path)[0]
    assert md["tokenizer.ggml.model"] == "gemma4" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.chat_template"] == _tiny_models.GEMMA4_CHAT_TEMPLATE
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = Llama(str(path), vocab_only=True, verbose=False)
    texts = ["The quick brown fox", "café naïve 123 4567", "def add(a, b):\n    return a+b\n\n\nx", "emoji 🚀 zürich",
             "<|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\nhmm<channel|>ok<turn|>"]
    for text in texts:
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        ref = hf.encode(text, add_special_tokens=False).ids
        print(ours == ref, len(ref), repr(text[:40]))
        assert ours == ref
    shown = llm.detokenize(llm.tokenize(texts[-1].encode(), add_bos=False, special=True)).decode()
    print("detokenized without special=True:", repr(shown))
    assert "<|channel>thought\nhmm<channel|>ok" in shown and "<turn|>" not in shown  # control stays hidden


# --------------------------------------------------------------------------- what llama.cpp cannot express


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    for k, v in changes.items():
        if v is None:
            tc.pop(k, None)
        else:
            tc[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


S, F = "sliding_attention", "full_attention"
REFUSED = {  # (KV-sharing layouts llama.cpp's reuse rule gets wrong: tests/test_gemma4_engine.py, --torch-only)
    "bidirectional": ("gemma4_dense", {"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    "activation": ("gemma4_dense", {"hidden_activation": "silu"}, "hidden_activation"),
    "sliding rope": ("gemma4_dense", {"rope_parameters": {S: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                                          F: {"rope_type": "default", "rope_theta": 1e6}}},
                     "sliding-layer RoPE"),
    "per-layer head dim": ("gemma4_dense", {"per_layer_config": {"1": {"head_dim": 64}, "2": {"head_dim": 32}}},
                           "per_layer_config[2]"),
    "ple rows": ("gemma4_e2b", {"vocab_size_per_layer_input": 300}, "vocab_size_per_layer_input=300"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inexpressible_configs_refused_at_plan_time(ckpt, tmp_path, capsys, case):
    """One line, exit code 2, nothing written -- also for --dry-run (refused at plan time)."""
    arch, changes, needle = REFUSED[case]
    folder = shutil.copytree(ckpt(arch), tmp_path / "ck")
    _edit_config(folder, **changes)
    capsys.readouterr()  # building the checkpoint printed progress
    for extra in (["--dry-run"], []):
        rc = cli(["convert", str(folder), "-o", str(tmp_path / "x.gguf"), *extra])
        err = capsys.readouterr().err.strip()
        print(f"{case}: rc={rc} {err}")
        assert rc == 2 and err.startswith("edgeinfer: error:") and "\n" not in err and needle in err
        assert "llama.cpp" in err and not (tmp_path / "x.gguf").exists()


def test_multimodal_towers_skipped_with_a_notice(ckpt, tmp_path, caplog):
    folder = ckpt("gemma4_dense_towers")
    with caplog.at_level("WARNING"):
        assert cli(["convert", str(folder), "-o", str(tmp_path / "t.gguf"), "--qtype", "F32"]) == 0
    notice = [r.getMessage() for r in caplog.records if "text model only" in r.getMessage()]
    print(notice)
    assert len(notice) == 1 and "vision tower" in notice[0] and "audio tower" in notice[0]
    names = set(_gemma4.gguf_contents(tmp_path / "t.gguf")[1])
    text_only = set(_gemma4.gguf_contents(convert(ckpt("gemma4_dense"), tmp_path / "d.gguf", "F32"))[1])
    assert names == text_only


# --------------------------------------------------------------------------- types: llama.cpp's recipes


@pytest.fixture(scope="module")
def wide_moe_ple(tmp_path_factory):
    """MoE + PLE with 256-multiple rows, so the K-quant recipes pick K types rather than fallbacks."""
    return _tiny_models.make_tiny_checkpoint(
        "gemma4_moe", tmp_path_factory.mktemp("wide") / "g", hidden_size=256, intermediate_size=256,
        moe_intermediate_size=256, num_experts=8, hidden_size_per_layer_input=128,
        layer_types=[S, S, F, S, S, F])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M", *(pytest.param(q, marks=pytest.mark.slow)
                                                  for q in ("Q5_1", "Q2_K", "Q3_K_M", "Q5_K_S", "Q6_K"))])
def test_types_and_bytes_equal_llama_quantize(wide_moe_ple, tmp_path, qtype):
    """Our direct conversion = llama_model_quantize(our F32 file): same type for every tensor (PLE table
    in the tied token_embd category, per_layer_model_proj and the router kept F32, 3-D experts by the
    ffn_gate/ffn_down rules with their layer from the name, 8-expert attn_v/attn_k bumps) and same bytes."""
    import _llama_quant

    f32 = convert(wide_moe_ple, tmp_path / "f32.gguf", "F32")
    ref = _llama_quant.read_tensors(_llama_quant.llama_quantize(f32, tmp_path / "ref.gguf", qtype))
    ours = _llama_quant.read_tensors(convert(wide_moe_ple, tmp_path / "ours.gguf", qtype))
    types = {n: ours[n][0].name for n in ("per_layer_token_embd.weight", "per_layer_model_proj.weight",
                                          "blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_up_exps.weight",
                                          "blk.0.ffn_down_exps.weight", "blk.0.attn_v.weight")}
    print(qtype, types)
    assert _llama_quant.files_agree(ours, ref, f"gemma4 MoE+PLE {qtype}")


def test_dry_run_shows_ple_router_and_expert_types(wide_moe_ple, capsys):
    assert cli(["convert", str(wide_moe_ple), "--qtype", "Q4_K_M", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 4}
    for name in ("per_layer_token_embd.weight", "per_layer_model_proj.weight", "blk.0.ffn_gate_inp.weight",
                 "blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.weight", "blk.5.ffn_down_exps.weight",
                 "blk.0.ffn_down_exps.scale"):
        print(" ".join(rows[name].split()))
    assert "Q6_K" in rows["per_layer_token_embd.weight"] and "tied embedding" in rows["per_layer_token_embd.weight"]
    assert "F32" in rows["per_layer_model_proj.weight"] and "F32" in rows["blk.0.ffn_gate_inp.weight"]
    assert "Q4_K" in rows["blk.0.ffn_gate_up_exps.weight"] and "8x512x256" in rows["blk.0.ffn_gate_up_exps.weight"]
    # the ffn_down rule with the layer taken from the name: Q6_K on use_more_bits layers (5 of 6), not on 0
    assert "Q4_K" in rows["blk.0.ffn_down_exps.weight"] and "Q6_K" in rows["blk.5.ffn_down_exps.weight"]


# --------------------------------------------------------------------------- bounded memory


CONVERT_RSS = r"""
import sys
from edgeinfer.quant.convert import plan_conversion, write_gguf

def status(key):  # kB -> bytes; VmHWM is this process's own peak (ru_maxrss would include pytest's, from fork)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

plan = plan_conversion(sys.argv[1], "Q8_0")
big = max(plan.tensors, key=lambda t: t.n_elements)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
write_gguf(plan, sys.argv[2], progress=False, n_threads=2)
print(base, status("VmHWM"), big.n_elements * 4, big.gguf_name)
"""


@pytest.mark.slow
def test_moe_conversion_streams_experts(tmp_path):
    """Peak RSS of converting a MoE checkpoint whose largest tensors are the fused 3-D experts
    (96 experts x 1024 x 512, 192 MiB in float32 each): the conversion adds far less than one such
    tensor to the process (the experts stream a chunk of rows at a time; never a layer's experts at
    once), well within the conversion issue's bound (3 x largest tensor f32 + 0.5 GiB)."""
    import torch

    folder = _tiny_models.make_tiny_checkpoint("gemma4_moe", tmp_path / "moe", dtype=torch.bfloat16, hidden_size=512,
                                               intermediate_size=256, moe_intermediate_size=512, num_experts=96,
                                               num_hidden_layers=2, layer_types=[S, F])
    r = subprocess.run([sys.executable, "-c", CONVERT_RSS, str(folder), str(tmp_path / "m.gguf")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    base, peak, big, name = r.stdout.split()
    base, peak, big = int(base), int(peak), int(big)
    extra = peak - base
    print(f"largest tensor {name}: {big / 2**20:.0f} MiB f32; RSS after planning {base / 2**20:.0f} MiB, "
          f"peak while writing {peak / 2**20:.0f} MiB: +{extra / 2**20:.1f} MiB (bound 0.25 x the expert "
          f"tensor = {big / 4 / 2**20:.0f} MiB; issue bound 3 x largest + 0.5 GiB = {(3 * big + 2**29) / 2**20:.0f} MiB)")
    assert name.endswith("ffn_gate_up_exps.weight")
    assert extra < big / 4 and peak < 3 * big + 2**29


# --------------------------------------------------------------------------- edgeinfer inspect


def test_inspect_shows_experts_active_parameters_and_ple(ckpt, tmp_path, capsys):
    """From the GGUF keys and tensor names only, so any MoE / PLE architecture gets it (Mixtral too)."""
    from edgeinfer.inspect_gguf import summarize

    moe = summarize(convert(ckpt("gemma4_moe"), tmp_path / "moe.gguf", "Q8_0"))
    e = moe["experts"]
    # 6 layers x 6 experts x (gate_up 64x64 + down 64x32), 2 of 6 run per token
    expert_params = 6 * 6 * (64 * 64 + 64 * 32)
    print("gemma4 MoE:", e, moe["active_parameters"], "of", moe["parameters"])
    assert e == {"experts": 6, "active": 2, "shared": 1, "layers": 6, "expert_parameters": expert_params}
    assert moe["active_parameters"] == moe["parameters"] - expert_params * 4 // 6
    assert moe["per_layer_embeddings"] is None and moe["active_bytes"] < moe["tensor_bytes"]

    e2b = summarize(convert(ckpt("gemma4_e2b"), tmp_path / "e2b.gguf", "Q8_0"))
    p = e2b["per_layer_embeddings"]
    print("gemma4 E2B PLE:", p)
    assert p["parameters"] == 384 * 8 * 32 and p["type"] == "Q8_0"
    assert p["file_share"] == round(p["bytes"] / (tmp_path / "e2b.gguf").stat().st_size, 4)
    assert e2b["experts"] is None and e2b["active_parameters"] == e2b["parameters"] - 383 * 8 * 32

    mixtral = summarize(convert(_tiny_models.make_tiny_checkpoint("mixtral", tmp_path / "mx"), tmp_path / "mx.gguf", "F32"))
    print("mixtral:", mixtral["experts"])
    assert mixtral["experts"]["experts"] == 4 and mixtral["experts"]["active"] == 2 and mixtral["experts"]["shared"] == 0
    assert cli(["inspect", str(tmp_path / "moe.gguf")]) == 0 and cli(["inspect", str(tmp_path / "e2b.gguf")]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "6 per MoE layer (6 layers), 2 active per token, 1 shared" in text
    assert "per-layer embeddings:" in text and "% of the file" in text and "active parameters of" in text
    assert "KV cache:      896 B per token at F16, in 5 layers (3 more reuse earlier layers')" in text
    assert "3 sliding-window layers (384 B of it) keep at most 4 tokens" in text


def test_hub_config_form_gives_the_same_file(ckpt, tmp_path):
    """Hub configs name the global head size and KV heads (``global_head_dim``,
    ``num_global_key_value_heads``); save_pretrained writes ``per_layer_config`` instead. Same file."""
    folder = shutil.copytree(ckpt("gemma4_dense"), tmp_path / "hub")
    cfg = json.loads((folder / "config.json").read_text())
    print("save_pretrained's per_layer_config:", cfg["per_layer_config"])
    _edit_config(folder, per_layer_config=None, global_head_dim=64, num_global_key_value_heads=1)
    a = _gemma4.gguf_contents(convert(ckpt("gemma4_dense"), tmp_path / "a.gguf", "Q8_0"))
    b = _gemma4.gguf_contents(convert(folder, tmp_path / "b.gguf", "Q8_0"))
    a[0].pop("general.name"), b[0].pop("general.name")
    assert a == b
