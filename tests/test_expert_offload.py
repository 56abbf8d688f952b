"""MoE expert offload (``--cpu-moe`` / ``--n-cpu-moe N``).

The torch engine's :class:`~edgeinfer.kernels.expert_offload.OffloadedExpertLinear` keeps experts in
host memory with a small device LRU cache and asynchronous copies. No GPU runs here, so its logic is
checked on CPU ("the device" is then host memory too): same outputs as the resident experts, the
cache bound, prefetched experts not copied twice. End to end, the options are accepted and change
nothing in the output on a CPU-only machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _tiny_models

T = __import__("gguf").GGMLQuantizationType


def _raw_experts(n_expert=6, n=64, k=64, seed=0):
    from edgeinfer.quant.quantizers import quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_expert, n, k, generator=g)
    raw = quantize(w.reshape(-1, k), T.Q8_0)
    return torch.from_numpy(raw.reshape(n_expert, n, -1))


def test_offloaded_experts_equal_resident_and_respect_the_cache():
    from edgeinfer.kernels.expert_offload import OffloadedExpertLinear
    from edgeinfer.kernels.qlinear import QuantExpertLinear

    raw = _raw_experts()
    resident = QuantExpertLinear(raw, T.Q8_0, 6, 64, 64, "cpu", "blk.0.ffn_up_exps.weight")
    off = OffloadedExpertLinear(raw, T.Q8_0, 6, 64, 64, "cpu", "blk.0.ffn_up_exps.weight", cache_size=2)
    x = torch.randn(3, 64)
    off.will_use([1, 4])
    assert off.transfers == 2
    y1, y4 = off.expert(1)(x), off.expert(4)(x)
    assert off.transfers == 2, "prefetched experts must not be copied again"
    for e in (0, 2, 3, 5, 1):
        assert torch.equal(off.expert(e)(x), resident.expert(e)(x))
        assert len(off._cache) <= 2
    print(f"6 experts, cache of 2: {off.transfers} transfers for 2 prefetched + 5 on demand; outputs identical")
    assert torch.equal(y1, resident.expert(1)(x)) and torch.equal(y4, resident.expert(4)(x))
    assert off.transfers == 7  # expert 1 was evicted by then and came back


def test_cpu_moe_changes_nothing_on_cpu(tmp_path, monkeypatch):
    import edgeinfer.engine.loader as loader
    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("mixtral", tmp_path / "ck")
    path = convert(folder, tmp_path / "m.gguf", "Q8_0")
    ids = torch.tensor([[int(t) for t in np.random.default_rng(3).integers(3, 300, size=12)]])
    plain, _ = loader.load_model(path, torch.device("cpu"), 32)
    ref = plain(ids, 0)[0]
    same, rep_same = loader.load_model(path, torch.device("cpu"), 32, offload_layers=ALL_LAYERS)
    monkeypatch.setattr(loader, "OFFLOAD_ON_CPU", True)  # run the offload path itself
    off, rep_off = loader.load_model(path, torch.device("cpu"), 32, offload_layers=1, expert_cache=1)
    a, b = same(ids, 0)[0], off(ids, 0)[0]
    print(f"--cpu-moe on CPU: kernels {dict(rep_same.paths)}; forced offload of layer 0: {dict(rep_off.paths)}, "
          f"{rep_off.offloaded_bytes} bytes in host memory")
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert rep_off.offloaded_bytes > 0 and any(k.endswith(":offload") for k in rep_off.paths)
    assert not any(k.endswith(":offload") for k in rep_same.paths)


def test_cli_options_map_to_load_options():
    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.cli import build_parser
    from edgeinfer.cli.args import load_options

    p = build_parser()
    assert load_options(p.parse_args(["run", "--cpu-moe"])).n_cpu_moe == ALL_LAYERS
    assert load_options(p.parse_args(["run", "--n-cpu-moe", "3"])).n_cpu_moe == 3
    assert load_options(p.parse_args(["run"])).n_cpu_moe == 0
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--cpu-moe", "--n-cpu-moe", "2"])


def test_cli_accepts_cpu_moe_and_output_is_unchanged(tmp_path, cli_env):
    flag = ["--cpu-moe"]
    import json
    import subprocess
    import sys

    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("qwen3_moe", tmp_path / "ck")
    path = convert(folder, tmp_path / "m.gguf", "Q8_0")
    base = [sys.executable, "-m", "edgeinfer", "run", "-m", str(path), "--raw", "-p", "hello world", "--temp", "0",
            "-n", "12", "--json", "--backend", "torch"]
    outs = [json.loads(subprocess.run(base + extra, capture_output=True, text=True, env=cli_env, check=True,
                                      timeout=300).stdout)["text"] for extra in ([], flag)]
    print(f"{flag}: {outs}")
    assert outs[0] == outs[1]


def test_llama_cpp_expert_overrides_match_llama_cpp_patterns():
    import re

    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.backends.llama_placement import expert_overrides

    assert expert_overrides(0) == []
    (every,) = expert_overrides(ALL_LAYERS)
    (first2,) = expert_overrides(2)
    names = ["blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_up_exps.weight", "blk.2.ffn_down_exps.weight",
             "blk.12.ffn_gate_exps.weight", "blk.1.ffn_up.weight", "blk.0.ffn_gate_inp.weight"]
    hits = {o.pattern: [n for n in names if re.search(o.pattern, n)] for o in (every, first2)}
    print(hits)
    assert hits[every.pattern] == names[:4] and hits[first2.pattern] == names[:2]
    assert every.buffer_type == first2.buffer_type == "CPU"


def test_llama_cpp_cpu_moe_output_unchanged(tmp_path):
    from edgeinfer.backend import ALL_LAYERS, LoadOptions, SamplingParams
    from edgeinfer.backends.llamacpp import LlamaCppBackend
    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("mixtral", tmp_path / "ck")
    path = convert(folder, tmp_path / "m.gguf", "Q8_0")
    texts = []
    for n in (0, ALL_LAYERS):
        b = LlamaCppBackend(path, LoadOptions(n_ctx=64, n_threads=1, n_cpu_moe=n))
        try:
            texts.append(list(b.generate("hello world", SamplingParams(temperature=0, max_tokens=12)))[-1].text)
            info = b.info().extra
        finally:
            b.close()
    print(f"llama.cpp --cpu-moe on CPU: {texts}; placement {info.get('placement')!r}")
    assert texts[0] == texts[1]
