"""Downloads through ``huggingface-hub`` into its standard cache (resumable, with progress bars).

Only ``edgeinfer pull`` and an explicit hub MODEL name reach this module; nothing else opens a
network connection.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgeinfer.errors import EdgeinferError, ModelNotFoundError
from edgeinfer.resolve import _cached_repo_files, _pick_quant, offline_requested, split_hub_name

# What a Hugging Face checkpoint needs for `edgeinfer convert`.
CHECKPOINT_PATTERNS = [
    "*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt",
]


def _remote_files(repo: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return HfApi().list_repo_files(repo)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo}: no such repository on the Hugging Face Hub (private? run `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise EdgeinferError(f"{repo}: cannot reach the Hugging Face Hub ({e.__class__.__name__}: {e}); "
                             "use --offline to work from the cache") from None


def _ask(repo: str, choices: list[str]) -> str:
    if not sys.stdin.isatty():
        raise ModelNotFoundError(f"{repo}: several GGUF files, pick one with {repo}:QUANT: {', '.join(choices)}")
    for i, c in enumerate(choices, 1):
        print(f"  {i}) {c}", file=sys.stderr)
    while True:
        ans = input(f"Which file of {repo}? [1-{len(choices)}] ").strip()
        if ans.isdigit() and 1 <= int(ans) <= len(choices):
            return choices[int(ans) - 1]


def download_gguf(repo: str, quant: str | None, interactive: bool = False, files: list[str] | None = None) -> Path:
    """Download the GGUF of ``quant`` from ``repo`` (resumable) and return its cached path.

    ``files``: the repo's file list when the caller already has it (saves a Hub round trip).
    """
    from huggingface_hub import hf_hub_download

    files = _remote_files(repo) if files is None else files
    try:
        fname = _pick_quant(files, repo, quant)
    except ModelNotFoundError:
        ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
        if not interactive or not ggufs or quant:
            raise
        fname = _ask(repo, ggufs)
    return Path(hf_hub_download(repo, fname))


def pull(name: str) -> Path:
    """``edgeinfer pull REPO[:QUANT]``: a GGUF file, or a whole checkpoint when the repo has none."""
    repo, quant = split_hub_name(name)
    if offline_requested():
        cached = _cached_repo_files(repo)
        if cached is None:
            raise ModelNotFoundError(f"{repo}: offline and nothing of it is cached")
        snap, files = cached
        listing = "\n  ".join(sorted(files)) or "(no files)"
        raise ModelNotFoundError(f"{repo}: offline; cached in {snap}:\n  {listing}")
    files = _remote_files(repo)
    if any(f.lower().endswith(".gguf") for f in files):
        return download_gguf(repo, quant, interactive=True, files=files)
    if not any(f.endswith(".safetensors") for f in files):
        raise ModelNotFoundError(f"{repo}: holds neither GGUF nor safetensors files")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=CHECKPOINT_PATTERNS))
