"""DeepSeek-V3 (``DeepseekV3ForCausalLM``) -> GGUF ``deepseek2``: multi-head latent attention + MoE.

What the file holds, as llama.cpp's converter and loader expect it (``src/models/deepseek2.cpp``):

* MLA is stored for the absorbed form: ``kv_b_proj`` [H * (nope + v), kv_lora] is split per head
  into ``attn_k_b`` (each head's nope rows, transposed: numpy [H, kv_lora, nope]) and ``attn_v_b``
  (numpy [H, v, kv_lora]); ``head_count_kv`` is 1 and ``key_length`` / ``value_length`` are the
  latent sizes (``kv_lora + rope`` / ``kv_lora``), ``key_length_mla`` / ``value_length_mla`` the
  per-head ones;
* RoPE is ggml's NORM (adjacent pairs), i.e. HF's ``rope_interleave=True`` layout; a config with
  ``rope_interleave=False`` (rotate-half) gets the rope rows of ``q_b`` / ``kv_a`` permuted;
* the first ``first_k_dense_replace`` layers have a dense MLP, the rest routed experts (stacked
  one expert after another) plus ``n_shared_experts`` shared ones; routing: sigmoid scores with the
  ``e_score_correction_bias`` (``exp_probs_b``) for choosing, ``n_group`` / ``topk_group`` groups,
  renormalised, times ``routed_scaling_factor`` (transformers has no ``scoring_func`` field for V3:
  the gating function is always written as sigmoid);
* YaRN: ``rope.scaling.yarn_log_mul`` = 0.1 * ``mscale_all_dim`` (llama.cpp divides it back);
* multi-token-prediction layers (index >= ``num_hidden_layers``) are skipped, as llama.cpp does.
"""

from __future__ import annotations

import gguf
import numpy as np

from edgeinfer.errors import ConversionError
from edgeinfer.quant.rows import Permute, Rows, RowSource, Stack, Tensor, Transpose
from edgeinfer.quant.spec import (ArchContext, ArchSpec, Out, TensorSet, common_hparams, moe_hparams, moe_shapes,
                                  rope_params, sparse_layers)

M = gguf.MODEL_TENSOR


