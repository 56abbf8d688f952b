"""Which llama.cpp buffer type holds each weight: the safety policy, tensor overrides, a safe ``Llama``.

llama.cpp puts a CPU weight into the first *extra* buffer type that can multiply with it (AMX,
then KleidiAI, then CPU_REPACK), else into plain CPU memory. ggml's AMX matrix multiply crashes
(``ggml_backend_amx_mul_mat``, llama.cpp issue 20824), so edgeinfer never lets llama.cpp choose
AMX unless the user opts in:

* no unsafe extra buffer type on this CPU (or ``EDGEINFER_LLAMA_AMX=1``): llama.cpp's own choice;
* otherwise: ``use_extra_bufts = False`` plus one tensor override per group of weights that a
  *safe* extra buffer type (CPU_REPACK) supports, so repacking is kept where llama.cpp would
  have used it. Which weights those are is asked of ggml itself
  (:meth:`~edgeinfer.backends.ggml_registry.Ggml.supports_weight`);
* ``EDGEINFER_LLAMA_REPACK=0``: no extra buffer type at all (plain CPU buffers).

Overrides are llama.cpp's ``tensor_buft_overrides`` (``-ot REGEX=BUFT`` in its CLI): a
NULL-terminated array of ``{pattern, buft}``; the first pattern that ``std::regex_search`` finds
in a tensor name wins, and a ``CPU`` target means "CPU, extra buffer types included"
(src/llama-model-loader.cpp). :class:`TensorOverride` and :func:`plan_placement` take overrides
from callers too (e.g. experts kept on the CPU), so the same machinery serves expert offload.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import gguf

from edgeinfer.errors import EdgeinferError

log = logging.getLogger(__name__)

ENV_AMX = "EDGEINFER_LLAMA_AMX"  # 1: allow the AMX buffer type
ENV_REPACK = "EDGEINFER_LLAMA_REPACK"  # 0: no extra CPU buffer types at all
# Extra buffer types llama.cpp offers but edgeinfer does not use unless asked: name -> why.
UNSAFE_BUFFER_TYPES = {"AMX": "ggml's AMX matrix multiply crashes (llama.cpp issue 20824)"}

_T = gguf.MODEL_TENSOR
# Weights llama.cpp multiplies with (GGML_OP_MUL_MAT in LLM_TENSOR_INFOS, src/llama-arch.cpp): the
# only ones an extra buffer type can hold. Stacked experts use GGML_OP_MUL_MAT_ID.
MATMUL_TENSORS = (_T.OUTPUT, _T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_QKV, _T.ATTN_OUT, _T.FFN_GATE, _T.FFN_UP,
                  _T.FFN_DOWN, _T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP, _T.FFN_DOWN_SHEXP, _T.ATTN_Q_A, _T.ATTN_Q_B,
                  _T.ATTN_KV_A_MQA, _T.ATTN_KV_B)
EXPERT_TENSORS = (_T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP, _T.FFN_GATE_UP_EXP, _T.FFN_GATE_CHEXP,
                  _T.FFN_UP_CHEXP, _T.FFN_DOWN_CHEXP)


def _name_regex(kinds) -> re.Pattern:
    alts = [re.escape(gguf.TENSOR_NAMES[k]).replace(re.escape("{bid}"), r"\d+") for k in kinds]
    return re.compile(r"^(?:" + "|".join(alts) + r")\.weight$")


_MATMUL_RE = _name_regex(MATMUL_TENSORS)
_EXPERT_RE = _name_regex(EXPERT_TENSORS)


# -- what the machine offers ---------------------------------------------------------------------
@dataclass(frozen=True)
class CpuReport:
    """What ggml reports: the CPU's extra buffer types (llama.cpp's order of preference), the CPU
    backend's features and whether a GPU device is registered. Tests build fake ones."""

    extra: tuple[str, ...] = ()
    features: Mapping[str, str] = field(default_factory=dict)
    gpu: bool = False

    @classmethod
    def query(cls) -> "CpuReport":
        """Ask ggml (see :mod:`edgeinfer.backends.ggml_registry`)."""
        from edgeinfer.backends.ggml_registry import ggml

        g = ggml()
        cpu = g.cpu_device()
        if cpu is None:
            return cls()
        devs = g.devices()
        return cls(tuple(n for n, _ in g.extra_buffer_types(cpu)), g.features(cpu),
                   any(d.kind in ("gpu", "igpu") for d in devs))

    @property
    def unsafe(self) -> tuple[str, ...]:
        return tuple(b for b in self.extra if b in UNSAFE_BUFFER_TYPES)


