"""The conversion pipeline: checkpoint -> plan -> GGUF, one tensor at a time.

``plan_conversion`` reads only headers and JSON (config, safetensors headers, tokenizer) and decides
every output tensor's name, shape and type; ``write_gguf`` then writes the GGUF header, metadata
and tensor table, streams each tensor (read from its memory map -> float32 -> fix-ups -> encoder ->
file) and renames the temporary file into place only once everything is written.

Data flow: source.py (files) -> archs/<arch>.py, a spec (spec.py: metadata, the GGUF tensors
and the row sources (rows.py) they read) -> vocab.py (tokenizer) -> policy.py (types) -> imatrix
(per-tensor importance weights, optional) -> quantizers.py (bytes, a chunk of rows at a time) ->
gguf.GGUFWriter.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from edgeinfer.errors import ConversionError
from edgeinfer.gguf_check import TORCH_ONLY_PREFIX
from edgeinfer.quant.archs import find_arch, text_config
from edgeinfer.quant.imatrix import Imatrix, ImatrixError, load_imatrix
from edgeinfer.quant.policy import (FILE_TYPES, Policy, RecipePolicy, TensorPlanInput, TypeDecision, default_policy,
                                    recipe_names)
from edgeinfer.quant.quantizers import REGISTRY, encode_row_chunks, uses_imatrix
from edgeinfer.quant.rows import RowSource, Rows
from edgeinfer.quant.source import ST_DTYPES, Checkpoint, TensorRef, open_checkpoint
from edgeinfer.quant.spec import ArchContext, ArchSpec, Out, kind_of
from edgeinfer.quant.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass
class PlannedTensor:
    """One output tensor: where its rows come from, what it becomes."""

    gguf_name: str
    shape: tuple[int, ...]  # output shape, numpy order [rows, cols] ([n_expert, rows, cols] when stacked)
    decision: TypeDecision
    source: RowSource
    kind: gguf.MODEL_TENSOR | None = None
    importance: np.ndarray | None = None  # imatrix weights [cols] for the weighted encoder, if used
    imatrix_note: str = ""  # --dry-run: "used", "no entry", "ignored by Q8_0", ...

    @property
    def ggml_type(self) -> T:
        return self.decision.ggml_type

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        bs, ts = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // bs * ts


@dataclass
class ConversionPlan:
    checkpoint: Checkpoint
    spec: ArchSpec
    ctx: ArchContext
    vocab: Vocab
    qtype: str
    file_type: gguf.LlamaFileType
    tensors: list[PlannedTensor] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    imatrix_path: Path | None = None  # the importance matrix the plan uses (None: none)
    hparams: dict = field(default_factory=dict)  # the architecture's metadata keys, recorded at plan time
    torch_only: list[str] = field(default_factory=list)  # why stock llama.cpp cannot run it (--torch-only)

    @property
    def arch_name(self) -> str:
        """``general.architecture``: the spec's, or ``edgeinfer-<arch>`` for a file stock llama.cpp
        must refuse (it cannot run the config right; see :meth:`ArchSpec.llama_cpp_limits`)."""
        return TORCH_ONLY_PREFIX + self.spec.gguf_arch_name if self.torch_only else self.spec.gguf_arch_name

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_f32_bytes(self) -> int:
        return max((t.n_elements * 4 for t in self.tensors), default=0)


# --------------------------------------------------------------------------- planning


def _record_hparams(spec: ArchSpec, ctx: ArchContext, arch_name: str) -> dict:
    """Run the spec's metadata writer on an in-memory ``GGUFWriter``; its keys, in order."""
    rec = gguf.GGUFWriter(path=None, arch=arch_name)
    before = set(rec.kv_data[0])
    spec.hparams(rec, ctx)
    return {k: v for k, v in rec.kv_data[0].items() if k not in before}


def _first_ref(src: RowSource) -> TensorRef | None:
    refs = src.refs
    return refs[0] if refs else None


def _check_shape(spec: ArchSpec, ctx: ArchContext, out: Out, kind, bid, shape: tuple[int, ...]) -> None:
    part = out.name.rsplit(".", 1)[-1]  # weight, bias, scale
    want = spec.shapes(ctx, bid).get((kind, part))
    if want is not None and tuple(shape) != tuple(want):
        ref = _first_ref(out.source)
        what = (f"{ref.file}: tensor {ref.name!r} has shape {list(ref.shape)}" if ref is not None and len(out.source.refs) == 1
                else f"tensor {out.name} ({out.source.describe()}) has shape {list(shape)}")
        raise ConversionError(f"{what} but config.json implies {list(want)}; the weights do not match the config")


