"""Tiny, seeded, random Hugging Face checkpoints for tests (built offline with transformers).

Usage::

    import _tiny_models
    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path / "llama")  # -> Path
    # folder holds config.json, model.safetensors (or shards + index), tokenizer files,
    # generation_config.json: a complete HF checkpoint that `edgeinfer convert` accepts.

Architectures: see :data:`TINY_CONFIGS` (llama with llama3 rope scaling, mistral, qwen2 with q/k/v
biases, qwen3 with q/k norms and head_dim != hidden/heads, gemma3 text with a sliding window of 4
tokens, a global layer, query_pre_attn_scalar != head_dim and final logit soft-capping; two Gemma 3n
rows, :data:`GEMMA3N_ARCHS`: one within what stock llama.cpp hard-codes and one beyond it; three Gemma 4
variants, :data:`GEMMA4_ARCHS`, saved as ``Gemma4ForCausalLM`` or, with ``multimodal=True``, as the
text part of ``Gemma4ForConditionalGeneration``). Sizes are
small but odd-ish (GQA, several head sizes) and every row length is a multiple of 32, so block
quantization applies to every matrix. Norm weights are randomized too, so fix-ups such as gemma's
``1 + w`` are actually tested.

Tokenizers are trained offline on a fixed text: a byte-level BPE ``tokenizer.json`` (llama, mistral,
qwen) or a byte-fallback SentencePiece ``tokenizer.model`` (gemma3; or any arch with
``tokenizer="spm"``). Both are deterministic for a given text.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VOCAB = 320

_COMMON = dict(vocab_size=TINY_VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.08)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
                   query_pre_attn_scalar=48, final_logit_softcapping=30.0, tie_word_embeddings=True,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # MoE: several experts, top-k > 1; router/expert widths multiples of 32 so every matrix quantizes
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=None, tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=96, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=6, num_experts_per_tok=3,
                      moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      tie_word_embeddings=False),
    # MLA + sigmoid group routing with a selection bias, a dense first layer, YaRN x4 with mscale_all_dim
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
                        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8,
                        num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, norm_topk_prob=True,
                        rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "mscale": 1.0, "mscale_all_dim": 1.0}),
}

# Gemma 3n (issue 13): AltUp, LAuReL, per-layer embeddings, activation sparsity, KV-shared layers,
# a sliding window of 4 (shorter than the test sequences). The vocabulary (352) is larger than the
# per-layer embedding table (320 rows), as in the real models (262400 vs 262144).
_S, _F = "sliding_attention", "full_attention"
_GEMMA3N = dict(model_type="gemma3n_text", vocab_size=352, vocab_size_per_layer_input=TINY_VOCAB, hidden_size=64,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4,
                final_logit_softcapping=30.0, tie_word_embeddings=True,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
TINY_CONFIGS.update({
    # what stock llama.cpp hard-codes: 20 layers with their own K/V (the shared sliding layer 20 reads
    # layer 18, the shared full layer 21 layer 19), PLE width 256, LAuReL rank 64, 4 AltUp streams
    # with stream 0 active, sparsity 0.95 on the first 10 layers, one FFN width, soft-cap 30
    "gemma3n": {**_GEMMA3N, "num_hidden_layers": 22, "intermediate_size": 128, "num_kv_shared_layers": 2,
                "layer_types": [_F if (i + 1) % 5 == 0 else _S for i in range(21)] + [_F],
                "hidden_size_per_layer_input": 256, "laurel_rank": 64, "altup_num_inputs": 4,
                "altup_active_idx": 0, "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 12},
    # beyond it (converted with --torch-only): 6 layers (4 with K/V), PLE width 32, LAuReL rank 32,
    # 3 AltUp streams with stream 1 active, sparsity on layers 0, 1 and the shared layer 4 at two
    # levels, a different FFN width per layer, soft-cap 25
    "gemma3n_small": {**_GEMMA3N, "num_hidden_layers": 6, "intermediate_size": [96, 64, 128, 96, 64, 96],
                      "num_kv_shared_layers": 2, "layer_types": [_S, _S, _F, _S, _S, _F],
                      "hidden_size_per_layer_input": 32, "laurel_rank": 32, "altup_num_inputs": 3,
                      "altup_active_idx": 1, "activation_sparsity_pattern": [0.9, 0.95, 0.0, 0.0, 0.95, 0.0],
                      "final_logit_softcapping": 25.0},
})
GEMMA3N_ARCHS = ("gemma3n", "gemma3n_small")

# Gemma 4 (issue 12): three text variants, each with a sliding window (4) shorter than the test
# sequences. Full layers have their own head dim (global_head_dim) and proportional / partial RoPE.
_GEMMA4 = dict(model_type="gemma4_text", vocab_size=None, hidden_size=64, num_attention_heads=4, head_dim=32,
               global_head_dim=64, sliding_window=4, final_logit_softcapping=30.0, tie_word_embeddings=True,
               hidden_size_per_layer_input=0, rope_parameters={
                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                   "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                      "rope_theta": 1000000.0}})
TINY_CONFIGS.update({
    # E2B-like: per-layer embeddings (PLE), the last 3 layers reuse the KV of layers 3 (sliding) and
    # 4 (full) -- the only layout llama.cpp's hard-coded reuse rule expresses -- and their MLP is
    # twice as wide (use_double_wide_mlp); MQA (1 KV head) like E2B.
    "gemma4_e2b": {**_GEMMA4, "num_hidden_layers": 8, "num_key_value_heads": 1, "intermediate_size": 96,
                   "layer_types": [_S, _S, _F, _S, _F, _S, _S, _F], "num_kv_shared_layers": 3,
                   "use_double_wide_mlp": True, "hidden_size_per_layer_input": 32},
    # 26B-A4B-like: a MoE block (6 experts, top-2) beside the dense MLP, attention_k_eq_v (full
    # layers have no v_proj: V is the raw K) with their own KV-head count (1 vs 2).
    "gemma4_moe": {**_GEMMA4, "num_hidden_layers": 6, "num_key_value_heads": 2, "intermediate_size": 64,
                   "layer_types": [_S, _S, _F, _S, _S, _F], "attention_k_eq_v": True,
                   "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 6,
                   "top_k_experts": 2, "moe_intermediate_size": 32},
    # 31B-like, with an irregular layer pattern and half the global head rotated.
    "gemma4_dense": {**_GEMMA4, "num_hidden_layers": 7, "num_key_value_heads": 2, "intermediate_size": 96,
                     "layer_types": [_S, _F, _F, _S, _S, _S, _F], "attention_k_eq_v": True,
                     "num_global_key_value_heads": 1, "rope_parameters": {
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 1000000.0}}},
})
GEMMA4_ARCHS = ("gemma4_e2b", "gemma4_moe", "gemma4_dense")
DEFAULT_TOKENIZER = {"llama": "bpe", "mistral": "bpe", "qwen2": "bpe", "qwen3": "bpe", "gemma3": "spm",
                     "mixtral": "bpe", "qwen2_moe": "bpe", "qwen3_moe": "bpe", "deepseek_v3": "bpe",
                     **{a: "spm" for a in GEMMA3N_ARCHS}, **{a: "gemma4" for a in GEMMA4_ARCHS}}

_CORPUS = """The quick brown fox jumps over the lazy dog. A tiny model learns nothing, but its tokenizer
still splits words into pieces: hello world, hello there, the weather is nice today.
def add(a, b):\n    return a + b\nprint(add(1, 2))  # 3
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and accents: café, naïve, résumé, über, niño.
Questions? Answers! Lists: one, two, three; quotes "like this" and 'this'.
"""

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus(repeat: int = 30) -> str:
    return _CORPUS * repeat


def make_bpe_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB) -> int:
    """Train a byte-level BPE tokenizer offline and save tokenizer.json + tokenizer_config.json.

    Returns the number of tokens (<= vocab_size).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": 512, "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size()