@dataclass(frozen=True)
class BufferPolicy:
    """What the user allows: the AMX buffer type (opt-in) and extra buffer types at all (opt-out)."""

    allow_amx: bool = False
    allow_extra: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "BufferPolicy":
        """Read ``EDGEINFER_LLAMA_AMX`` (default 0) and ``EDGEINFER_LLAMA_REPACK`` (default 1).

        Raises:
            EdgeinferError: a value other than 0/1 (or false/true, no/yes, off/on).
        """
        env = os.environ if env is None else env
        return cls(allow_amx=_flag(env, ENV_AMX, False), allow_extra=_flag(env, ENV_REPACK, True))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise EdgeinferError(f"{name}={env[name]!r}: use 1 or 0")


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorOverride:
    """Tensors whose name contains a match of ``pattern`` (ECMAScript regex, ``std::regex_search``)
    go to buffer type ``buffer_type`` (``CPU``, ``CPU_REPACK``, ``CUDA0``...)."""

    pattern: str
    buffer_type: str


@dataclass(frozen=True)
class Placement:
    """How to load: llama.cpp's ``use_extra_bufts`` flag and its tensor overrides, with why.

    ``kept``: the extra buffer types weights may go to; ``excluded``: those present but refused.
    """

    use_extra_bufts: bool
    overrides: tuple[TensorOverride, ...] = ()
    kept: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """One line for ``--stats`` / ``inspect``, e.g. ``AMX not used (EDGEINFER_LLAMA_AMX=1 allows it); ...``."""
        parts = [self.reason] if self.reason else []
        if self.kept:
            parts.append("extra buffer types: " + ", ".join(self.kept))
        if self.overrides:
            parts.append(f"{len(self.overrides)} tensor override(s)")
        return "; ".join(parts) or "plain CPU buffers"


Supports = Callable[[str, object], bool]  # (buffer type name, TensorEntry) -> can it hold the weight


def plan_placement(report: CpuReport, policy: BufferPolicy, tensors: Iterable = (), *,
                   supports: Supports | None = None, n_expert_used: int = 0, offload: bool = False,
                   user: Sequence[TensorOverride] = ()) -> Placement:
    """Decide the buffer types for a model with tensor table ``tensors`` (:class:`~edgeinfer.gguf_check.TensorEntry`).

    Args:
        report: what the machine offers (:meth:`CpuReport.query`, or a fake one).
        policy: what the user allows (:meth:`BufferPolicy.from_env`).
        tensors: the GGUF's tensors; needed only when an extra buffer type is excluded.
        supports: the weight probe; default :meth:`Ggml.supports_weight` (``n_expert_used`` for experts).
        offload: layers go to a GPU; then no CPU weight is moved to an extra buffer type by edgeinfer.
        user: the caller's overrides; they win (first match), and a ``CPU`` target still gets
            the kept extra buffer types where they fit, as in llama.cpp.
    """
    if not policy.allow_extra:
        return Placement(False, tuple(user), (), report.extra,
                         f"no extra buffer types ({ENV_REPACK}=0)" if report.extra else "")
    excluded = tuple(b for b in report.unsafe if not (b == "AMX" and policy.allow_amx))
    kept = tuple(b for b in report.extra if b not in excluded)
    if not excluded:
        why = "AMX allowed (" + ENV_AMX + "=1)" if "AMX" in report.extra else "llama.cpp's choice"
        return Placement(True, tuple(user), kept, (), why)
    why = (f"{', '.join(excluded)} not used: {UNSAFE_BUFFER_TYPES[excluded[0]]}; "
           f"{ENV_AMX}=1 allows it")
    if offload or not kept:
        return Placement(False, tuple(user), (), excluded, why)
    if supports is None:
        supports = _ggml_supports(n_expert_used)
    chosen: dict[str, list[str]] = {}
    for t in tensors:
        if not (_MATMUL_RE.match(t.name) or _EXPERT_RE.match(t.name)):
            continue
        target = next((o.buffer_type for o in user if re.search(o.pattern, t.name)), "CPU")
        if target != "CPU":
            continue
        buft = next((b for b in kept if supports(b, t)), None)
        if buft is not None:
            chosen.setdefault(buft, []).append(t.name)
    ours = tuple(TensorOverride(p, b) for b, names in chosen.items() for p in group_patterns(names))
    return Placement(False, ours + tuple(user), tuple(chosen), excluded, why)


