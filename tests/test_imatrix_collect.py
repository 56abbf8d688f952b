"""`edgeinfer imatrix`: activation statistics from the torch engine vs transformers' (the oracle)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeinfer.backend import LoadOptions
from edgeinfer.corpus import load_text
from edgeinfer.evaluate import chunks
from edgeinfer.imatrix_collect import collect_imatrix
from edgeinfer.quant.imatrix import load_imatrix, save_imatrix

HF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def torch_default(default_gguf):
    from edgeinfer.backends.torch_engine import TorchBackend

    b = TorchBackend(default_gguf, LoadOptions(n_ctx=256, n_threads=1))
    yield b
    b.close()


def test_imatrix_matches_transformers_activations(torch_default, hf_default_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    text = load_text("@stdlib-calib")[:4000]
    im = collect_imatrix(torch_default, text, n_ctx=128, max_chunks=2, dataset="test")
    assert im.chunk_count == 2 and len(im.entries) == 30 * 7
    # oracle: the same chunks through transformers (float32, the same dequantized weights)
    hf = AutoModelForCausalLM.from_pretrained(hf_default_checkpoint, torch_dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in hf.model.layers.named_modules():
        for suffix, short in HF_NAMES.items():
            if name.endswith(suffix):
                key = f"blk.{name.split('.')[0]}.{short}.weight"

                def hook(_m, args, key=key):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[key] = sums.get(key, 0) + (x * x).sum(0).numpy()

                hooks.append(mod.register_forward_pre_hook(hook))
    toks = torch_default.tokenize(text, add_special=False)
    bos = int(torch_default.header.metadata.get("tokenizer.ggml.bos_token_id"))
    add_bos = bool(torch_default.header.metadata.get("tokenizer.ggml.add_bos_token", False))
    with torch.no_grad():
        for ch in chunks(toks, 128, add_bos, bos, 2):
            hf(torch.tensor([ch]))
    for h in hooks:
        h.remove()
    rels = {}
    for key, ref in sums.items():
        e = im.entries[key]
        assert e.counts.tolist() == [256]
        rels[key] = float(np.abs(e.sums[0] - ref).max() / np.abs(ref).max())
    worst, med = max(rels.values()), float(np.median(list(rels.values())))
    print(f"imatrix vs transformers: {len(sums)} matrices, max-abs-rel error worst {worst:.2e} "
          f"({max(rels, key=rels.get)}), median {med:.2e}")
    # the engine's CPU kernels quantize activations to 8 bits per 32 values, as llama.cpp's do (the
    # imatrix llama.cpp collects is of such a run too), and the roundings compound over 30 layers:
    # measured median 1.5e-3, worst 5.5e-2 (blk.19.ffn_down: squared outlier activations)
    assert worst < 0.1 and med < 5e-3
    # file round trip, both formats
    for suffix in (".gguf", ".dat"):
        p = save_imatrix(im, tmp_path / f"im{suffix}")
        back = load_imatrix(p)
        for key in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
            np.testing.assert_allclose(back.weights(key), im.weights(key), rtol=1e-6)


def test_imatrix_cli(tmp_path, cli_env):
    out = tmp_path / "im.gguf"
    args = [sys.executable, "-m", "edgeinfer", "imatrix", "default", "-o", str(out), "--ctx", "64", "--chunks", "1",
            "--threads", "1"]
    r = subprocess.run(args, capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 0, r.stderr
    im = load_imatrix(out)
    assert len(im.entries) == 210 and im.chunk_count == 1
    r = subprocess.run(args, capture_output=True, text=True, env=cli_env, timeout=300)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_moe_imatrix_per_expert_matches_transformers(tmp_path):
    """Stacked expert weights get one slice and one count per expert (llama-imatrix's MUL_MAT_ID
    layout): the sums of x^2 over the tokens routed to each expert, against transformers' experts
    module (its router's choice, its weights); and the converter uses the slices for K-quants."""
    import _tiny_models
    from transformers import AutoModelForCausalLM

    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.quant.convert import convert, plan_conversion

    folder = _tiny_models.make_tiny_checkpoint("qwen3_moe", tmp_path / "ck")
    path = convert(folder, tmp_path / "moe-F32.gguf", "F32")
    b = TorchBackend(path, LoadOptions(n_ctx=64, n_threads=1))
    text = load_text("@stdlib-calib")[:3000]
    try:
        im = collect_imatrix(b, text, n_ctx=32, max_chunks=2)
        toks = b.tokenize(text, add_special=False)
        bos = int(b.header.metadata.get("tokenizer.ggml.bos_token_id", -1))
        add_bos = bool(b.header.metadata.get("tokenizer.ggml.add_bos_token", False))
        todo = list(chunks(toks, 32, add_bos and bos >= 0, bos, 2))
    finally:
        b.close()
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ref: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        ex = layer.mlp.experts
        n_e, inter = ex.num_experts, ex.intermediate_dim

        def hook(mod, args, i=i, n_e=n_e, inter=inter):
            x, idx = args[0].double(), args[1]
            for stem, dim in (("ffn_gate_exps", x.shape[-1]), ("ffn_up_exps", x.shape[-1]), ("ffn_down_exps", inter)):
                ref.setdefault(f"blk.{i}.{stem}.weight", (np.zeros((n_e, dim)), np.zeros(n_e, np.int64)))
            for e in range(n_e):
                rows = (idx == e).any(-1)
                xe = x[rows]
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e].double()).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                for stem, v in (("ffn_gate_exps", xe), ("ffn_up_exps", xe), ("ffn_down_exps", h)):
                    s, c = ref[f"blk.{i}.{stem}.weight"]
                    s[e] += (v * v).sum(0).numpy()
                    c[e] += int(rows.sum())

        hooks.append(ex.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ch in todo:
            hf(torch.tensor([ch]))
    for h in hooks:
        h.remove()
    worst = 0.0
    for key, (sums, counts) in ref.items():
        e = im.entries[key]
        assert e.counts.tolist() == counts.tolist(), key
        worst = max(worst, float(np.abs(e.sums - sums).max() / np.abs(sums).max()))
    n_exp = hf.config.num_experts
    print(f"MoE imatrix vs transformers: {len(ref)} stacked matrices x {n_exp} experts, tokens per expert "
          f"{ref['blk.0.ffn_up_exps.weight'][1].tolist()} (layer 0), worst max-abs-rel error {worst:.2e}")
    assert len(ref) == 3 * hf.config.num_hidden_layers and worst < 1e-4  # F32 file: float32 rounding only
    # the converter gives every expert its own slice (n_expert x cols values)
    p = save_imatrix(im, tmp_path / "im.gguf")
    plan = plan_conversion(folder, "Q4_K_M", imatrix=p)
    exps = [t for t in plan.tensors if "_exps" in t.gguf_name]
    from edgeinfer.quant.quantizers import uses_imatrix

    print("expert tensors at Q4_K_M:", [(t.gguf_name, t.ggml_type.name, t.imatrix_note) for t in exps])
    weighted = [t for t in exps if uses_imatrix(t.ggml_type)]
    assert weighted and all(t.imatrix_note == "used" and t.importance.size == t.shape[0] * t.shape[-1]
                            for t in weighted)