def make_spm_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB) -> int:
    """Train a byte-fallback SentencePiece BPE model (Gemma ids: pad 0, eos 1, bos 2, unk 3)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE.replace(
               "<|im_start|>", "<start_of_turn>").replace("<|im_end|>", "<end_of_turn>")}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp.vocab_size()


GEMMA4_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>",
                   "<|think|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                   "<tool_response|>", '<|"|>', "<|image|>", "<|audio|>")
GEMMA4_VOCAB = 384
#: Gemma 4's chat template (google/gemma-4-31B-it ``chat_template.jinja`` on the Hugging Face Hub),
#: with its thinking channel ``<|channel>thought ... <channel|>``.
GEMMA4_CHAT_TEMPLATE = (Path(__file__).parent / "data" / "gemma4_chat_template.jinja").read_text(encoding="utf-8")


def make_gemma4_tokenizer(out_dir: Path, vocab_size: int = GEMMA4_VOCAB) -> int:
    """A Gemma-4-style tokenizer.json: SentencePiece-like BPE (spaces normalized to ``\u2581``,
    split only at newlines) with byte fallback (``<0x00>``..``<0xFF>``), a Sequence decoder, merges,
    and Gemma 4's control tokens (ids 0..18: pad, eos, bos, unk, mask, turn and channel markers...)
    plus the real chat template. Returns the number of tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    norm = normalizers.Replace(" ", "\u2581")
    pre = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    n_fixed = len(GEMMA4_SPECIALS) + 256
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer, trainer_tok.pre_tokenizer = norm, pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed + 64, show_progress=False)
    trainer_tok.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    learned = trainer_tok.get_vocab()
    vocab = {t: i for i, t in enumerate(GEMMA4_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(GEMMA4_SPECIALS) + b for b in range(256)})
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        if len(vocab) == vocab_size:
            break
        vocab.setdefault(t, len(vocab))
    while len(vocab) < vocab_size:  # a large vocabulary (PLE memory tests): filler pieces no merge makes
        vocab["\u2581w" + str(len(vocab))] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA4_SPECIALS])
    tok.save(str(out_dir / "tokenizer.json"))
    named = {"soc_token": "<|channel>", "eoc_token": "<channel|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
             "think_token": "<|think|>", "std_token": "<|tool>", "etd_token": "<tool|>", "stc_token": "<|tool_call>",
             "etc_token": "<tool_call|>", "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
             "escape_token": '<|"|>', "image_token": "<|image|>", "audio_token": "<|audio|>"}
    # the layout of the real Gemma 4 tokenizer_config.json (EOS is <turn|>; <eos> is not special there)
    cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<turn|>", "pad_token": "<pad>",
           "unk_token": "<unk>", "mask_token": "<mask>", **named, "model_specific_special_tokens": named,
           "add_bos_token": True, "add_eos_token": False, "model_max_length": 512,
           "chat_template": GEMMA4_CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size()


