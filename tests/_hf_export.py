"""Turn the embedded default GGUF (SmolLM2-135M-Instruct) into a real Hugging Face checkpoint.

transformers can read a GGUF (``from_pretrained(dir, gguf_file=...)``: weights dequantized to
float, tokenizer rebuilt as a fast tokenizer) but refuses to ``save_pretrained`` a GGUF-loaded
model, so the state dict is copied into a fresh model of the same config (without the
``quantization_config``) and that is saved, with the tokenizer, as safetensors.

Usage::

    import _hf_export
    folder = _hf_export.export_default_checkpoint(tmp_dir)  # cached per process

The ``hf_default_checkpoint`` session fixture in conftest.py builds it once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

_CACHE: dict[str, Path] = {}


def export_default_checkpoint(out_dir, dtype: str = "float32") -> Path:
    """Export the default model as an HF checkpoint folder (config, safetensors, tokenizer).

    Args:
        out_dir: folder to create; reused if it already holds a finished export.
        dtype: dtype of the saved weights ("float32" keeps the dequantized values exactly).
    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    key = f"{out.resolve()}:{dtype}"
    if key in _CACHE:
        return _CACHE[key]
    done = out / ".export-complete"
    if done.is_file():
        _CACHE[key] = out
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeinfer.resolve import default_model_path

    g = default_model_path()
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = ["LlamaForCausalLM"]
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    # the model card name, so the converter's default file name is the real one
    (out / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# SmolLM2-135M-Instruct\n")
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json.setdefault("_name_or_path", "SmolLM2-135M-Instruct")
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2))
    del loaded, fresh
    done.write_text("ok")
    _CACHE[key] = out
    return out
