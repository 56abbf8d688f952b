"""A real model round trip: the default GGUF -> HF checkpoint (transformers) -> edgeinfer convert -> llama.cpp.

The ``hf_default_checkpoint`` fixture (conftest.py) is SmolLM2-135M-Instruct saved by
transformers with its real tokenizer. We convert it and show that llama.cpp, reading our GGUF,
tokenizes exactly like the Hugging Face tokenizer, generates the same greedy tokens as
transformers (F32: identical; Q8_0: identical except at near-ties, see the test), and renders the
same chat template; and that ``edgeinfer run`` runs the file.
"""

from __future__ import annotations

import numpy as np
import pytest

TEXTS = [
    "Hello world! How are you doing today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    "Crème brûlée, naïve café, señor Müller, Ångström, Ærøskøbing, İstanbul",
    "Emoji: 🚀🦙 😶‍🌫️ ✅ 👍🏽 and flags 🇫🇷",
    "Numbers: 3.14159, 1,234,567, -42, 0x1F, 1e-10, 2024-11-22, 12:34:56, 99.9%",
    "   leading spaces\n\n\n\ttabs\r\nand CRLF   ",
    "中文测试，日本語のテキスト，한국어 문장, Български текст, العربية",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n",
    "Once upon a time, there was a little",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
N_NEW = 16


@pytest.fixture(scope="module")
def converted(hf_default_checkpoint, tmp_path_factory):
    from edgeinfer.quant.convert import convert

    out = tmp_path_factory.mktemp("real") / "smol-q8_0.gguf"
    return convert(hf_default_checkpoint, out, "Q8_0")


@pytest.fixture(scope="module")
def hf_tok(hf_default_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_default_checkpoint)


def test_llama_cpp_tokenizes_like_hugging_face(converted, hf_tok):
    from edgeinfer.backends.llama_placement import open_llama

    from edgeinfer.gguf_check import validate_gguf

    pre = validate_gguf(converted).metadata.get("tokenizer.ggml.pre")
    llm = open_llama(str(converted), vocab_only=True, verbose=False)
    bad = []
    for text in TEXTS:
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        ref = hf_tok.encode(text, add_special_tokens=False)
        print(f"{'OK ' if ours == ref else 'BAD'} {len(ref):3d} tokens  {text[:40]!r}")
        if ours != ref:
            bad.append((text, ours, ref))
    print("tokenizer.ggml.pre =", pre)
    assert pre == "smollm"
    assert not bad, bad[0]


def llama_greedy(path, ids: list[int], n: int) -> list[int]:
    from edgeinfer.backends.llama_placement import open_llama

    # one thread: on a busy 2-core machine two llama.cpp threads spin-wait on each other (6x slower)
    llm = open_llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    out: list[int] = []
    try:
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
    finally:
        llm.close()
    return out


def teacher_forced(model, ids: list[int], ours: list[int]):
    """transformers' logits at each generated position, fed llama.cpp's tokens: [n, vocab].

    If transformers' argmax equals llama.cpp's token at every position, transformers' own greedy
    decoding produces exactly the same tokens (one forward pass instead of n generate steps).
    """
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1].double()


@pytest.fixture(scope="module")
def hf_model(hf_default_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_default_checkpoint, dtype=torch.float32).eval()


@pytest.mark.slow
def test_greedy_f32_equals_transformers(hf_default_checkpoint, hf_model, hf_tok, tmp_path):
    """F32 GGUF: llama.cpp's greedy tokens are exactly transformers' greedy tokens."""
    from edgeinfer.quant.convert import convert

    f32 = convert(hf_default_checkpoint, tmp_path / "smol-f32.gguf", "F32")
    for prompt in PROMPTS:
        ids = hf_tok.encode(prompt, add_special_tokens=False)
        ours = llama_greedy(f32, ids, N_NEW)
        lg = teacher_forced(hf_model, ids, ours)
        ref = lg.argmax(-1).tolist()
        top2 = lg.topk(2, -1).values
        print(f"F32 {prompt[:28]!r}: {sum(a == b for a, b in zip(ref, ours))}/{N_NEW} same, smallest HF top-2 "
              f"margin {float((top2[:, 0] - top2[:, 1]).min()):.4f}: {hf_tok.decode(ours)!r}")
        assert ours == ref


def test_greedy_q8_0_matches_transformers(converted, hf_model, hf_tok):
    """Q8_0 GGUF: greedy tokens equal transformers' except at near-ties of the float model.

    Q8_0 moves logits by a few hundredths (weights: <= half a step of amax/127 per block;
    llama.cpp also quantizes activations to 8 bits in its matmuls); measured on this model the
    largest shift of a top-2 ordering is ~0.1 logit. So a position may differ only where
    transformers' own top-2 margin is below 0.15 logit, and at least 90% of positions must agree.
    """
    agree = total = 0
    for prompt in PROMPTS:
        ids = hf_tok.encode(prompt, add_special_tokens=False)
        ours = llama_greedy(converted, ids, N_NEW)
        lg = teacher_forced(hf_model, ids, ours)
        ref = lg.argmax(-1).tolist()
        margins = [float(lg[i].max() - lg[i, ours[i]]) for i in range(len(ours))]
        same = sum(a == b for a, b in zip(ref, ours))
        agree, total = agree + same, total + len(ours)
        print(f"Q8_0 {prompt[:28]!r}: {same}/{len(ours)} tokens equal transformers' argmax, largest margin at a "
              f"difference {max(margins):.4f}: {hf_tok.decode(ours)!r}")
        assert max(margins) < 0.15
    print(f"Q8_0 greedy agreement: {agree}/{total}")
    assert agree >= 0.9 * total


def test_chat_template_renders_identically(converted, hf_tok):
    from edgeinfer.chat_template import ChatTemplate
    from edgeinfer.gguf_check import validate_gguf

    md = validate_gguf(converted).metadata
    assert md["tokenizer.chat_template"] == hf_tok.chat_template
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! ¿Qué tal? 🚀"},
                {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "2+2?"}]
    ours = ChatTemplate(md["tokenizer.chat_template"], bos_token="<|im_start|>", eos_token="<|im_end|>").render(messages)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    print(repr(ours[-80:]))
    assert ours == ref


def test_edgeinfer_run_on_the_converted_file(converted, capsys):
    from edgeinfer.cli import main as cli

    rc = cli(["run", "-m", str(converted), "-p", "Say hello.", "-n", "8", "--temp", "0", "--threads", "1", "--ctx", "256"])
    out = capsys.readouterr().out
    print(repr(out))
    assert rc == 0 and out.strip()


def test_converted_weights_round_trip(converted, hf_default_checkpoint):
    """Dequantized Q8_0 token embedding vs the checkpoint's: within Q8_0's half-step error."""
    import gguf
    from safetensors import safe_open

    r = gguf.GGUFReader(str(converted))
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, 576)
    with safe_open(str(hf_default_checkpoint / "model.safetensors"), "np") as f:
        ref = f.get_tensor("model.embed_tokens.weight")
    blocks = ref.reshape(-1, 32)
    step = np.abs(blocks).max(1, keepdims=True) / 127
    err = np.abs(deq.reshape(-1, 32) - blocks) / np.maximum(step, 1e-30)
    print(f"max error {err.max():.3f} Q8_0 steps (<= 0.5 + fp16 scale rounding)")
    assert err.max() < 0.52