def _check_layers(spec: ArchSpec, ctx: ArchContext, seen: dict[int, set[str]], where: Path) -> None:
    """Every layer has the tensors the spec expects of it (by default: the same as layer 0)."""
    first = seen.get(0, set())
    for b in range(ctx.n_layers):
        want = spec.layer_stems(ctx, b)
        want = first if want is None else want
        have = seen.get(b, set())
        if have != want or not want:
            missing = sorted(want - have) or ["all tensors"]
            extra = sorted(have - want)
            if not (want - have) and extra:
                raise ConversionError(f"{where}: layer {b} has unexpected tensors {', '.join(extra)} for "
                                      f"architecture {spec.name}; the checkpoint does not match its config.json")
            raise ConversionError(f"{where}: layer {b} is missing {', '.join(missing)}; the checkpoint is "
                                  f"incomplete (a missing shard?)")


def plan_conversion(src: str | os.PathLike, qtype: str = "Q8_0", policy: Policy = default_policy,
                    offline: bool | None = None, imatrix: str | os.PathLike | None = None,
                    torch_only: bool = False) -> ConversionPlan:
    """Decide everything about the output without reading any tensor data.

    Args:
        src: checkpoint folder or hub repo id.
        qtype: one of :data:`edgeinfer.quant.policy.FILE_TYPES` (or a type a recipe understands).
        policy: per-tensor type decision (:func:`default_policy` reproduces llama.cpp).
        imatrix: a llama.cpp importance-matrix file (GGUF or legacy .dat), used as
            ``llama-quantize --imatrix`` uses it (see :func:`assign_imatrix`).
        torch_only: write a config stock llama.cpp cannot run correctly anyway, as a file only
            edgeinfer's torch engine loads (``general.architecture = edgeinfer-<arch>``).
    Raises:
        ConversionError: bad input of any kind (missing files, unknown arch, bad shapes, dtypes,
            a config the architecture's metadata cannot express, or one stock llama.cpp would
            run wrong without ``torch_only``, an unreadable imatrix or one computed for another model).
    """
    qtype = qtype.upper()
    mixes = recipe_names()
    if qtype in FILE_TYPES:
        base_type, file_type = T[qtype], FILE_TYPES[qtype]
    elif qtype in mixes:
        base_type, file_type = mixes[qtype]
    else:
        raise ConversionError(f"unknown --qtype {qtype!r}; choose one of {', '.join([*FILE_TYPES, *mixes])}")
    im = _read_imatrix(imatrix) if imatrix is not None else None
    ck = open_checkpoint(src, offline=offline)
    spec = find_arch(ck.config, str(ck.path / "config.json"))
    cfg = text_config(ck.config)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        v = cfg.get(key)
        per_layer = key == "intermediate_size" and isinstance(v, list) and v and all(isinstance(x, int) for x in v)
        if not isinstance(v, int) and not per_layer:  # Gemma 3n lists one FFN width per layer
            raise ConversionError(f"{ck.path / 'config.json'}: missing or invalid {key!r}")
    # The 4/5-bit legacy types follow llama-quantize, so the recipe engine, which has all its rules
    # (tensors never quantized, the tied token_embd category incl. per_layer_token_embd, the 8-expert
    # attn_k/attn_v bumps; with an imatrix the imatrix-only ffn_down rule, also for Q8_0).
    by_recipe = qtype in mixes or base_type not in (T.F32, T.F16, T.BF16, T.Q8_0) or (
        im is not None and base_type not in (T.F32, T.F16, T.BF16))
    if by_recipe and policy is default_policy:
        policy = RecipePolicy(qtype, int(cfg.get("num_hidden_layers") or 0), spec.gguf_arch_name,
                              int(cfg.get("num_attention_heads") or 1),
                              int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 1),
                              ArchContext(cfg, 0).n_experts,
                              has_imatrix=im is not None)
    n_layers = int(cfg["num_hidden_layers"])
    vocab = spec.vocab(ck.path, int(cfg.get("vocab_size") or 0))
    ctx = ArchContext(cfg, len(vocab))
    spec.check(ctx)
    limits = spec.llama_cpp_limits(ctx)
    if limits and not torch_only:
        raise ConversionError(f"{ck.path / 'config.json'}: stock llama.cpp cannot run this {spec.name} config "
                              f"correctly: {'; '.join(limits)}. Pass --torch-only to write a file only edgeinfer's "
                              f"torch engine runs (llama.cpp, Ollama and LM Studio will refuse it)")
    tie = bool(cfg.get("tie_word_embeddings", ck.config.get("tie_word_embeddings", False)))
    tset = spec.tensors(ck, ctx)
    has_output = any(o.name == "output.weight" for o in tset.outs) and not tie
    plan = ConversionPlan(ck, spec, ctx, vocab, qtype, file_type, skipped=list(tset.skipped),
                          torch_only=list(limits) if torch_only else [])
    seen_blocks: dict[int, set[str]] = {}
    for out in tset.outs:
        if out.name == "output.weight" and not has_output:
            plan.skipped.extend(r.name for r in out.source.refs)  # tied to token_embd
            continue
        for ref in out.source.refs:
            if ref.dtype not in ST_DTYPES:
                raise ConversionError(
                    f"{ref.file}: tensor {ref.name!r} has dtype {ref.dtype}; only F32, F16 and BF16 weights can be "
                    f"converted (re-save the checkpoint in bfloat16/float16/float32)")
        kind, bid = kind_of(out.name)
        source = out.source
        if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT) and not out.name.endswith(".bias"):
            rows, ref = source.shape[0], _first_ref(source)
            where = f"{ref.file}: {ref.name}" if ref is not None else out.name
            if rows < len(vocab):
                raise ConversionError(f"{where} has {rows} rows but the tokenizer has "
                                      f"{len(vocab)} tokens; the tokenizer does not belong to this model")
            if rows > len(vocab):
                if spec.trims_vocab:
                    log.info("%s: keeping the first %d of %d rows (tokenizer size)", out.name, len(vocab), rows)
                    source = Rows(source, 0, len(vocab))
                else:
                    vocab.pad_to(rows)
                    ctx.n_vocab = len(vocab)
            if tuple(source.shape) != (source.shape[0], ctx.hidden):
                raise ConversionError(f"{where} has shape {list(source.shape)} but config.json implies "
                                      f"{[source.shape[0], ctx.hidden]}; the weights do not match the config")
        else:
            _check_shape(spec, ctx, out, kind, bid, tuple(source.shape))
        if bid is not None:
            if bid >= n_layers:
                ref = _first_ref(source)
                raise ConversionError(f"{ref.file if ref else ck.path}: tensor {ref.name if ref else out.name!r} is in "
                                      f"layer {bid} but config.json has {n_layers} layers")
            seen_blocks.setdefault(bid, set()).add(out.name.split(".", 2)[2])
        plan.tensors.append(PlannedTensor(out.name, tuple(source.shape), TypeDecision(base_type), source, kind))

    _check_layers(spec, ctx, seen_blocks, ck.path)
    plan.hparams = _record_hparams(spec, ctx, plan.arch_name)  # after vocab padding: hparams may read n_vocab
    if plan.torch_only:
        plan.hparams["edgeinfer.torch_only"] = gguf.GGUFValue("; ".join(plan.torch_only), gguf.GGUFValueType.STRING)
        log.warning("writing a file only edgeinfer's torch engine runs (%s): %s", plan.arch_name,
                    "; ".join(plan.torch_only))

    # A canonical order (embeddings, layers in order, output), independent of how the checkpoint is sharded.
    def order(t: PlannedTensor):
        bid = kind_of(t.gguf_name)[1]
        head = t.kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.ROPE_FREQS)
        return (-1 if head else bid if bid is not None else n_layers, t.gguf_name)

    plan.tensors.sort(key=order)
    if not any(t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD for t in plan.tensors):
        raise ConversionError(f"{ck.path}: no token embedding tensor found; the checkpoint is incomplete")
    inputs = [TensorPlanInput(t.gguf_name, t.shape, t.kind, kind_of(t.gguf_name)[1], n_layers,
                              base_type, tied_output=not has_output) for t in plan.tensors]
    # A policy sees one tensor at a time, unless it offers decide_all (whole-model rules such as
    # llama.cpp's attn_v counting in the K-quant recipes): then it sees them all, in this order.
    decide_all = getattr(policy, "decide_all", None)
    decisions = decide_all(inputs) if decide_all is not None else [policy(i) for i in inputs]
    if len(decisions) != len(inputs):
        raise ConversionError(f"type policy returned {len(decisions)} decisions for {len(inputs)} tensors")
    for t, d in zip(plan.tensors, decisions):
        if d.ggml_type not in REGISTRY and d.encoder is None:
            raise ConversionError(f"{t.gguf_name}: no encoder for type {d.ggml_type.name} is available")
        t.decision = d
    if im is not None:
        plan.imatrix_path = Path(imatrix)
        assign_imatrix(plan.tensors, im, plan.imatrix_path)
    return plan