def rotate_half_to_pairs(n_rows: int, block: int, rope: int) -> np.ndarray:
    """Row order for blocks of ``block`` rows whose last ``rope`` rows are in HF's rotate-half order:
    those become ggml's adjacent pairs (output pair (2j, 2j+1) reads rows (j, j + rope/2))."""
    perm = np.arange(n_rows)
    tail = np.arange(rope).reshape(2, rope // 2).T.reshape(-1)  # [j, half] -> j + half * rope/2
    for start in range(0, n_rows, block):
        perm[start + block - rope:start + block] = start + block - rope + tail
    return perm


class DeepseekV3Spec(ArchSpec):
    name = "deepseek_v3"
    hf_architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3",)
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2

    def _dims(self, c: ArchContext) -> tuple[int, int, int, int]:
        return (int(c.cfg["kv_lora_rank"]), int(c.cfg["qk_nope_head_dim"]), int(c.cfg["qk_rope_head_dim"]),
                int(c.cfg["v_head_dim"]))

    def check(self, c: ArchContext) -> None:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                    "moe_intermediate_size", "num_experts_per_tok"):
            if not isinstance(c.cfg.get(key), int):
                raise ConversionError(f"config.json: deepseek_v3 needs an integer {key!r}")
        if c.get("scoring_func") not in (None, "sigmoid"):
            raise ConversionError(f"config.json: scoring_func={c.cfg['scoring_func']!r}; DeepSeek-V3 routes with sigmoid")
        if c.get("topk_method") not in (None, "noaux_tc"):
            raise ConversionError(f"config.json: topk_method={c.cfg['topk_method']!r} is not DeepSeek-V3's noaux_tc "
                                  "(top-2 sum per group); not supported")

    def llama_cpp_limits(self, c: ArchContext) -> list[str]:
        out = []
        if c.n_layers in (26, 27) and c.get("q_lora_rank"):
            out.append(f"{c.n_layers} layers make llama.cpp treat it as a 'lite' model without q_lora_rank")
        return out

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        kv_lora, nope, rope, v = self._dims(c)
        common_hparams(w, ArchContext({**c.cfg, "num_key_value_heads": 1, "head_dim": None}, c.n_vocab))  # MLA as MQA
        w.add_leading_dense_block_count(int(c.get("first_k_dense_replace", default=0)))
        w.add_vocab_size(c.n_vocab)
        if c.get("q_lora_rank"):
            w.add_q_lora_rank(int(c.cfg["q_lora_rank"]))
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
        moe_hparams(w, c)
        w.add_expert_shared_count(int(c.get("n_shared_experts", default=0)))
        if (s := c.get("routed_scaling_factor")) is not None:
            w.add_expert_weights_scale(float(s))
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        if c.get("n_group") is not None:
            w.add_expert_group_count(int(c.cfg["n_group"]))
        if c.get("topk_group") is not None:
            w.add_expert_group_used_count(int(c.cfg["topk_group"]))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_rope_dimension_count(rope)
        full, _ = rope_params(c.cfg)
        if (full.get("rope_type") or "").lower() == "yarn" and full.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(full["mscale_all_dim"]))

    def skip(self, hf_name: str, c: ArchContext) -> bool:
        parts = hf_name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdecimal() and int(parts[2]) >= c.n_layers:
            return True  # multi-token prediction layers
        return super().skip(hf_name, c)

    def tensors(self, ck, c: ArchContext) -> TensorSet:
        kv_b = {n: r for n, r in ck.tensors.items() if n.endswith("self_attn.kv_b_proj.weight")}
        rest = {n: r for n, r in ck.tensors.items() if n not in kv_b}
        tset = super().tensors(type(ck)(ck.path, ck.config, rest), c)
        kv_lora, nope, _, v = self._dims(c)
        for name, ref in kv_b.items():
            bid = int(name.split(".")[2])
            if bid >= c.n_layers:
                tset.skipped.append(name)
                continue
            if tuple(ref.shape) != (c.n_head * (nope + v), kv_lora):
                raise ConversionError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)} but config.json "
                                      f"implies {[c.n_head * (nope + v), kv_lora]}")
            src = Tensor(ref)
            per_head = nope + v
            k_b = Transpose(Stack([Rows(src, h * per_head, h * per_head + nope) for h in range(c.n_head)]))
            v_b = Stack([Rows(src, h * per_head + nope, (h + 1) * per_head) for h in range(c.n_head)])
            tset.outs += [Out(f"blk.{bid}.attn_k_b.weight", k_b), Out(f"blk.{bid}.attn_v_b.weight", v_b)]
        return tset

    def rows(self, kind, hf_name: str, src: RowSource, c: ArchContext) -> RowSource:
        if c.get("rope_interleave", default=True):
            return src
        kv_lora, nope, rope, _ = self._dims(c)
        if kind in (M.ATTN_Q_B, M.ATTN_Q):
            return Permute(src, rotate_half_to_pairs(src.shape[0], nope + rope, rope))
        if kind == M.ATTN_KV_A_MQA:
            return Permute(src, rotate_half_to_pairs(src.shape[0], kv_lora + rope, rope))
        return src

    def shapes(self, c: ArchContext, bid):
        kv_lora, nope, rope, v = self._dims(c)
        h, n = c.hidden, c.n_head
        ql = int(c.get("q_lora_rank", default=0) or 0)
        w = {M.ATTN_KV_A_MQA: (kv_lora + rope, h), M.ATTN_KV_A_NORM: (kv_lora,), M.ATTN_K_B: (n, kv_lora, nope),
             M.ATTN_V_B: (n, v, kv_lora), M.ATTN_OUT: (h, n * v), M.ATTN_NORM: (h,), M.FFN_NORM: (h,),
             M.OUTPUT_NORM: (h,)}
        if ql:
            w.update({M.ATTN_Q_A: (ql, h), M.ATTN_Q_A_NORM: (ql,), M.ATTN_Q_B: (n * (nope + rope), ql)})
        else:
            w[M.ATTN_Q] = (n * (nope + rope), h)
        out = {(k, "weight"): s for k, s in w.items()}
        ff = int(c.cfg["intermediate_size"])
        out.update({(M.FFN_GATE, "weight"): (ff, h), (M.FFN_UP, "weight"): (ff, h), (M.FFN_DOWN, "weight"): (h, ff)})
        fe = int(c.cfg["moe_intermediate_size"])
        out.update(moe_shapes(c, fe, fe * int(c.get("n_shared_experts", default=0))))
        return out

    def layer_stems(self, c: ArchContext, bid: int) -> set[str]:
        attn = {"attn_norm", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b", "attn_output", "ffn_norm"}
        attn |= {"attn_q_a", "attn_q_a_norm", "attn_q_b"} if c.get("q_lora_rank") else {"attn_q"}
        if not sparse_layers(c)[bid]:
            ffn = {"ffn_gate", "ffn_up", "ffn_down"}
        else:
            ffn = {"ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
            if c.get("n_shared_experts"):
                ffn |= {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}
        stems = {s + ".weight" for s in attn | ffn}
        if sparse_layers(c)[bid]:
            stems.add("exp_probs_b.bias")  # the router's selection bias (always present in V3 checkpoints)
        return stems