def tiny_config(arch: str, **overrides):
    """The transformers config object for ``arch`` (see :data:`TINY_CONFIGS`)."""
    from transformers import AutoConfig

    kw = {**_COMMON, **TINY_CONFIGS[arch], **overrides}
    model_type = kw.pop("model_type")
    if arch.startswith("gemma4"):
        kw.update(pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2)
        if kw.get("hidden_size_per_layer_input"):
            kw.setdefault("vocab_size_per_layer_input", kw["vocab_size"])
        # multimodal: Gemma4ForConditionalGeneration, text model only (True) or with tiny vision and
        # audio towers ("towers"), which the converter must skip
        if mm := kw.pop("multimodal", False):
            from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

            towers = mm == "towers"
            vc = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16, position_embedding_size=64) if towers else None
            ac = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2) if towers else None
            return Gemma4Config(text_config=Gemma4TextConfig(**kw), vision_config=vc, audio_config=ac,
                                tie_word_embeddings=kw.get("tie_word_embeddings", True))
    elif arch == "gemma3" or arch in GEMMA3N_ARCHS:
        kw.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    else:
        kw.update(bos_token_id=None, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, **kw)


def make_tiny_checkpoint(arch: str, out_dir, dtype=None, *, seed: int = 0, tokenizer: str | None = None,
                         max_shard_size: str | None = None, n_vocab: int | None = None, **config_overrides) -> Path:
    """Build and save a tiny random checkpoint.

    Args:
        arch: a key of :data:`TINY_CONFIGS` (llama, mistral, qwen2, qwen3, gemma3, the MoE, gemma3n and gemma4 rows).
        out_dir: folder to create (parents too).
        dtype: torch dtype of the saved weights (default float32; bfloat16/float16 work).
        seed: torch seed for the weights.
        tokenizer: "bpe", "spm" or "gemma4" (default per arch, see :data:`DEFAULT_TOKENIZER`).
        max_shard_size: e.g. "100KB" to save sharded safetensors with an index.
        n_vocab: tokenizer size (gemma4: filled up with unused pieces; default 320 / 384).
        config_overrides: extra config fields.
    Returns:
        ``Path(out_dir)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = tokenizer or DEFAULT_TOKENIZER[arch]
    makers = {"spm": make_spm_tokenizer, "bpe": make_bpe_tokenizer, "gemma4": make_gemma4_tokenizer}
    n_tok = makers[kind](out, n_vocab) if n_vocab else makers[kind](out)
    assert n_tok <= max(TINY_VOCAB, GEMMA4_VOCAB, n_vocab or 0), n_tok
    if TINY_CONFIGS[arch].get("vocab_size", TINY_VOCAB) is None:  # the tokenizer's size (gemma4)
        config_overrides.setdefault("vocab_size", n_tok)
    cfg = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    gemma3n, gemma4 = arch in GEMMA3N_ARCHS, arch.startswith("gemma4")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (gemma3n or gemma4) and name.endswith(("q_norm.weight", "k_norm.weight")):
                # attention scale 1 on RMS-normed q and k: weights near 1 give scores of ~sqrt(head_dim),
                # a near-argmax softmax that flips on any rounding; ~0.25 keeps them O(1), as trained
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + 0.25)
            elif gemma4 and name.endswith("router.proj.weight"):
                # router logits of std ~2.5 (not ~0.1): decisive top-k choices, as in trained MoEs, so
                # rounding differences between engines rarely flip an expert
                p.copy_(torch.randn(p.shape, generator=g) * 2.5)
            elif p.ndim == 1:  # norms (and biases): random, not all-ones, so fix-ups show
                spread = 0.3 if gemma4 else 0.1  # gemma4 norms have no 1 + w offset: make a wrong one show
                p.copy_(torch.randn(p.shape, generator=g) * spread + (0.0 if arch == "gemma3" or "bias" in name else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if gemma4 and name.endswith("layer_scalar"):  # gemma4's per-layer output scale (a saved buffer, 1 at init)
                b.copy_(0.5 + 0.5 * torch.rand(b.shape, generator=g))
    model = model.to(dtype or torch.float32)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    if gemma3n:
        _add_shared_kv(out, model, g, dtype or torch.float32)
    tc = cfg.get_text_config()
    GenerationConfig(bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id).save_pretrained(out)
    return out


def _add_shared_kv(out: Path, model, g, dtype) -> None:
    """Give the KV-shared layers K/V projections and a k_norm, as the released Gemma 3n checkpoints
    have them (transformers 5 neither builds nor saves them and ignores them when loading; stock
    llama.cpp requires them in every layer, though shared layers never read them)."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = model.config
    first = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    path = out / "model.safetensors"
    sd = load_file(path)
    kv, h = cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size
    for i in range(first, cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "k_proj.weight"] = (torch.randn(kv, h, generator=g) * 0.08).to(dtype)
        sd[p + "v_proj.weight"] = (torch.randn(kv, h, generator=g) * 0.08).to(dtype)
        sd[p + "k_norm.weight"] = (torch.randn(cfg.head_dim, generator=g) * 0.05 + 0.25).to(dtype)
    save_file(sd, path, metadata={"format": "pt"})


def drop_shared_kv(folder: Path) -> Path:
    """Remove the KV-shared layers' K/V tensors again: a Gemma 3n checkpoint as transformers 5 saves it."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    first = cfg["num_hidden_layers"] - cfg["num_kv_shared_layers"]
    path = folder / "model.safetensors"
    sd = load_file(path)
    keep = {k: v for k, v in sd.items() if not any(k.endswith(f"layers.{i}.self_attn.{n}.weight")
                                                   for i in range(first, cfg["num_hidden_layers"])
                                                   for n in ("k_proj", "v_proj", "k_norm"))}
    assert len(keep) < len(sd)
    save_file(keep, path, metadata={"format": "pt"})
    return folder
