"""Row sources (quant/rows.py) and spec-level checks: stacking experts, splitting fused projections.

The oracle for every streamed tensor is the same data assembled in memory (``torch.stack`` /
slicing) and encoded in one call by the registered encoder: the streamed, chunked path must give
the same bytes. A checkpoint with per-expert tensors and one with a fused 3-D ``gate_up`` are
converted end to end through a test-only spec (the MoE architectures themselves have their own
specs and tests).
"""

from __future__ import annotations

import json
import tracemalloc

import gguf
import numpy as np
import pytest
import torch

import _tiny_models
from edgeinfer.quant.quantizers import quantize
from edgeinfer.quant.rows import Constant, Generated, Map, Pad, Permute, Rows, Stack, Tensor
from edgeinfer.quant.source import read_safetensors_header
from edgeinfer.quant.spec import ArchSpec, Out, TensorSet, split_stacked

M = gguf.MODEL_TENSOR
T = gguf.GGMLQuantizationType
E, I, H = 4, 64, 256  # experts, expert FFN width, hidden


def _save(path, tensors: dict, dtype=torch.float32):
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return read_safetensors_header(path)


def _encode(src, qtype):
    from edgeinfer.quant.convert import encode_chunks

    return np.concatenate([c.reshape(-1) for c in encode_chunks(src, qtype, n_threads=2)])


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_and_split_equal_in_memory(tmp_path, qtype, dtype):
    g = torch.Generator().manual_seed(0)
    per_expert = [torch.randn(I, H, generator=g) for _ in range(E)]
    fused = torch.randn(E, 2 * I, H, generator=g)
    refs = _save(tmp_path / "m.safetensors", {**{f"e.{e}": w for e, w in enumerate(per_expert)}, "fused": fused}, dtype)
    as_read = lambda x: x.to(dtype).float()  # noqa: E731 - the values the file holds
    stacked = Stack([Tensor(refs[f"e.{e}"]) for e in range(E)])
    gate, up = split_stacked(Tensor(refs["fused"]), [I, I])
    cases = {
        "stack of per-expert tensors": (stacked, torch.stack([as_read(w) for w in per_expert])),
        "fused gate half": (gate, as_read(fused)[:, :I]),
        "fused up half": (up, as_read(fused)[:, I:]),
        "one expert of a 3-D tensor": (Tensor(refs["fused"], index=2), as_read(fused)[2]),
    }
    for what, (src, ref) in cases.items():
        assert src.shape == tuple(ref.shape), what
        got = _encode(src, qtype)
        want = quantize(ref.reshape(-1, ref.shape[-1]), qtype).reshape(-1)
        print(f"{qtype.name} {str(dtype)[6:]:8s} {what}: {got.nbytes} bytes, identical={np.array_equal(got, want)}")
        assert np.array_equal(got, want), what


def test_permute_map_rows_generated(tmp_path):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    refs = _save(tmp_path / "m.safetensors", {"w": w, "b": b})
    perm = np.random.default_rng(0).permutation(96)
    cases = {
        "rows permuted": (Permute(Tensor(refs["w"]), perm), w[perm]),
        "1-D permuted": (Permute(Tensor(refs["b"]), perm), b[perm]),
        "mapped": (Map(Tensor(refs["w"]), lambda x: x * 0.5 + 1.0), w * 0.5 + 1.0),
        "row slice": (Rows(Tensor(refs["w"]), 10, 70), w[10:70]),
        "generated": (Generated(b * 2), b * 2),
        "padded with row 3": (Pad(Tensor(refs["w"]), 130, fill_row=3), torch.cat([w, w[3:4].expand(34, 64)])),
        "padded with zeros": (Pad(Tensor(refs["w"]), 100), torch.cat([w, torch.zeros(4, 64)])),
        "constant": (Constant((5, 64), 1.0), torch.ones(5, 64)),
    }
    for what, (src, ref) in cases.items():
        got = src.read_all()
        print(f"{what}: shape {list(got.shape)}, max diff {float((got - ref).abs().max()):.1e}")
        assert got.shape == ref.shape and torch.equal(got, ref), what


