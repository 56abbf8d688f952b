"""Summarize a GGUF: architecture, hyperparameters, parameters (total and active per token), experts,
per-layer embeddings, bytes per quant type, tokenizer."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from edgeinfer.gguf_check import ArraySummary, GGUFFile, validate_gguf
from edgeinfer.units import fmt_bytes


def quant_label(h: GGUFFile) -> str:
    """A file's quant as users name it (``Q4_K_M``, ``Q8_0``): ``general.file_type`` if set, else
    the type of most 2-D tensors (like llama.cpp's guess, which counts tensors, but ignoring the
    1-D norms that are F32 in every file). Used by the backends' ModelInfo and the TUI's picker."""
    import gguf

    ft = h.metadata.get(gguf.Keys.General.FILE_TYPE)
    if isinstance(ft, int):
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts = Counter(t.qtype.name for t in h.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else "?"


def _stem(name: str) -> str:
    """``blk.3.ffn_down_exps.weight`` -> ``ffn_down_exps``; ``per_layer_token_embd.weight`` -> itself."""
    parts = name.split(".")
    return parts[2] if len(parts) > 3 and parts[0] == "blk" else parts[0]


def usage(h: GGUFFile) -> dict:
    """What one token reads of the model, from the GGUF keys and tensor names alone (any architecture).

    * experts: ``{arch}.expert_count`` routed experts per MoE layer (3-D ``*_exps`` tensors), of
      which ``expert_used_count`` run per token; shared experts from ``expert_shared_count``, or one
      per layer that has ``*_shexp`` tensors or a dense FFN beside its experts (Gemma 4's MLP);
    * active parameters / bytes per token: every tensor, except that routed experts count
      ``used / count`` of their size and tables read by row (``per_layer_token_embd``, and
      ``token_embd`` when a separate ``output`` exists) count one row;
    * per-layer embeddings: the PLE table's size and share of the file.
    """
    import gguf

    arch = h.architecture
    n_exp = int(h.metadata.get(f"{arch}.expert_count", 0) or 0)
    n_used = int(h.metadata.get(f"{arch}.expert_used_count", 0) or 0)
    names = {t.name for t in h.tensors}
    row_read = {"per_layer_token_embd"} | ({"token_embd"} if "output.weight" in names else set())
    total = active = total_b = active_b = 0
    exp_params = exp_layers = 0
    shared_layers: set[int] = set()
    ple = next((t for t in h.tensors if t.name == "per_layer_token_embd.weight"), None)
    for t in h.tensors:
        stem, n, b = _stem(t.name), t.n_elements, t.nbytes
        total, total_b = total + n, total_b + b
        if n_exp and stem.endswith("_exps") and len(t.shape) == 3 and t.shape[2] == n_exp and n_used:
            exp_params += n
            n, b = n * n_used // n_exp, b * n_used // n_exp
        elif stem in row_read and len(t.shape) == 2:
            n, b = t.shape[0], b // t.shape[1]
        active, active_b = active + n, active_b + b
        if stem.endswith("_shexp") or stem == "ffn_down":
            shared_layers.add(int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1)
    moe = None
    if n_exp:
        layers = {int(t.name.split(".")[1]) for t in h.tensors if t.name.startswith("blk.") and "_exps" in t.name}
        exp_layers = len(layers)
        shared = h.metadata.get(f"{arch}.expert_shared_count")
        shared = int(shared) if shared is not None else int(bool(layers) and layers <= shared_layers)
        moe = {"experts": n_exp, "active": n_used, "shared": shared, "layers": exp_layers, "expert_parameters": exp_params}
    out = {"parameters": total, "active_parameters": active, "tensor_bytes": total_b, "active_bytes": active_b,
           "moe": moe, "ple": None}
    if ple is not None:
        out["ple"] = {"parameters": ple.n_elements, "bytes": ple.nbytes, "type": gguf.GGMLQuantizationType(ple.qtype).name,
                      "file_share": round(ple.nbytes / h.file_size, 4) if h.file_size else 0.0,
                      "row_bytes": ple.nbytes // ple.shape[1]}
    return out


def kv_cache(h: GGUFFile, element_bytes: int = 2) -> dict | None:
    """KV-cache bytes one token costs over all layers (llama.cpp's default F16 cache), from the keys:

    * per layer ``head_count_kv x (key_length + value_length)`` (per-layer head counts, and the
      ``*_swa`` head sizes on sliding-window layers, where the file has them);
    * multi-head latent attention (``attention.kv_lora_rank``): the compressed latent plus the
      shared RoPE key, ``kv_lora_rank + rope_dimension_count`` per layer, whatever the head count;
    * the last ``attention.shared_kv_layers`` layers read an earlier layer's cache: not counted.

    Sliding-window layers hold at most ``sliding_window`` positions; they are counted in
    ``bytes_per_token`` (a short context) and listed apart so a long context's cost can be read off.
    None for files without attention hyperparameters.
    """
    a = h.architecture
    meta = h.metadata

    def key(name, default=None):
        return meta.get(f"{a}.{name}", default)

    n_layer, n_head, n_embd = key("block_count"), key("attention.head_count"), key("embedding_length")
    if not n_layer or not n_head or not n_embd:
        return None
    n_layer = int(n_layer)

    def per_layer(v, i):
        return v[i] if isinstance(v, (list, tuple)) else v

    n_kv = key("attention.head_count_kv", n_head)
    head = n_embd // per_layer(n_head, 0) if per_layer(n_head, 0) else 0
    k_len, v_len = key("attention.key_length", head), key("attention.value_length", head)
    swa = key("attention.sliding_window_pattern")
    window = key("attention.sliding_window")
    lora = key("attention.kv_lora_rank")
    own = n_layer - int(key("attention.shared_kv_layers", 0) or 0)
    total = sliding = sliding_layers = 0
    for i in range(own):
        is_swa = bool(per_layer(swa, i)) if isinstance(swa, (list, tuple)) else False
        if lora:
            per = int(lora) + int(key("rope.dimension_count", 0) or 0)
        else:
            kl = key("attention.key_length_swa", k_len) if is_swa else k_len
            vl = key("attention.value_length_swa", v_len) if is_swa else v_len
            per = int(per_layer(n_kv, i)) * (int(kl) + int(vl))
        total += per * element_bytes
        if is_swa and window:
            sliding += per * element_bytes
            sliding_layers += 1
    return {"bytes_per_token": total, "layers_with_cache": own, "shared_layers": n_layer - own,
            "latent": bool(lora), "element_bytes": element_bytes, "sliding_layers": sliding_layers,
            "sliding_bytes_per_token": sliding, "sliding_window": int(window) if window else None}


def summarize(path: str | Path, with_tensors: bool = False) -> dict:
    """Return a JSON-ready summary of the GGUF at ``path`` (validated first)."""
    h: GGUFFile = validate_gguf(path)
    arch = h.architecture
    hparams = {}
    for k, v in h.metadata.items():
        if k.startswith(arch + "."):
            hparams[k[len(arch) + 1:]] = _plain(v)
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    for t in h.tensors:
        d = by_type[t.qtype.name]
        d["tensors"] += 1
        d["bytes"] += t.nbytes
        d["params"] += t.n_elements
    n_params = sum(t.n_elements for t in h.tensors)
    tensor_bytes = sum(t.nbytes for t in h.tensors)
    for d in by_type.values():
        d["bits_per_weight"] = round(d["bytes"] * 8 / d["params"], 4) if d["params"] else 0.0
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    out = {
        "path": str(h.path),
        "gguf_version": h.version,
        "name": h.metadata.get("general.name"),
        "architecture": arch,
        "file_type": h.metadata.get("general.file_type"),
        "quant": quant_label(h),
        "hyperparameters": hparams,
        "parameters": n_params,
        "file_size": h.file_size,
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": round(tensor_bytes * 8 / n_params, 4) if n_params else 0.0,
        "tensor_count": len(h.tensors),
        "types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "tokenizer": {
            "model": h.metadata.get("tokenizer.ggml.model"),
            "pre": h.metadata.get("tokenizer.ggml.pre"),
            "vocab_size": tokens.length if isinstance(tokens, ArraySummary) else len(tokens or []),
            "bos_token_id": h.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": h.metadata.get("tokenizer.ggml.eos_token_id"),
        },
        "chat_template": isinstance(h.metadata.get("tokenizer.chat_template"), str),
    }
    use = usage(h)
    out.update({"active_parameters": use["active_parameters"], "active_bytes": use["active_bytes"],
                "experts": use["moe"], "per_layer_embeddings": use["ple"], "kv_cache": kv_cache(h)})
    if with_tensors:
        out["tensors"] = [{"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.nbytes}
                          for t in h.tensors]
    return out


def _plain(v):
    if isinstance(v, ArraySummary):
        return f"[{v.item_type.name} x {v.length}]"
    return v


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_text(s: dict) -> str:
    """Human-readable form of :func:`summarize`'s result."""
    lines = [
        f"file:          {s['path']} (GGUF v{s['gguf_version']}, {fmt_bytes(s['file_size'], unit='MiB')})",
        f"name:          {s['name']}",
        f"architecture:  {s['architecture']}",
        f"parameters:    {_fmt_params(s['parameters'])} ({s['parameters']:,})",
        f"tensors:       {s['tensor_count']}, {s['tensor_bytes']:,} bytes, {s['bits_per_weight']:.2f} bits/weight",
        f"per token:     {_fmt_params(s['active_parameters'])} active parameters of {_fmt_params(s['parameters'])}, "
        f"{fmt_bytes(s['active_bytes'], unit='MiB')} of weights read",
        f"tokenizer:     {s['tokenizer']['model']} (pre: {s['tokenizer']['pre']}), "
        f"{s['tokenizer']['vocab_size']} tokens, bos={s['tokenizer']['bos_token_id']} eos={s['tokenizer']['eos_token_id']}",
        f"chat template: {'yes' if s['chat_template'] else 'no'}",
        "hyperparameters:",
    ]
    if (e := s.get("experts")) is not None:
        lines.insert(5, f"experts:       {e['experts']} per MoE layer ({e['layers']} layers), {e['active']} active per token, "
                        f"{e['shared']} shared; {_fmt_params(e['expert_parameters'])} expert parameters")
    if (p := s.get("per_layer_embeddings")) is not None:
        lines.insert(5, f"per-layer embeddings: {_fmt_params(p['parameters'])} parameters, {p['type']}, "
                        f"{fmt_bytes(p['bytes'], unit='MiB')} = {100 * p['file_share']:.1f}% of the file "
                        f"(one {fmt_bytes(p['row_bytes'])} row read per token)")
    if (kv := s.get("kv_cache")) is not None:
        what = "latent (MLA) " if kv["latent"] else ""
        line = (f"KV cache:      {fmt_bytes(kv['bytes_per_token'])} per token at F16, {what}in {kv['layers_with_cache']} "
                f"layers" + (f" ({kv['shared_layers']} more reuse earlier layers')" if kv["shared_layers"] else ""))
        if kv["sliding_layers"]:
            line += (f"; {kv['sliding_layers']} sliding-window layers ({fmt_bytes(kv['sliding_bytes_per_token'])} of it) "
                     f"keep at most {kv['sliding_window']} tokens")
        lines.insert(5, line)
    lines += [f"  {k:<36} {v}" for k, v in s["hyperparameters"].items()]
    lines.append("types:")
    lines.append(f"  {'TYPE':<8} {'TENSORS':>7} {'BYTES':>14} {'PARAMS':>12} {'BPW':>7}")
    for name, d in s["types"].items():
        lines.append(f"  {name:<8} {d['tensors']:>7} {d['bytes']:>14,} {d['params']:>12,} {d['bits_per_weight']:>7.3f}")
    if "tensors" in s:
        lines.append("tensors:")
        w = max(len(t["name"]) for t in s["tensors"])
        for t in s["tensors"]:
            lines.append(f"  {t['name']:<{w}} {str(tuple(t['shape'])):<22} {t['type']:<6} {t['bytes']:>12,}")
    return "\n".join(lines)
