"""``edgeinfer convert``: CLI behaviour, bad input, atomic output, streaming (bounded memory)."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
import weakref

import gguf
import pytest

import _tiny_models
from edgeinfer.cli import main as cli
from edgeinfer.gguf_check import validate_gguf


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return _tiny_models.make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ck") / "tiny-llama")


def copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def no_output_left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".gguf", ".partial") or ".partial" in p.name)


# --------------------------------------------------------------------------- happy paths


def test_cli_converts_and_the_file_validates(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli(["convert", str(llama_ckpt), "-o", str(out), "--qtype", "q8_0", "--threads", "1"]) == 0
    h = validate_gguf(out)
    md = h.metadata
    print("arch", h.architecture, "tensors", len(h.tensors), "pre", md.get("tokenizer.ggml.pre"))
    assert h.architecture == "llama"
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert md["llama.block_count"] == 2 and md["llama.attention.head_count_kv"] == 2
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.chat_template"] == _tiny_models.CHAT_TEMPLATE
    assert md["tokenizer.ggml.eos_token_id"] == 2
    names = {t.name for t in h.tensors}
    assert "rope_freqs.weight" in names and "output.weight" in names  # llama3 rope scaling, untied
    assert "wrote" in capsys.readouterr().out
    assert no_output_left(tmp_path) == ["m.gguf"]


def test_default_output_name_like_llama_cpp(llama_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["convert", str(llama_ckpt), "--qtype", "Q4_1"]) == 0
    files = no_output_left(tmp_path)
    print("default name:", files)
    assert len(files) == 1 and re.fullmatch(r"Tiny-Llama-\d+(\.\d+)?K-Q4_1\.gguf", files[0])


def test_dry_run_prints_plan_and_writes_nothing(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "plan.gguf"
    assert cli(["convert", str(llama_ckpt), "-o", str(out), "--qtype", "Q5_0", "--dry-run"]) == 0
    text = capsys.readouterr().out
    print(text[-400:])
    assert "blk.1.ffn_down.weight" in text and "Q5_0" in text and "5.50" in text  # bits per weight
    assert "F32" in text and "bits/weight" in text
    assert not out.exists()


def test_existing_output_needs_force(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert cli(["convert", str(llama_ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "--force" in err and out.read_bytes() == b"keep me"
    assert cli(["convert", str(llama_ckpt), "-o", str(out), "--force"]) == 0
    assert validate_gguf(out).architecture == "llama"


def test_interrupt_leaves_no_partial_file(llama_ckpt, tmp_path, monkeypatch):
    import edgeinfer.quant.convert as conv

    calls = {"n": 0}
    real = conv.tensor_data

    def flaky(plan, t, *rest, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(plan, t, *rest, **kw)

    monkeypatch.setattr(conv, "tensor_data", flaky)
    out = tmp_path / "m.gguf"
    assert cli(["convert", str(llama_ckpt), "-o", str(out)]) == 130
    print("files after Ctrl-C:", no_output_left(tmp_path))
    assert no_output_left(tmp_path) == []


# --------------------------------------------------------------------------- bad input: exit 2, nothing written


def _break(kind: str, folder):
    import torch
    from safetensors.torch import load_file, save_file

    st = folder / "model.safetensors"
    if kind == "missing config":
        (folder / "config.json").unlink()
    elif kind == "missing weights":
        st.unlink()
    elif kind == "pickle only":
        torch.save(load_file(st), folder / "pytorch_model.bin")
        st.unlink()
    elif kind == "corrupt header":
        data = bytearray(st.read_bytes())
        data[8:40] = b"{not json at all" + b"!" * 16
        st.write_bytes(bytes(data))
    elif kind == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
    elif kind == "shape mismatch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["intermediate_size"] = 128
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "unsupported dtype":
        sd = load_file(st)
        sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float64)
        save_file(sd, st, metadata={"format": "pt"})
    elif kind == "unknown architecture":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif kind == "missing tensor":
        sd = load_file(st)
        del sd["model.layers.1.self_attn.k_proj.weight"]
        save_file(sd, st, metadata={"format": "pt"})
    else:
        raise AssertionError(kind)


ERRORS = {
    "missing config": "config.json", "missing weights": "safetensors", "pickle only": "pickle",
    "corrupt header": "header", "truncated": "do not fit", "shape mismatch": "implies",
    "unsupported dtype": "F64", "unknown architecture": "supported: llama", "no tokenizer": "tokenizer",
    "missing tensor": "layer 1 is missing",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_bad_input_clear_error_exit_2(llama_ckpt, tmp_path, capsys, kind):
    folder = copy_ckpt(llama_ckpt, tmp_path / "broken")
    _break(kind, folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = cli(["convert", str(folder), "-o", str(out_dir / "x.gguf")])
    err = capsys.readouterr().err.strip()
    print(f"{kind}: rc={rc} {err}")
    assert rc == 2
    assert err.startswith("edgeinfer: error:") and "\n" not in err
    assert ERRORS[kind] in err
    assert no_output_left(out_dir) == []


def test_missing_shard(tmp_path, capsys):
    folder = _tiny_models.make_tiny_checkpoint("qwen3", tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    rc = cli(["convert", str(folder), "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and shards[1].name in err and "missing" in err
    assert not (tmp_path / "x.gguf").exists()


def test_hub_repo_id_offline_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = cli(["--offline", "convert", "someone/not-cached-model", "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and "cache" in err


# --------------------------------------------------------------------------- streaming


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Fails if the converter keeps tensors alive or allocates far more than one tensor.

    12 layers of 256-wide llama: ~31 MB of float32 weights, the largest tensor 0.5 MB. We count
    how many source tensors are loaded whole and alive at once (weak references), how many are
    open for streaming at once, and the peak of traced allocations (numpy buffers and the bytes
    read from the files), which hold every loaded tensor, chunk and encoded output.
    """
    from edgeinfer.quant import source
    from edgeinfer.quant.convert import convert, plan_conversion

    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path / "deep", hidden_size=256, intermediate_size=512,
                                               num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=12)
    plan = plan_conversion(folder, "F32")
    total = sum(t.n_elements * 4 for t in plan.tensors)
    largest = plan.largest_f32_bytes
    alive, peak_alive = set(), [0]
    real_load = source.TensorRef.load_f32

    def tracked(self):
        x = real_load(self)
        key = id(x)
        alive.add(key)
        peak_alive[0] = max(peak_alive[0], len(alive))
        weakref.finalize(x, alive.discard, key)
        return x

    monkeypatch.setattr(source.TensorRef, "load_f32", tracked)
    open_now, peak_open, streamed = [0], [0], [0]
    real_enter, real_exit = source.RowReader.__enter__, source.RowReader.__exit__

    def enter(self):
        open_now[0] += 1
        streamed[0] += 1
        peak_open[0] = max(peak_open[0], open_now[0] + len(alive))
        return real_enter(self)

    def exit_(self, *exc):
        open_now[0] -= 1
        return real_exit(self, *exc)

    monkeypatch.setattr(source.RowReader, "__enter__", enter)
    monkeypatch.setattr(source.RowReader, "__exit__", exit_)
    tracemalloc.start()
    try:
        convert(folder, tmp_path / "deep.gguf", "F32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"model {total / 2**20:.1f} MiB f32, largest tensor {largest / 2**20:.2f} MiB, "
          f"peak traced {peak / 2**20:.2f} MiB, max whole tensors alive {peak_alive[0]}, "
          f"{streamed[0]} tensors streamed, max source tensors in use at once {peak_open[0]}")
    assert peak_alive[0] <= 2 and peak_open[0] <= 2 and streamed[0] > 12 * 5
    assert peak < 4 * largest + 4 * 2**20 < total / 3