# --------------------------------------------------------------------------- importance matrix


def _read_imatrix(path: str | os.PathLike) -> Imatrix:
    try:
        return load_imatrix(path)
    except ImatrixError as e:
        raise ConversionError(f"--imatrix: {e}") from None


def assign_imatrix(tensors: list[PlannedTensor], im: Imatrix, path: Path) -> None:
    """Give every planned tensor its importance weights, as ``llama_model_quantize`` looks them up.

    * an entry with a non-finite value refuses the whole file (llama.cpp throws at load);
    * a quantized tensor (anything not kept F32) with an entry of the wrong size is an error
      (the imatrix belongs to another model), except the token embedding, which is skipped
      (llama.cpp's exception: the embedding is read by row, not multiplied);
    * a tensor without an entry is logged and encoded without weights;
    * the weights reach the encoder only where the type has a weighted encoder (K-quants,
      Q4_0/Q4_1/Q5_0/Q5_1); Q8_0 and float types ignore them, as ggml does.
    Sets ``importance`` and ``imatrix_note`` on each tensor.

    Raises:
        ConversionError: non-finite values, or an entry whose size does not fit its tensor.
    """
    for name, e in im.entries.items():
        if not np.isfinite(e.sums).all():
            raise ConversionError(f"{path}: imatrix entry {name} contains non-finite values; recompute the "
                                  f"imatrix (`edgeinfer imatrix`)")
    used = missing = 0
    names = set()
    for t in tensors:
        if t.ggml_type == T.F32:
            continue  # kept as is (norms, 1-D tensors): llama.cpp never looks them up
        w = im.weights(t.gguf_name)
        if w is None:
            if uses_imatrix(t.ggml_type):
                missing += 1
                t.imatrix_note = "no entry"
                log.info("%s: no imatrix entry in %s; quantized without importance weights", t.gguf_name, path)
            continue
        names.add(t.gguf_name)
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        if w.size != t.shape[-1] * n_mat:
            what = (f"{path}: imatrix entry {t.gguf_name} has {w.size} values but the tensor {list(t.shape)} "
                    f"needs {t.shape[-1] * n_mat}")
            if t.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
                log.warning("%s; ignoring it for the token embedding (as llama.cpp)", what)
                t.imatrix_note = "wrong size, ignored"
                continue
            raise ConversionError(f"{what}; the imatrix was computed for another model (recompute it with "
                                  f"`edgeinfer imatrix` on this model)")
        if uses_imatrix(t.ggml_type):
            t.importance, t.imatrix_note = w, "used"
            used += 1
        else:
            t.imatrix_note = f"ignored by {t.ggml_type.name}"
    if not names:
        log.warning("%s: none of its %d entries names a tensor of this model; quantizing without importance "
                    "weights", path, len(im.entries))
    log.info("imatrix %s: %d tensors weighted, %d without an entry", path, used, missing)