def predict_buffers(placement: Placement, report: CpuReport, tensors: Iterable, *,
                    supports: Supports | None = None, n_expert_used: int = 0) -> dict[str, str]:
    """Tensor name -> the buffer type llama.cpp will put it in under ``placement`` (CPU only, no GPU).

    Overrides first (first match), else with ``use_extra_bufts`` the first extra buffer type that
    supports the weight, else ``CPU`` -- llama.cpp's rule (``select_weight_buft``).
    """
    if supports is None:
        supports = _ggml_supports(n_expert_used)
    out = {}
    for t in tensors:
        buft = next((o.buffer_type for o in placement.overrides if re.search(o.pattern, t.name)), None)
        candidates = report.extra if (buft == "CPU" or buft is None) and placement.use_extra_bufts else ()
        if buft is None or buft == "CPU":
            weight = _MATMUL_RE.match(t.name) or _EXPERT_RE.match(t.name)
            buft = next((b for b in candidates if weight and supports(b, t)), "CPU")
        out[t.name] = buft
    return out


def _ggml_supports(n_expert_used: int) -> Supports:
    from edgeinfer.backends.ggml_registry import ggml

    g = ggml()

    def supports(buft: str, t) -> bool:
        experts = n_expert_used if _EXPERT_RE.match(t.name) else 0
        return g.supports_weight(buft, int(t.qtype), tuple(t.shape), experts)

    return supports


