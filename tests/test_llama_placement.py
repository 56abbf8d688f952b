"""Buffer types for llama.cpp weights: the policy under faked CPUs, and the override plan against llama.cpp itself.

The policy tests fake ggml's capability report (this machine may have no AMX); the oracle tests
load real files in llama.cpp and compare the buffer sizes and greedy tokens of edgeinfer's
AMX-excluding plan (forced with a fake report that claims AMX) with llama.cpp's own choice.
"""

from __future__ import annotations

import re

import gguf
import pytest

from _llama_quant import llama_quantize
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.backends.llama_placement import (BufferPolicy, CpuReport, TensorOverride, group_patterns,
                                                plan_placement)
from edgeinfer.errors import EdgeinferError
from edgeinfer.gguf_check import TensorEntry

Q = gguf.GGMLQuantizationType
NO_AMX = CpuReport(("CPU_REPACK",), {"AVX2": "1", "REPACK": "1"})
AMX = CpuReport(("AMX", "CPU_REPACK"), {"AVX2": "1", "AMX_INT8": "1", "REPACK": "1"})


def _tensors(n_layers=3):
    """A llama-like tensor table: Q4_0 matrices (which the fake repack takes), one Q6_K ffn_down, norms, embeddings."""
    out = [TensorEntry("token_embd.weight", (64, 100), Q.Q4_0, 0, 0), TensorEntry("output_norm.weight", (64,), Q.F32, 0, 0),
           TensorEntry("output.weight", (64, 100), Q.Q6_K, 0, 0)]
    for i in range(n_layers):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            out.append(TensorEntry(f"blk.{i}.{kind}.weight", (64, 64), Q.Q4_0, 0, 0))
        out.append(TensorEntry(f"blk.{i}.ffn_down.weight", (64, 64), Q.Q6_K if i == 1 else Q.Q4_0, 0, 0))
        out.append(TensorEntry(f"blk.{i}.attn_norm.weight", (64,), Q.F32, 0, 0))
    return out


def _fake_supports(buft, t):
    assert buft == "CPU_REPACK", f"probed {buft}: an excluded buffer type must never be asked about"
    return t.qtype == Q.Q4_0


def _placed(plan, names):
    """name -> buffer type the plan's overrides send it to (first match wins, like llama.cpp), None if none."""
    return {n: next((o.buffer_type for o in plan.overrides if re.search(o.pattern, n)), None) for n in names}


def test_no_amx_keeps_llama_cpps_own_choice():
    plan = plan_placement(NO_AMX, BufferPolicy(), _tensors(), supports=_fake_supports)
    print(plan, plan.describe())
    assert plan.use_extra_bufts and plan.overrides == () and plan.kept == ("CPU_REPACK",) and plan.excluded == ()


def test_amx_present_is_never_used_and_repack_is_kept_per_tensor():
    tensors = _tensors()
    plan = plan_placement(AMX, BufferPolicy(), tensors, supports=_fake_supports)
    print(plan.describe())
    for o in plan.overrides:
        print("  ", o.pattern, "->", o.buffer_type)
    assert not plan.use_extra_bufts and plan.excluded == ("AMX",) and plan.kept == ("CPU_REPACK",)
    assert "EDGEINFER_LLAMA_AMX=1" in plan.describe() and "20824" in plan.describe()
    placed = _placed(plan, [t.name for t in tensors])
    expect = {t.name: "CPU_REPACK" if t.qtype == Q.Q4_0 and t.name != "token_embd.weight" and t.shape != (64,)
              else None for t in tensors}  # token_embd is read by get_rows: never repacked
    assert placed == expect
    assert len(plan.overrides) == 7  # one pattern per tensor kind, not one per tensor


def test_amx_opt_in_gives_llama_cpp_its_choice():
    policy = BufferPolicy.from_env({"EDGEINFER_LLAMA_AMX": "1"})
    plan = plan_placement(AMX, policy, _tensors(), supports=_fake_supports)
    print(plan.describe())
    assert plan.use_extra_bufts and plan.overrides == () and plan.kept == ("AMX", "CPU_REPACK")
    assert "AMX allowed" in plan.describe()


@pytest.mark.parametrize("report", [NO_AMX, AMX], ids=["no-amx", "amx"])
def test_repack_opt_out_means_plain_cpu_buffers(report):
    plan = plan_placement(report, BufferPolicy.from_env({"EDGEINFER_LLAMA_REPACK": "0"}), _tensors(),
                          supports=_fake_supports)
    assert not plan.use_extra_bufts and plan.overrides == () and plan.kept == ()
    assert "EDGEINFER_LLAMA_REPACK=0" in plan.describe()


def test_gpu_offload_on_an_amx_host_only_drops_extra_buffers():
    plan = plan_placement(AMX, BufferPolicy(), _tensors(), supports=_fake_supports, offload=True)
    assert not plan.use_extra_bufts and plan.overrides == () and plan.excluded == ("AMX",)


