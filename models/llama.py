"""Llama-family decoders: llama (and Mistral/SmolLM/Mixtral, which llama.cpp stores as ``llama``),
qwen2, qwen3, and the MoE variants qwen2moe, qwen3moe.

Differences are flags read from the file, not code paths per model:

* RoPE layout: llama.cpp's converter permutes llama's Q/K rows (``LlamaModel.permute``) so the
  GGUF uses ``LLAMA_ROPE_TYPE_NORM`` (rotate adjacent pairs); qwen2/qwen3 keep HF's layout and
  use ``NEOX`` (rotate halves) -- ``llama_model_rope_type`` in llama.cpp's ``src/llama-model.cpp``.
* qwen2: q/k/v biases (present as ``blk.N.attn_q.bias`` tensors).
* qwen3: per-head RMSNorm on q and k before RoPE (``blk.N.attn_q_norm``).
* llama3 RoPE scaling: the ``rope_freqs`` tensor divides each frequency (applied by the loader).
* MoE (``{arch}.expert_count`` > 0): the FFN is a :class:`~edgeinfer.models.moe.MoE` -- softmax
  routing over all experts, top-k, the chosen weights renormalised where llama.cpp's graph does
  it (llama/Mixtral and qwen3moe yes, qwen2moe no; ``{arch}.expert_weights_norm`` when the file
  says), qwen2moe's shared expert behind a sigmoid gate (``ffn_gate_inp_shexp``). A
  ``--torch-only`` file may list dense layers (``edgeinfer.moe_layers``).

Reference: llama.cpp ``src/models/llama.cpp``, ``qwen2.cpp``, ``qwen3.cpp``, ``qwen2moe.cpp``,
``qwen3moe.cpp``; HF ``LlamaForCausalLM``, ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from edgeinfer.errors import InvalidModelError
from edgeinfer.models.base import MLP, Attention, Block, ModelArgs, Transformer, Yarn, yarn_mscale
from edgeinfer.models.moe import MoE, Routing

ROPE_STYLE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "qwen2moe": "neox", "qwen3moe": "neox"}
#: Whether llama.cpp's graph renormalises the chosen experts' weights (``build_moe_ffn``'s norm_w).
RENORMALISES = {"llama": True, "qwen2moe": False, "qwen3moe": True}


@dataclass
class MoeArgs(ModelArgs):
    """:class:`ModelArgs` plus the routed FFN (per-layer: which layers are MoE)."""

    routing: Routing | None = None
    ffn_exp: int = 0
    shared_ffn: int = 0
    moe_layers: tuple = ()


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


def rope_scaling(md: dict, arch: str, path: str) -> tuple[float, Yarn | None]:
    """(position multiplier, YaRN settings or None) from ``{arch}.rope.scaling.*``; longrope is refused.

    YaRN as llama.cpp applies it (``llama_context`` constructor): extrapolation factor 1 unless the
    file says, cos/sin scaled by ``0.1 ln(factor) + 1`` -- or, with ``rope.scaling.yarn_log_mul``
    (DeepSeek's ``0.1 * mscale_all_dim``), by 1 (``mscale == mscale_all_dim``, as llama.cpp assumes).
    """
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    factor = float(md.get(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
    if kind == "longrope" and factor not in (0.0, 1.0):
        raise InvalidModelError(f"{path}: RoPE scaling {kind!r} is not supported by the torch engine; "
                                "use --backend llama.cpp")
    if kind == "yarn" and factor > 1.0:
        g = lambda k, d: float(md.get(f"{arch}.rope.scaling.{k}", d) or d)  # noqa: E731
        log_mul = float(md.get(gguf.Keys.Rope.SCALING_YARN_LOG_MUL.format(arch=arch), 0.0) or 0.0)
        yarn = Yarn(factor, int(md.get(f"{arch}.rope.scaling.original_context_length", 4096)),
                    g("yarn_beta_fast", 32.0), g("yarn_beta_slow", 1.0), g("yarn_ext_factor", 1.0),
                    1.0 if log_mul else yarn_mscale(factor))
        return 1.0, yarn
    return (1.0 / factor if kind == "linear" and factor else 1.0), None


def common_args(md: dict, tensors: dict, path: str) -> ModelArgs:
    """The hyper-parameters every decoder here shares (``tensors``: GGUF name -> shape)."""
    arch = md["general.architecture"]
    dim = int(hparam(md, arch, "embedding_length", required=True, path=path))
    n_head = int(hparam(md, arch, "attention.head_count", required=True, path=path))
    head_dim = int(hparam(md, arch, "attention.key_length", dim // n_head))
    if "token_embd.weight" not in tensors:
        raise InvalidModelError(f"{path}: tensor token_embd.weight is missing; re-convert the model")
    scaling = rope_scaling(md, arch, path)
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
        rope_freq_scale=scaling[0],
        rope_yarn=scaling[1],
        ctx_train=int(hparam(md, arch, "context_length", 4096)),
    )


def args_from_gguf(md: dict, tensors: dict, path: str = "") -> ModelArgs:
    """Build :class:`ModelArgs` (:class:`MoeArgs` for a MoE file) for llama / qwen2 / qwen3 /
    qwen2moe / qwen3moe from GGUF metadata and tensor shapes."""
    a = common_args(md, tensors, path)
    arch = a.arch
    a.rope_style = ROPE_STYLE[arch]
    a.qkv_bias = "blk.0.attn_q.bias" in tensors
    a.qk_norm = "blk.0.attn_q_norm.weight" in tensors
    n_expert = int(md.get(f"{arch}.expert_count", 0) or 0)
    if not n_expert:
        return a
    top_k = int(hparam(md, arch, "expert_used_count", required=True, path=path))
    moe_layers = tuple(bool(x) for x in md.get("edgeinfer.moe_layers", [True] * a.n_layer))
    first = moe_layers.index(True)
    ffn_exp = int(tensors[f"blk.{first}.ffn_down_exps.weight"][0])  # ggml order {ffn, dim, E}
    shexp = tensors.get(f"blk.{first}.ffn_down_shexp.weight")
    norm = md.get(f"{arch}.expert_weights_norm", RENORMALISES.get(arch, True))
    return MoeArgs(**vars(a), routing=Routing(n_expert, top_k, norm_topk=bool(norm)), ffn_exp=ffn_exp,
                   shared_ffn=int(shexp[0]) if shexp is not None else 0, moe_layers=moe_layers)


def build(a: ModelArgs) -> Transformer:
    """The model (on whatever device is current, normally ``meta``): pre-norm blocks."""
    def ffn(i: int):
        if isinstance(a, MoeArgs) and a.moe_layers[i]:
            return MoE(a.dim, a.ffn_exp, a.routing, a.act, shared_ffn=a.shared_ffn, shared_gate=a.shared_ffn > 0)
        return MLP(a.dim, a.at("ffn_dim", i), a.act)

    return Transformer(a, [Block(a.dim, a.norm_eps, Attention(a.attn_config(i)), ffn(i)) for i in range(a.n_layer)])