def group_patterns(names: Iterable[str]) -> list[str]:
    """Few anchored regexes that match exactly ``names``: one per tensor kind, layers listed.

    llama.cpp compiles every pattern for every tensor it loads, so one pattern per tensor would
    cost O(tensors²) regex compilations. ``blk.3.attn_q.weight`` and ``blk.7.attn_q.weight``
    become ``^blk\\.(?:3|7)\\.attn_q\\.weight$``.
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"^blk\.(\d+)\.(.+)$", n)
        key, bid = (f"blk.{{}}.{m.group(2)}", m.group(1)) if m else (n, None)
        groups.setdefault(key, []).append(bid)
    out = []
    for key, bids in groups.items():
        if bids == [None]:
            out.append("^" + re.escape(key) + "$")
        else:
            pre, post = key.split("{}")
            ids = sorted(set(bids), key=int)
            out.append("^" + re.escape(pre) + "(?:" + "|".join(ids) + ")" + re.escape(post) + "$")
    return out


# -- applying a plan to llama_model_params ----------------------------------------------------
class _Override(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (include/llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class OverrideArray:
    """The NULL-terminated C array llama.cpp reads; keep this object alive while the model loads."""

    def __init__(self, overrides: Sequence[TensorOverride], resolve: Callable[[str], int] | None = None):
        if resolve is None:
            from edgeinfer.backends.ggml_registry import ggml

            resolve = ggml().buffer_type
        import llama_cpp

        limit = int(llama_cpp.llama_max_tensor_buft_overrides())
        if len(overrides) >= limit:
            raise EdgeinferError(f"{len(overrides)} tensor overrides; llama.cpp takes at most {limit - 1}")
        self._patterns = [o.pattern.encode() for o in overrides]
        self.array = (_Override * (len(overrides) + 1))()
        for i, (o, p) in enumerate(zip(overrides, self._patterns)):
            try:
                self.array[i] = _Override(p, resolve(o.buffer_type))
            except KeyError as e:
                raise EdgeinferError(f"tensor override {o.pattern!r}: {e.args[0]}") from None
        self.array[len(overrides)] = _Override(None, None)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)


def expert_overrides(n_cpu_moe: int) -> list[TensorOverride]:
    """llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N`` as overrides: the stacked expert weights of every
    layer (``n_cpu_moe`` >= the layer count) or of layers ``0 .. N-1`` stay in host memory
    (common/common.h's patterns; a ``CPU`` target also takes the safe extra buffer types)."""
    if n_cpu_moe <= 0:
        return []
    from edgeinfer.backend import ALL_LAYERS

    exps = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    if n_cpu_moe >= ALL_LAYERS:
        return [TensorOverride(exps, "CPU")]
    return [TensorOverride(r"^blk\.(" + "|".join(str(i) for i in range(n_cpu_moe)) + ")" + exps, "CPU")]


def apply_placement(params, placement: Placement) -> OverrideArray | None:
    """Set ``use_extra_bufts``, ``tensor_buft_overrides`` and the lazy mode of a ``llama_model_params``.

    Row-lazy tensors (Gemma 4's per-layer embedding table, an input-layer tensor llama.cpp reads by
    row) are always read lazily from the memory map: llama.cpp's default reads them so only above
    4 GiB and otherwise maps the whole file populated, making the table resident.
    Returns the :class:`OverrideArray` to keep alive until the model is loaded (None if no overrides).
    """
    import llama_cpp

    params.lazy_mode = llama_cpp.LLAMA_LAZY_MODE_ON
    params.use_extra_bufts = placement.use_extra_bufts
    if not placement.overrides:
        params.tensor_buft_overrides = None
        return None
    arr = OverrideArray(placement.overrides)
    params.tensor_buft_overrides = arr.address  # llama-cpp-python declares the field as c_void_p
    return arr


def placement_for(path, n_gpu_layers: int = 0, user: Sequence[TensorOverride] = (),
                  policy: BufferPolicy | None = None, report: CpuReport | None = None) -> Placement:
    """:func:`plan_placement` for the GGUF at ``path`` on this machine under the environment's policy."""
    from edgeinfer.gguf_check import validate_gguf

    h = validate_gguf(path)
    report = report or CpuReport.query()
    n_used = int(h.arch_key("{arch}.expert_used_count", 0) or 0)
    return plan_placement(report, policy or BufferPolicy.from_env(), h.tensors, n_expert_used=n_used,
                          offload=bool(n_gpu_layers) and report.gpu, user=user)


_LLAMA_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched_default_params(placement: Placement):
    """Make llama-cpp-python's next ``llama_model_default_params()`` carry ``placement``.

    ``Llama.__init__`` builds its ``llama_model_params`` from that function and has no argument
    for these fields, so it is replaced (under a lock) while one ``Llama`` is constructed.
    """
    import llama_cpp.llama_cpp as lc

    with _LLAMA_LOCK:
        original = lc.llama_model_default_params
        keep = []

        def default_params():
            p = original()
            keep.append(apply_placement(p, placement))
            return p

        lc.llama_model_default_params = default_params
        try:
            yield
        finally:
            lc.llama_model_default_params = original


def open_llama(model_path, *, placement: Placement | None = None, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)`` with edgeinfer's safe buffer types.

    Every in-process llama.cpp model that runs matrix multiplies (the oracles of tests and
    benchmarks, ``edgeinfer eval``) is opened here, so none of them lands on the AMX path.
    ``placement`` defaults to :func:`placement_for` the file under the environment's policy.
    """
    import llama_cpp

    if kwargs.get("vocab_only"):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    if placement is None:
        placement = placement_for(model_path, kwargs.get("n_gpu_layers", 0))
    with _patched_default_params(placement):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
