"""Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and their MoE variants -> GGUF ``qwen2`` /
``qwen3`` / ``qwen2moe`` / ``qwen3moe``.

Names only: llama.cpp keeps HF's rotate-half layout for them (NeoX RoPE), so no fix-ups. The MoE
variants' experts come per expert (``mlp.experts.N.gate_proj``, stacked by the default mapping) or
fused (``mlp.experts.gate_up_proj`` [E, 2I, H], split here as llama.cpp's converter splits it).

What llama.cpp hard-codes for the MoE graphs (``src/models/qwen2moe.cpp``, ``qwen3moe.cpp``), which
the configs must therefore match for the file to run right there:

* the chosen experts' weights are renormalised for qwen3moe and not for qwen2moe, whatever
  ``norm_topk_prob`` says;
* every layer is a MoE layer: ``mlp_only_layers`` / ``decoder_sparse_step`` dense layers have no
  place in its tensor table.
"""

from __future__ import annotations

import gguf

from edgeinfer.quant.rows import Tensor
from edgeinfer.quant.spec import (ArchContext, ArchSpec, Out, TensorSet, common_hparams, moe_hparams, moe_shapes,
                                  sparse_layers, split_stacked)

M = gguf.MODEL_TENSOR


class Qwen2Spec(ArchSpec):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3Spec(ArchSpec):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3


class Qwen2MoeSpec(ArchSpec):
    name = "qwen2_moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    renormalises = False  # what llama.cpp's graph does with the chosen experts' weights
    dense_arch = gguf.MODEL_ARCH.QWEN2  # names of a dense layer's MLP (--torch-only files)

    def tensors(self, ck, c: ArchContext) -> TensorSet:
        self._dense_names = gguf.get_tensor_name_map(self.dense_arch, c.n_layers)
        fused = {n: r for n, r in ck.tensors.items() if n.endswith("mlp.experts.gate_up_proj")}
        if not fused:
            return super().tensors(ck, c)
        rest = {n: r for n, r in ck.tensors.items() if n not in fused}
        tset = super().tensors(type(ck)(ck.path, ck.config, rest), c)
        ffn = int(c.cfg["moe_intermediate_size"])
        for name, ref in fused.items():
            bid = int(name.split(".")[2])
            gate, up = split_stacked(Tensor(ref), [ffn, ffn])
            tset.outs += [Out(f"blk.{bid}.ffn_gate_exps.weight", gate), Out(f"blk.{bid}.ffn_up_exps.weight", up)]
        return tset

    def gguf_name(self, name_map, hf_name: str) -> str | None:
        gname = super().gguf_name(name_map, hf_name)
        if gname is None and ".mlp." in hf_name:  # a dense layer: gguf's qwen*moe table has no ffn_gate/up/down
            gname = super().gguf_name(self._dense_names, hf_name)
        return gname

    def llama_cpp_limits(self, c: ArchContext) -> list[str]:
        out = []
        if bool(c.get("norm_topk_prob", default=False)) != self.renormalises:
            out.append(f"norm_topk_prob={c.get('norm_topk_prob', default=False)} (llama.cpp's {self.gguf_arch_name} "
                       f"always uses {self.renormalises})")
        if not all(sparse_layers(c)):
            dense = [i for i, s in enumerate(sparse_layers(c)) if not s]
            out.append(f"dense layers {dense} (mlp_only_layers / decoder_sparse_step; llama.cpp's "
                       f"{self.gguf_arch_name} has MoE layers only)")
        return out

    def hparams(self, w: gguf.GGUFWriter, c: ArchContext) -> None:
        common_hparams(w, c)
        moe_hparams(w, c)
        if (ff := c.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(int(ff))
        w.add_expert_weights_norm(bool(c.get("norm_topk_prob", default=False)))
        if not all(sparse_layers(c)):  # read by edgeinfer's torch engine (a --torch-only file)
            w.add_key_value("edgeinfer.moe_layers", [bool(s) for s in sparse_layers(c)],
                            gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)

    def shapes(self, c: ArchContext, bid):
        return {**super().shapes(c, bid),
                **moe_shapes(c, int(c.cfg["moe_intermediate_size"]), int(c.get("shared_expert_intermediate_size",
                                                                               default=0) or 0))}

    def layer_stems(self, c: ArchContext, bid: int) -> set[str] | None:
        if all(sparse_layers(c)):
            return None
        attn = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                "ffn_norm.weight"} | self._attn_extra()
        if not sparse_layers(c)[bid]:
            return attn | {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
        moe = {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"}
        if c.get("shared_expert_intermediate_size"):
            moe |= {"ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight", "ffn_gate_inp_shexp.weight"}
        return attn | moe

    def _attn_extra(self) -> set[str]:
        return {"attn_q.bias", "attn_k.bias", "attn_v.bias"}


class Qwen3MoeSpec(Qwen2MoeSpec):
    name = "qwen3_moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    renormalises = True
    dense_arch = gguf.MODEL_ARCH.QWEN3

    def _attn_extra(self) -> set[str]:
        return {"attn_q_norm.weight", "attn_k_norm.weight"}