def test_caller_overrides_win_and_cpu_targets_still_get_repack():
    experts = [TensorEntry(f"blk.{i}.ffn_up_exps.weight", (64, 64, 4), Q.Q4_0, 0, 0) for i in range(2)]
    tensors = _tensors(2) + experts
    user = (TensorOverride(r"\.ffn_up_exps\.", "CPU"), TensorOverride(r"^blk\.1\.attn_q\.", "CUDA0"))
    plan = plan_placement(AMX, BufferPolicy(), tensors, supports=_fake_supports, user=user)
    assert plan.overrides[-2:] == user
    placed = _placed(plan, [t.name for t in tensors])
    assert placed["blk.0.ffn_up_exps.weight"] == placed["blk.1.ffn_up_exps.weight"] == "CPU_REPACK"
    assert placed["blk.1.attn_q.weight"] == "CUDA0" and placed["blk.0.attn_q.weight"] == "CPU_REPACK"
    # without AMX llama.cpp honours a CPU target with its extra buffer types itself: overrides pass through
    assert plan_placement(NO_AMX, BufferPolicy(), tensors, user=user).overrides == user


def test_bad_env_values_are_one_clear_error():
    with pytest.raises(EdgeinferError, match="EDGEINFER_LLAMA_AMX='maybe': use 1 or 0"):
        BufferPolicy.from_env({"EDGEINFER_LLAMA_AMX": "maybe"})
    assert BufferPolicy.from_env({}) == BufferPolicy(allow_amx=False, allow_extra=True)


def test_group_patterns_match_exactly_the_names():
    names = ["blk.3.attn_q.weight", "blk.10.attn_q.weight", "output.weight", "blk.1.ffn_down.weight"]
    pats = group_patterns(names)
    print(pats)
    assert len(pats) == 3
    universe = names + ["blk.1.attn_q.weight", "blk.30.attn_q.weight", "blk.3.attn_q.weight.bias", "xoutput.weight",
                        "blk.13.attn_q.weight"]
    assert [n for n in universe if any(re.search(p, n) for p in pats)] == names


def test_this_machines_report_is_consistent():
    r = CpuReport.query()
    print("extra buffer types:", r.extra, "features:", dict(r.features), "gpu:", r.gpu)
    assert set(r.extra) <= {"AMX", "CPU_KLEIDIAI", "CPU_REPACK", "KLEIDIAI"} | set(r.extra)
    if r.features.get("REPACK") == "1":
        assert "CPU_REPACK" in r.extra
    assert ("AMX" in r.extra) <= (r.features.get("AMX_INT8") == "1")


# -- oracle: the plan against llama.cpp's own placement, on real files --------------------------
@pytest.fixture(scope="module")
def q4_0_gguf(default_gguf, tmp_path_factory):
    return llama_quantize(default_gguf, tmp_path_factory.mktemp("q40") / "smol-Q4_0.gguf", "Q4_0",
                          allow_requantize=True)


def _load(path, **kw):
    from edgeinfer.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, LoadOptions(n_ctx=512, n_threads=2, seed=0), **kw)


def test_amx_excluding_plan_reproduces_llama_cpps_repack_choice(q4_0_gguf):
    """With a report that claims AMX, edgeinfer's overrides must put exactly the weights into
    CPU_REPACK that llama.cpp itself puts there on this CPU (no AMX): same buffer sizes, same tokens."""
    real = CpuReport.query()
    if "CPU_REPACK" not in real.extra or "AMX" in real.extra:
        pytest.skip(f"needs CPU_REPACK and no AMX (llama.cpp's own choice would be AMX): {real.extra}")
    p = SamplingParams(temperature=0, max_tokens=24)
    prompt = "The history of bread is"
    stock_b = _load(q4_0_gguf)
    stock, stock_text = stock_b.info().extra, list(stock_b.generate(prompt, p))[-1].text
    stock_b.close()
    safe_b = _load(q4_0_gguf, cpu_report={"extra": ["AMX", *real.extra]})
    safe, safe_text = safe_b.info().extra, list(safe_b.generate(prompt, p))[-1].text
    safe_b.close()
    print("llama.cpp's choice:", stock["buffers"], stock["placement"])
    print("edgeinfer's plan:  ", safe["buffers"], safe["placement"])
    assert stock["buffers"].get("CPU_REPACK", 0) > 20 * 2**20
    assert safe["buffers"] == stock["buffers"]
    assert "AMX not used" in safe["placement"] and "override" in safe["placement"]
    assert safe_text == stock_text, (safe_text, stock_text)


def test_inspect_buffers_predicts_what_llama_cpp_loads(q4_0_gguf):
    """`inspect --buffers` (the probe, nothing loaded) predicts the CPU_REPACK buffer llama.cpp reports
    when it loads the file in the runner, under this machine's real policy."""
    from edgeinfer.backends.ggml_registry import ggml
    from edgeinfer.cli.inspect import buffer_plan, render_buffers

    plan = buffer_plan(q4_0_gguf, with_tensors=True)
    print(render_buffers(plan))
    predicted = plan["buffers"].get("CPU_REPACK", {"tensors": 0, "bytes": 0})
    b = _load(q4_0_gguf)
    logged = b.info().extra["buffers"].get("CPU_REPACK", 0)
    b.close()
    print(f"predicted {predicted}; llama.cpp's log: {logged} bytes (rounded to 0.01 MiB)")
    assert abs(predicted["bytes"] - logged) <= 0.01 * 2**20 + 64 * predicted["tensors"]
    if "CPU_REPACK" in CpuReport.query().extra:
        assert predicted["tensors"] == 210 and plan["tensor_buffers"]["token_embd.weight"] == "CPU"
    assert ggml().supports_weight("CPU_REPACK", int(Q.Q4_1), (576, 576)) is False  # Q4_1 has no repacked layout
