"""The TUI's pure logic: reasoning markers, history building, context trimming, status formatting."""

from __future__ import annotations

import pytest

from _tui_fake import FakeBackend
from edgeinfer.tui.context import fit_to_context, history_messages, reply_reserve
from edgeinfer.tui.reasoning import REASONING_MARKERS, split_reasoning, strip_reasoning
from edgeinfer.tui.screens.settings import parse_params
from edgeinfer.tui.widgets.chat_view import code_blocks
from edgeinfer.tui.widgets.status_bar import Status, format_status


@pytest.mark.parametrize("m", REASONING_MARKERS, ids=lambda m: m.family)
def test_every_marker_family_splits_and_strips(m):
    text = f"{m.open}\nweigh options\n{m.close}The answer."
    segs = split_reasoning(text)
    assert [(s.kind, s.text, s.closed) for s in segs] == [("thinking", "weigh options", True),
                                                          ("answer", "The answer.", True)]
    assert strip_reasoning(text) == "The answer."


def test_streaming_prefixes_never_leak_markers():
    text = "<think>plan a b</think>Final words here."
    for k in range(len(text) + 1):
        segs = split_reasoning(text[:k], streaming=True)
        shown = " ".join(s.text for s in segs)
        assert "<" not in shown and ">" not in shown, (k, shown)
        if "<think>" in text[:k] and "</think>" not in text[:k]:
            assert segs[-1].kind == "thinking" and not segs[-1].closed


def test_gemma4_channel_and_multiple_blocks():
    text = "<|channel>thought\nfirst<channel|>A1 <think>second</think> A2"
    segs = split_reasoning(text)
    assert [(s.kind, s.text) for s in segs] == [("thinking", "first"), ("answer", "A1 "), ("thinking", "second"),
                                                ("answer", " A2")]
    assert strip_reasoning(text) == "A1 \n\n A2".strip()


def test_history_strips_reasoning_and_empty_replies():
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>only thinking"},
             {"role": "user", "content": "q3"}]
    out = history_messages("sys", turns)
    assert out == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                   {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                   {"role": "user", "content": "q3"}]
    assert history_messages("  ", turns[:1]) == [{"role": "user", "content": "q1"}]


def test_fit_drops_whole_turns_keeps_system_and_last_question():
    b = FakeBackend()
    msgs = [{"role": "system", "content": "s " * 10}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"u{i} " + "x " * 30}, {"role": "assistant", "content": f"a{i} " + "y " * 30}]
    msgs.append({"role": "user", "content": "final"})
    f = fit_to_context(b, msgs, n_ctx=300, max_tokens=50)
    print(f"dropped {f.dropped} messages; prompt {f.prompt_tokens} tokens of budget {300 - 50}")
    assert f.fits and f.prompt_tokens <= 250 and f.dropped > 0 and f.dropped % 2 == 0
    assert f.messages[0] == msgs[0] and f.messages[-1] == msgs[-1] and f.messages[1]["role"] == "user"
    assert f.messages[1:] == msgs[1 + f.dropped:]
    # nothing to drop but still too long: reported, not raised
    huge = [{"role": "user", "content": "z " * 500}]
    g = fit_to_context(b, huge, n_ctx=300, max_tokens=50)
    assert not g.fits and g.dropped == 0
    assert reply_reserve(4096, -1) == 1024 and reply_reserve(100, 512) == 50


def test_status_fits_80_columns():
    s = Status("SmolLM2 135M Instruct (a long general.name)", "Q4_1", "llama.cpp", "cpu", 120, 4096, 0.21, 153.2,
               300 * 2**20, 2**31, "generating…")
    wide = format_status(s, 200)
    assert "\n" not in wide and "153.2 tok/s" in wide and "VRAM 2.0 GiB" in wide
    narrow = format_status(s, 78)
    lines = narrow.split("\n")
    print(narrow)
    assert len(lines) == 2 and all(len(x) <= 78 for x in lines)
    assert "153.2 tok/s" in lines[1] and "llama.cpp/cpu" in lines[0]


