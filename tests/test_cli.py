"""The command line: exit codes, messages, run/inspect/ls/pull behaviour (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from _gguf_files import truncated_copy, write_tiny_gguf


def cli(*args, env, input_=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgeinfer", *args], capture_output=True, text=True,
                          env=env, input=input_, timeout=timeout)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    print(r.stderr.strip())


def test_help_lists_commands(cli_env):
    r = cli("--help", env=cli_env)
    assert r.returncode == 0
    for c in ("run", "inspect", "ls", "pull"):
        assert c in r.stdout


def test_run_default_json_is_deterministic(cli_env):
    args = ("run", "-p", "Say hello.", "--temp", "0", "-n", "12", "--json", "--threads", "2")
    a = json.loads(cli(*args, env=cli_env).stdout)
    b = json.loads(cli(*args, env=cli_env).stdout)
    assert a["text"].strip() and a["text"] == b["text"]
    assert a["timings"]["generated_tokens"] > 0 and a["timings"]["decode_tok_s"] > 0
    assert a["backend"] == "llama.cpp"


def test_run_streams_text_and_stats(cli_env):
    r = cli("run", "-p", "Count to five.", "--temp", "0", "-n", "16", "--stats", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for key in ("TTFT", "prefill", "decode", "tok/s"):
        assert key in r.stderr


def test_missing_file(cli_env, tmp_path):
    assert_clean_error(cli("run", "-m", str(tmp_path / "nope.gguf"), "-p", "x", env=cli_env), "nope.gguf", "no such file")


def test_not_a_gguf(cli_env, tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    assert_clean_error(cli("run", "-m", str(p), "-p", "x", env=cli_env), str(p), "not a GGUF")


def test_truncated_gguf_never_reaches_llama_cpp(cli_env, tmp_path, default_gguf):
    p = truncated_copy(default_gguf, tmp_path / "cut.gguf", 0.6)
    assert_clean_error(cli("run", "-m", str(p), "-p", "x", env=cli_env), str(p), "truncated")
    assert_clean_error(cli("inspect", str(p), env=cli_env), "truncated")


def test_unknown_architecture(cli_env, tmp_path):
    p = write_tiny_gguf(tmp_path / "alien.gguf", arch="alien9000")
    assert_clean_error(cli("run", "-m", str(p), "-p", "x", env=cli_env), "alien9000", "unknown architecture")


@pytest.mark.parametrize("flags", [["--temp", "-1"], ["--top-p", "0"], ["--ctx", "abc"], ["--threads", "0"],
                                   ["--backend", "onnx"]])
def test_bad_flag_values(cli_env, flags):
    r = cli("run", "-p", "x", *flags, env=cli_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert flags[0] in r.stderr
    print(r.stderr.strip().splitlines()[-1])


def test_no_prompt(cli_env):
    assert_clean_error(cli("run", env=cli_env), "no prompt")


def test_debug_shows_traceback(cli_env, tmp_path):
    r = cli("--debug", "run", "-m", str(tmp_path / "nope.gguf"), "-p", "x", env=cli_env)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_inspect_matches_gguf_reader(cli_env, default_gguf):
    r = cli("inspect", "default", "--json", "--tensors", env=cli_env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    reader = gguf.GGUFReader(default_gguf)
    assert s["architecture"] == reader.fields["general.architecture"].contents()
    assert s["tensor_count"] == len(reader.tensors)
    assert s["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    assert s["file_size"] == os.path.getsize(default_gguf)
    per_type: dict = {}
    for t in reader.tensors:
        d = per_type.setdefault(t.tensor_type.name, [0, 0])
        d[0] += 1
        d[1] += int(t.n_bytes)
    assert {k: [v["tensors"], v["bytes"]] for k, v in s["types"].items()} == per_type
    assert s["tokenizer"]["model"] == reader.fields["tokenizer.ggml.model"].contents()
    assert s["tokenizer"]["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert s["chat_template"] is True
    for key in ("block_count", "embedding_length", "attention.head_count", "context_length"):
        assert s["hyperparameters"][key] == reader.fields[f"llama.{key}"].contents()
    assert [t["name"] for t in s["tensors"]] == [t.name for t in reader.tensors]
    print(f"params={s['parameters']:,} bpw={s['bits_per_weight']} types={per_type}")
    text = cli("inspect", str(default_gguf), env=cli_env).stdout
    assert "architecture:  llama" in text and "Q4_1" in text and "chat template: yes" in text


def test_ls_lists_default_and_models_folder(cli_env, tmp_path):
    models = Path(cli_env["EDGEINFER_MODELS_DIR"])
    models.mkdir(parents=True)
    write_tiny_gguf(models / "mine.gguf")
    r = cli("ls", "--json", env=cli_env)
    names = {m["name"]: m["source"] for m in json.loads(r.stdout)}
    assert names["default"] == "default" and names["mine.gguf"] == "models-folder"


def _fake_hf_cache(hf_home: Path, repo: str, files: dict[str, bytes]) -> Path:
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    sha = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:064x}"
        blob.write_bytes(data)
        (snap / name).symlink_to(blob)
    return snap


def test_hub_names_resolve_from_cache_offline(cli_env, tmp_path, default_gguf):
    data = default_gguf.read_bytes()
    _fake_hf_cache(Path(cli_env["HF_HOME"]), "acme/Tiny-GGUF",
                   {"tiny-Q4_1.gguf": data, "tiny-Q8_0.gguf": data})
    r = cli("inspect", "acme/Tiny-GGUF:Q4_1", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"].endswith("tiny-Q4_1.gguf")
    assert_clean_error(cli("inspect", "acme/Tiny-GGUF", env=cli_env), "several GGUF files", "tiny-Q8_0.gguf")
    assert_clean_error(cli("inspect", "acme/Tiny-GGUF:Q5_K_M", env=cli_env), "no GGUF matches")
    names = [m["name"] for m in json.loads(cli("ls", "--json", env=cli_env).stdout)]
    assert "acme/Tiny-GGUF:Q4_1" in names and "acme/Tiny-GGUF:Q8_0" in names


def test_missing_hub_model_offline_is_clear_not_a_hang(cli_env):
    r = cli("--offline", "run", "-m", "acme/Nothing-GGUF:Q4_K_M", "-p", "x", env=cli_env, timeout=60)
    assert_clean_error(r, "acme/Nothing-GGUF", "offline", "edgeinfer pull")
    r = cli("--offline", "pull", "acme/Nothing-GGUF", env=cli_env, timeout=60)
    assert_clean_error(r, "offline", "nothing of it is cached")


def test_pull_offline_lists_cached_files(cli_env, tmp_path):
    _fake_hf_cache(Path(cli_env["HF_HOME"]), "acme/Ckpt", {"config.json": b"{}"})
    r = cli("--offline", "pull", "acme/Ckpt", env=cli_env)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