def test_safetensors_header_parser_rejects_overlapping_lengths(tmp_path):
    from edgeinfer.errors import ConversionError
    from edgeinfer.quant.source import read_safetensors_header

    p = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(ConversionError, match="do not fit"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ConversionError, match="header length"):
        read_safetensors_header(p)


def test_sentencepiece_vocab_tokenizes_like_sentencepiece(tmp_path):
    """gemma3's SentencePiece tokenizer: llama.cpp on our GGUF splits text exactly like sentencepiece."""
    import sentencepiece as spm
    from edgeinfer.backends.llama_placement import open_llama

    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("gemma3", tmp_path / "g")
    path = convert(folder, tmp_path / "g.gguf", "Q8_0")
    md = validate_gguf(path).metadata
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.bos_token_id"] == 2 and md["tokenizer.ggml.eos_token_id"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    llm = open_llama(str(path), vocab_only=True, verbose=False)
    texts = ["The quick brown fox", "café naïve 123 4567", "def add(a, b):\n    return a+b", "emoji 🚀 zürich ŁÓDŹ"]
    for text in texts:
        ours = llm.tokenize(text.encode(), add_bos=False, special=False)
        ref = sp.encode(text)
        print(ours == ref, len(ref), repr(text))
        assert ours == ref


def test_hub_repo_id_resolves_from_the_offline_cache(llama_ckpt, tmp_path, monkeypatch):
    """SRC = owner/name found in the Hugging Face cache converts with --offline (no network)."""
    import shutil

    hf_home = tmp_path / "hf"
    snap = hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(llama_ckpt, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.chdir(tmp_path)
    assert cli(["--offline", "convert", "acme/tiny-llama", "--qtype", "F16"]) == 0
    files = no_output_left(tmp_path)
    print(files)
    assert len(files) == 1 and re.fullmatch(r"[Tt]iny-[Ll]lama-\d+(\.\d+)?K-F16\.gguf", files[0])


def test_whole_model_policy_hook(llama_ckpt, tmp_path):
    """A policy with decide_all sees every tensor at once, in canonical order, and its types are written."""
    from gguf import GGMLQuantizationType as T

    from edgeinfer.quant.convert import convert, plan_conversion
    from edgeinfer.quant.policy import TypeDecision, default_policy

    class EveryOtherAttnV:
        seen: list[str] = []

        def decide_all(self, inputs):
            self.seen = [i.name for i in inputs]
            out, n_v = [], 0
            for i in inputs:
                d = default_policy(i)
                if i.name.endswith("attn_v.weight"):
                    d = TypeDecision(T.Q8_0 if n_v % 2 == 0 else T.Q4_0, f"attn_v #{n_v}")
                    n_v += 1
                out.append(d)
            return out

    pol = EveryOtherAttnV()
    plan = plan_conversion(llama_ckpt, "Q5_1", policy=pol)
    print(pol.seen[:4], "...", pol.seen[-2:])
    assert pol.seen[0] in ("rope_freqs.weight", "token_embd.weight") and pol.seen[-1].startswith("output")
    types = {t.gguf_name: t.ggml_type for t in plan.tensors}
    assert types["blk.0.attn_v.weight"] == T.Q8_0 and types["blk.1.attn_v.weight"] == T.Q4_0
    assert types["blk.0.ffn_up.weight"] == T.Q5_1
    out = convert(llama_ckpt, tmp_path / "mix.gguf", "Q5_1", policy=pol)
    written = {t.name: t.qtype for t in validate_gguf(out).tensors}
    assert written["blk.1.attn_v.weight"] == T.Q4_0