def test_code_blocks_and_param_parsing():
    assert code_blocks("a\n```py\nx = 1\n```\nb\n```\nopen") == ["x = 1", "open"]
    p = parse_params({"temperature": "0", "top_k": "40", "top_p": "1", "min_p": "0", "repeat_penalty": "1.1",
                      "max_tokens": "-1", "seed": ""})
    assert p["seed"] is None and p["temperature"] == 0.0 and p["max_tokens"] == -1
    with pytest.raises(ValueError, match="top-k"):
        parse_params({**{k: "1" for k in ("temperature", "top_p", "min_p", "repeat_penalty", "max_tokens")},
                      "top_k": "many", "seed": "1"})


# (SamplingParams field, CLI flag, value, valid?) at and just past every edge of the ranges
EDGES = [("temperature", "--temp", "0", True), ("temperature", "--temp", "-0.01", False),
         ("top_k", "--top-k", "0", True), ("top_k", "--top-k", "-1", False),
         ("top_p", "--top-p", "1", True), ("top_p", "--top-p", "0", False), ("top_p", "--top-p", "1.01", False),
         ("min_p", "--min-p", "0", True), ("min_p", "--min-p", "1", True), ("min_p", "--min-p", "1.01", False),
         ("min_p", "--min-p", "-0.01", False),
         ("repeat_penalty", "--repeat-penalty", "0.01", True), ("repeat_penalty", "--repeat-penalty", "0", False),
         ("max_tokens", "--max-tokens", "-1", True), ("max_tokens", "--max-tokens", "-2", False),
         ("seed", "--seed", "-5", True), ("seed", "--seed", "x", False)]


@pytest.mark.parametrize("field,flag,value,valid", EDGES, ids=lambda v: str(v))
def test_settings_and_cli_accept_the_same_ranges(field, flag, value, valid):
    import argparse

    from edgeinfer.cli.args import add_sampling_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_sampling_args(parser)
    try:
        parser.parse_args([flag, value])
        cli_ok, cli_msg = True, ""
    except argparse.ArgumentError as e:
        cli_ok, cli_msg = False, str(e)
    base = {"temperature": "0.8", "top_k": "40", "top_p": "0.95", "min_p": "0.05", "repeat_penalty": "1",
            "max_tokens": "512", "seed": ""}
    try:
        parse_params({**base, field: value})
        tui_ok, tui_msg = True, ""
    except ValueError as e:
        tui_ok, tui_msg = False, str(e)
    print(f"{field}={value}: cli {cli_ok} {cli_msg!r} | settings {tui_ok} {tui_msg!r}")
    assert cli_ok == valid and tui_ok == valid


def test_picker_quant_is_the_backends_quant_label(tmp_path):
    """A GGUF without ``general.file_type``: 4 Q8_0 matrices, a larger F32 embedding, F32 norms.
    The picker must name it like the backends' ModelInfo.quant (and llama.cpp's guess, which
    counts tensors): Q8_0, not the type with the most bytes (F32)."""
    import gguf
    import numpy as np

    from edgeinfer.backends.common import quant_label
    from edgeinfer.gguf_check import validate_gguf
    from edgeinfer.resolve import ModelEntry
    from edgeinfer.tui.models import describe_models

    path = tmp_path / "nofiletype.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((256, 64), dtype=np.float32))  # 64 KiB
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, dtype=np.float32))
        for name in ("attn_q", "ffn_up"):
            q = gguf.quants.quantize(rng.standard_normal((32, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.{name}.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = validate_gguf(path)
    assert "general.file_type" not in h.metadata
    rows = describe_models(lister=lambda: [ModelEntry("nofiletype", path, "models-folder", path.stat().st_size)])
    print("picker:", rows[0].quant, "| backend ModelInfo.quant:", quant_label(h))
    assert rows[0].quant == quant_label(h) == "Q8_0"


def test_expert_offload_box():
    from edgeinfer.backend import ALL_LAYERS
    from edgeinfer.tui.screens.settings import offload_text, parse_offload

    assert [parse_offload(t) for t in ("", " 0", "none", "all", "ALL", "3")] == [0, 0, 0, ALL_LAYERS, ALL_LAYERS, 3]
    assert [offload_text(n) for n in (0, 3, ALL_LAYERS)] == ["", "3", "all"]
    for bad in ("-1", "lots", "2.5"):
        with pytest.raises(ValueError, match="experts on CPU"):
            parse_offload(bad)