def test_pad_and_constant_read_any_row_range(tmp_path):
    """Chunks that start inside the source, straddle its end or lie past it (the encoders read in any order)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g)
    refs = _save(tmp_path / "m.safetensors", {"w": w})
    ref = torch.cat([w, w[:1].expand(24, 32)])
    with Pad(Tensor(refs["w"]), 64, fill_row=0).open() as read:
        for a, b in ((0, 7), (35, 45), (40, 41), (50, 64), (0, 64)):
            assert torch.equal(torch.as_tensor(np.asarray(read(a, b))), ref[a:b]), (a, b)
    assert _encode(Pad(Tensor(refs["w"]), 64, fill_row=0), T.Q8_0).tobytes() == quantize(ref, T.Q8_0).tobytes()
    assert _encode(Constant((4096, 1024)), T.Q8_0).tobytes() == quantize(torch.zeros(4096, 1024), T.Q8_0).tobytes()
    with pytest.raises(Exception, match="cannot pad"):
        Pad(Tensor(refs["w"]), 10)


def test_stack_streams_one_chunk_at_a_time(tmp_path):
    """32 experts x 1 MiB of float32: encoding the stack never holds more than a few chunks."""
    g = torch.Generator().manual_seed(2)
    refs = _save(tmp_path / "m.safetensors", {f"e.{e}": torch.randn(256, 1024, generator=g) for e in range(32)})
    src = Stack([Tensor(refs[f"e.{e}"]) for e in range(32)])
    total = src.rows * src.cols * 4
    tracemalloc.start()
    try:
        n = sum(c.nbytes for c in __import__("edgeinfer.quant.convert", fromlist=["x"]).encode_chunks(
            src, T.Q8_0, n_threads=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"stack of 32 experts: {total / 2**20:.0f} MiB f32 -> {n / 2**20:.1f} MiB Q8_0, peak traced "
          f"{peak / 2**20:.2f} MiB")
    assert peak < total / 4


# --------------------------------------------------------------------------- whole conversions


class TinyMoeSpec(ArchSpec):
    """Test-only: a one-layer llama-shaped model whose MLP is 4 experts (per-expert or fused 3-D)."""

    name = "tiny-moe"
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def tensors(self, ck, c) -> TensorSet:
        fused = [n for n in ck.tensors if n.endswith("experts.gate_up_proj")]
        if not fused:
            return super().tensors(ck, c)  # per-expert tensors: stacked by the default mapping
        others = {n: r for n, r in ck.tensors.items() if n not in fused}
        ck2 = type(ck)(ck.path, ck.config, others)
        tset = super().tensors(ck2, c)
        gate, up = split_stacked(Tensor(ck.tensors[fused[0]]), [I, I])
        tset.outs += [Out("blk.0.ffn_gate_exps.weight", gate), Out("blk.0.ffn_up_exps.weight", up)]
        return tset


def _moe_checkpoint(folder, fused: bool):
    folder.mkdir()
    n_tok = _tiny_models.make_bpe_tokenizer(folder)
    cfg = {"architectures": ["TinyMoe"], "model_type": "tiny-moe", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": n_tok,
           "num_local_experts": E, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"model.embed_tokens.weight": r(n_tok, H), "model.norm.weight": r(H), "lm_head.weight": r(n_tok, H),
          "model.layers.0.input_layernorm.weight": r(H), "model.layers.0.post_attention_layernorm.weight": r(H),
          "model.layers.0.self_attn.q_proj.weight": r(H, H), "model.layers.0.self_attn.k_proj.weight": r(H, H),
          "model.layers.0.self_attn.v_proj.weight": r(H, H), "model.layers.0.self_attn.o_proj.weight": r(H, H),
          "model.layers.0.block_sparse_moe.gate.weight": r(E, H)}
    experts = {"gate": r(E, I, H), "up": r(E, I, H), "down": r(E, H, I)}
    if fused:
        sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.cat([experts["gate"], experts["up"]], dim=1)
        sd["model.layers.0.mlp.experts.down_proj"] = experts["down"]
    else:
        for e in range(E):
            for hf, k in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                sd[f"model.layers.0.block_sparse_moe.experts.{e}.{hf}.weight"] = experts[k][e]
    _save(folder / "model.safetensors", sd)
    return folder, experts


@pytest.mark.parametrize("layout", ["per-expert", "fused gate_up"])
def test_moe_checkpoint_converts_to_stacked_3d_tensors(tmp_path, monkeypatch, layout):
    import edgeinfer.quant.convert as conv

    monkeypatch.setattr(conv, "find_arch", lambda config, source="": TinyMoeSpec())
    folder, experts = _moe_checkpoint(tmp_path / "ck", fused=layout != "per-expert")
    for qtype, ggml in (("Q8_0", T.Q8_0), ("Q4_K_M", None)):
        out = conv.convert(folder, tmp_path / f"moe-{qtype}.gguf", qtype)
        r = gguf.GGUFReader(out)
        got = {t.name: t for t in r.tensors}
        for stem, k in (("ffn_gate_exps", "gate"), ("ffn_up_exps", "up"), ("ffn_down_exps", "down")):
            t = got[f"blk.0.{stem}.weight"]
            x = experts[k]
            typ = ggml or T(t.tensor_type)
            want = quantize(x.reshape(-1, x.shape[-1]), typ).reshape(-1)
            print(f"{layout} {qtype}: {t.name} {list(t.shape)} {T(t.tensor_type).name}: "
                  f"identical={np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want)}")
            assert list(t.shape) == [x.shape[2], x.shape[1], E]  # ggml order {cols, rows, experts}
            assert T(t.tensor_type) == typ
            assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), want)
        out.unlink()


def test_missing_expert_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import edgeinfer.quant.convert as conv
    from edgeinfer.cli import main as cli
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(conv, "find_arch", lambda config, source="": TinyMoeSpec())
    folder, _ = _moe_checkpoint(tmp_path / "ck", fused=False)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli(["convert", str(folder), "--dry-run"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "experts [2] are missing" in err and "experts.w3" in err


@pytest.mark.parametrize("change, message", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
])
def test_dry_run_refuses_what_the_run_refuses(tmp_path, capsys, change, message):
    """Metadata is computed at plan time: --dry-run fails exactly where the conversion would."""
    from edgeinfer.cli import main as cli

    arch = "gemma3" if "attn_logit_softcapping" in change else "qwen2"
    folder = _tiny_models.make_tiny_checkpoint(arch, tmp_path / arch)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    for extra in (["--dry-run"], ["-o", str(tmp_path / "x.gguf")]):
        rc = cli(["convert", str(folder), *extra])
        err = capsys.readouterr().err.strip()
        print(extra, rc, err)
        assert rc == 2 and message in err
    assert not (tmp_path / "x.gguf").exists()