# --------------------------------------------------------------------------- naming and metadata


def _metadata(plan: ConversionPlan) -> gguf.Metadata:
    ck = plan.checkpoint
    md = gguf.Metadata.load(None, ck.path, None, plan.n_params)
    if ck.repo_id:
        # a hub snapshot folder is named by its commit hash: take the naming parts from the repo id
        full, org, base, finetune, version, size = gguf.Metadata.get_model_id_components(ck.repo_id, plan.n_params)
        md.name, md.organization, md.basename, md.finetune, md.version = full, org, base, finetune, version
        md.size_label = size or md.size_label
    if md.name is None:
        md.name = ck.path.name
    if md.size_label is None:
        md.size_label = gguf.size_label(plan.n_params, 0, 0, 0)
    return md


def default_output_name(plan: ConversionPlan) -> str:
    """``<Name>-<Size>-<QTYPE>.gguf`` as llama.cpp names its files (``gguf.naming_convention``)."""
    md = _metadata(plan)
    return gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, plan.qtype) + ".gguf"


def _build_writer(plan: ConversionPlan) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path=None, arch=plan.arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    _metadata(plan).set_gguf_meta_model(w)
    for key, value in plan.hparams.items():  # recorded at plan time by the spec
        w.kv_data[0][key] = value
    w.add_file_type(plan.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan.vocab.add_to_gguf(w)
    for t in plan.tensors:
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    return w


# --------------------------------------------------------------------------- writing


class StreamedTensor:
    """Encoded tensor data produced chunk by chunk while it is written.

    ``GGUFWriter.write_tensor_data`` only needs ``nbytes`` and ``tofile``; handing it this object
    instead of an array means the encoded tensor never exists in memory as a whole.
    """

    def __init__(self, chunks: Iterator[np.ndarray], nbytes: int, on_chunk: Callable[[int], None] | None = None):
        self.chunks, self.nbytes, self.on_chunk = chunks, nbytes, on_chunk

    def tofile(self, fout) -> None:
        written = 0
        for c in self.chunks:
            c.tofile(fout)
            written += c.nbytes
            if self.on_chunk is not None:
                self.on_chunk(c.nbytes)
        if written != self.nbytes:
            raise ConversionError(f"internal error: wrote {written} of {self.nbytes} bytes for a tensor")


def encode_chunks(src: RowSource, ggml_type: T, n_threads: int | None = None,
                  importance: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The encoded bytes of a row source, chunk by chunk in order (``uint8 [rows, row_bytes]`` each).

    Rows are read, fixed up and encoded a chunk at a time by the worker threads
    (:func:`~edgeinfer.quant.quantizers.encode_row_chunks`), whatever the source's shape: a 3-D
    stack of experts is ``n_expert * rows`` rows.
    """
    with src.open() as read:
        for _, enc in encode_row_chunks(read, src.rows, src.cols, ggml_type, n_threads, importance):
            yield enc


def encode_tensor(plan: ConversionPlan, t: PlannedTensor, n_threads: int | None = None) -> np.ndarray:
    """Bytes of one tensor in its planned type (``uint8``, ``t.nbytes`` long), all in memory."""
    if t.decision.encoder is not None:  # a recipe's own encoder takes the whole matrix
        x = t.source.read_all()
        x2 = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)  # [rows, cols]
        return np.asarray(t.decision.encoder(x2.contiguous()), dtype=np.uint8).reshape(-1)
    return np.concatenate([c.reshape(-1) for c in encode_chunks(t.source, t.ggml_type, n_threads, t.importance)])


def tensor_data(plan: ConversionPlan, t: PlannedTensor, n_threads: int | None = None,
                on_chunk: Callable[[int], None] | None = None):
    """What to hand the writer for one tensor: a :class:`StreamedTensor` (the encoded rows, chunk
    by chunk), or the whole array when the tensor's recipe brings its own encoder."""
    if t.decision.encoder is None:
        return StreamedTensor(encode_chunks(t.source, t.ggml_type, n_threads, t.importance), t.nbytes, on_chunk)
    data = encode_tensor(plan, t, n_threads)
    if on_chunk is not None:
        on_chunk(data.nbytes)
    return data


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                disable=not enabled, dynamic_ncols=True)


def write_gguf(plan: ConversionPlan, out: Path, force: bool = False, progress: bool = True,
               n_threads: int | None = None) -> Path:
    """Write the planned GGUF to ``out`` through a temporary file in the same folder.

    Raises:
        ConversionError: ``out`` exists and ``force`` is False, or the folder is not writable.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: output folder does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    w = _build_writer(plan)
    t0 = time.perf_counter()
    try:
        try:
            w.write_header_to_file(path=tmp)
        except OSError as e:
            raise ConversionError(f"{out.parent}: cannot write the output ({e.strerror})") from None
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with _progress(plan.nbytes, progress) as bar:
            for t in plan.tensors:
                w.write_tensor_data(tensor_data(plan, t, n_threads, on_chunk=bar.update))
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    log.info("wrote %s (%.1f MiB) in %.1f s", out, out.stat().st_size / 2**20, time.perf_counter() - t0)
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike | None = None, qtype: str = "Q8_0", *,
            force: bool = False, policy: Policy = default_policy, progress: bool = False,
            offline: bool | None = None, n_threads: int | None = None,
            imatrix: str | os.PathLike | None = None, torch_only: bool = False) -> Path:
    """Convert a checkpoint to GGUF (library entry point; the CLI is ``edgeinfer convert``).

    Args:
        src: checkpoint folder or hub repo id.
        out: output file, or a folder (the llama.cpp-style default name is used inside), or None
            (default name in the current folder).
        qtype: F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, or a llama.cpp mix from ``recipes.py``
            (Q4_K_M, Q5_K_S, Q6_K, ...).
        imatrix: optional llama.cpp importance-matrix file (``edgeinfer imatrix``, ``llama-imatrix``).
        torch_only: see :func:`plan_conversion`.
    Returns:
        The path written.
    """
    plan = plan_conversion(src, qtype, policy, offline=offline, imatrix=imatrix, torch_only=torch_only)
    if out is None:
        out = Path.cwd() / default_output_name(plan)
    else:
        out = Path(out)
        if out.is_dir():
            out = out / default_output_name(plan)
    return write_gguf(plan, out, force=force, progress=progress, n_threads=n_threads)
