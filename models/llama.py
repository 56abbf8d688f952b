"""Llama-family dense decoders: llama (and Mistral/SmolLM, which llama.cpp stores as ``llama``), qwen2, qwen3.

Differences are flags read from the file, not code paths per model:

* RoPE layout: llama.cpp's converter permutes llama's Q/K rows (``LlamaModel.permute``) so the
  GGUF uses ``LLAMA_ROPE_TYPE_NORM`` (rotate adjacent pairs); qwen2/qwen3 keep HF's layout and
  use ``NEOX`` (rotate halves) -- ``llama_model_rope_type`` in llama.cpp's ``src/llama-model.cpp``.
* qwen2: q/k/v biases (present as ``blk.N.attn_q.bias`` tensors).
* qwen3: per-head RMSNorm on q and k before RoPE (``blk.N.attn_q_norm``).
* llama3 RoPE scaling: the ``rope_freqs`` tensor divides each frequency (applied by the loader).

Reference: llama.cpp ``src/models/llama.cpp``, ``qwen2.cpp``, ``qwen3.cpp``; HF ``LlamaForCausalLM``.
"""

from __future__ import annotations

from edgeinfer.errors import InvalidModelError
from edgeinfer.models.base import MLP, Attention, Block, ModelArgs, Transformer

ROPE_STYLE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox"}


def hparam(md: dict, arch: str, key: str, default=None, *, path: str = "", required: bool = False):
    """Read ``{arch}.<key>`` from GGUF metadata; a missing required key raises InvalidModelError."""
    v = md.get(f"{arch}.{key}", default)
    if v is None and required:
        raise InvalidModelError(f"{path}: GGUF metadata lacks {arch}.{key}; re-convert the model")
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise InvalidModelError(f"{path}: per-layer {arch}.{key} = {v[:8]}... is not supported by the torch engine")
        v = v[0]
    return v


def rope_scale(md: dict, arch: str, path: str) -> float:
    """Linear RoPE scaling as a position multiplier (1 = none); other scaling types are refused."""
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
    if kind in ("yarn", "longrope") and factor not in (0.0, 1.0):
        raise InvalidModelError(f"{path}: RoPE scaling {kind!r} is not supported by the torch engine; "
                                "use --backend llama.cpp")
    return 1.0 / factor if kind == "linear" and factor else 1.0


def common_args(md: dict, tensors: dict, path: str) -> ModelArgs:
    """The hyper-parameters every decoder here shares (``tensors``: GGUF name -> shape)."""
    arch = md["general.architecture"]
    dim = int(hparam(md, arch, "embedding_length", required=True, path=path))
    n_head = int(hparam(md, arch, "attention.head_count", required=True, path=path))
    head_dim = int(hparam(md, arch, "attention.key_length", dim // n_head))
    if "token_embd.weight" not in tensors:
        raise InvalidModelError(f"{path}: tensor token_embd.weight is missing; re-convert the model")
    return ModelArgs(
        arch=arch,
        n_layer=int(hparam(md, arch, "block_count", required=True, path=path)),
        dim=dim,
        n_head=n_head,
        n_kv_head=int(hparam(md, arch, "attention.head_count_kv", n_head)),
        head_dim=head_dim,
        ffn_dim=int(hparam(md, arch, "feed_forward_length", required=True, path=path)),
        vocab_size=int(tensors["token_embd.weight"][1]),
        norm_eps=float(hparam(md, arch, "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_dim=int(hparam(md, arch, "rope.dimension_count", head_dim)),
        rope_base=float(hparam(md, arch, "rope.freq_base", 10000.0)),
        rope_freq_scale=rope_scale(md, arch, path),
        ctx_train=int(hparam(md, arch, "context_length", 4096)),
    )


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> ModelArgs:
    """Build :class:`ModelArgs` for llama / qwen2 / qwen3 from GGUF metadata and tensor shapes."""
    a = common_args(md, tensors, path)
    a.rope_style = ROPE_STYLE[a.arch]
    a.qkv_bias = "blk.0.attn_q.bias" in tensors
    a.qk_norm = "blk.0.attn_q_norm.weight" in tensors
    return a


def build(a: ModelArgs) -> Transformer:
    """The model (on whatever device is current, normally ``meta``): pre-norm blocks."""
    return Transformer(a, [Block(a.dim, a.norm_eps, Attention(a.attn_config(i)), MLP(a.dim, a.at("ffn_dim", i), a.act))
                           for i in range(a.n_layer)])
