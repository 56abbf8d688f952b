"""Tokenizer and chat template: Hugging Face tokenizer files -> GGUF ``tokenizer.*`` metadata.

Two tokenizer kinds, chosen from the files present (as llama.cpp's converter does):

* BPE (``tokenizer.json`` with a BPE model, ``tokenizer.ggml.model = gpt2``): the vocabulary, the
  merges and the pre-tokenizer name. llama.cpp has one hand-written pre-tokenizer per model family
  and picks it by name; the name is found by tokenizing a fixed probe text and looking up the
  sha256 of the token ids in ``bpe_pre_hashes.json`` (data taken from llama.cpp's converter).
* SentencePiece (``tokenizer.model``, ``tokenizer.ggml.model = llama``): pieces, scores and types.

Special tokens (BOS/EOS/PAD/UNK...), ``add_bos``/``add_eos`` and the chat template (from
``tokenizer_config.json`` or ``chat_template.jinja``) come from ``gguf.SpecialVocab``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import sha256
from pathlib import Path

import gguf

from edgeinfer.errors import ConversionError

log = logging.getLogger(__name__)

PRE_HASHES_FILE = Path(__file__).with_name("bpe_pre_hashes.json")


@dataclass
class Vocab:
    """Everything the GGUF needs about the tokenizer."""

    model: str  # "gpt2" (BPE) or "llama" (SentencePiece)
    tokens: list[str]
    toktypes: list[int]
    scores: list[float] | None = None
    pre: str | None = None  # BPE pre-tokenizer name
    add_space_prefix: bool | None = None
    special: gguf.SpecialVocab | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def pad_to(self, n: int) -> None:
        """Append unused ``[PAD{i}]`` tokens up to ``n`` (llama.cpp pads to the embedding size)."""
        for i in range(len(self.tokens), n):
            self.tokens.append(f"[PAD{i}]")
            self.toktypes.append(gguf.TokenType.UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)

    def add_to_gguf(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.toktypes)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.n_vocab = len(self.tokens)
            self.special.add_to_gguf(w, quiet=True)


@lru_cache(maxsize=1)
def _pre_table() -> tuple[str, dict[str, str]]:
    data = json.loads(PRE_HASHES_FILE.read_text(encoding="utf-8"))
    return data["probe_text"], data["hashes"]


def looks_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (same heuristics as llama.cpp)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def identify_pre_tokenizer(tokenizer_json: Path) -> str | None:
    """llama.cpp's name for this BPE tokenizer's pre-tokenizer, or None if unknown.

    The ids of the probe text are hashed as llama.cpp hashes ``AutoTokenizer.encode``'s output; the
    BOS handling of ``tokenizers`` and transformers can differ, so the ids with and without a
    leading BOS are both tried.
    """
    from tokenizers import Tokenizer

    probe, table = _pre_table()
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(probe).ids
    plain = tok.encode(probe, add_special_tokens=False).ids
    candidates = [ids, plain]
    cfg_file = tokenizer_json.with_name("tokenizer_config.json")
    bos_text = None
    if cfg_file.is_file():
        bos = json.loads(cfg_file.read_text(encoding="utf-8")).get("bos_token")
        bos_text = bos.get("content") if isinstance(bos, dict) else bos
    if bos_text and (bos_id := tok.token_to_id(bos_text)) is not None:
        candidates.append([bos_id] + plain)
    for c in candidates:
        h = sha256(str(c).encode()).hexdigest()
        if h in table:
            return table[h]
    log.debug("pre-tokenizer hash %s not in the table", sha256(str(ids).encode()).hexdigest())
    return None


def load_bpe(folder: Path, n_vocab: int) -> Vocab:
    """BPE vocabulary from ``tokenizer.json`` (ids missing in the file become unused ``[PAD{i}]``)."""
    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the tokenizer ({e})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"{path}: tokenizer model {model.get('type')!r} is not supported "
                              f"(BPE tokenizer.json or SentencePiece tokenizer.model)")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = added[i]["content"]
            if added[i].get("special") or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # user-defined tokens are stored pre-normalized
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    pre = identify_pre_tokenizer(path)
    if pre is None:
        log.warning("%s: this BPE pre-tokenizer is not one llama.cpp knows; writing 'default' "
                    "(llama.cpp may split some text differently from Hugging Face)", path)
        pre = "default"
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ConversionError(f"{path}: BPE tokenizer without merges")
    return Vocab("gpt2", tokens, types, pre=pre, special=special)


def load_sentencepiece(folder: Path, n_vocab: int) -> Vocab:
    """SentencePiece vocabulary from ``tokenizer.model`` (+ ``added_tokens.json`` / tokenizer.json extras)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ConversionError("converting a SentencePiece tokenizer needs the `sentencepiece` package: "
                              "pip install sentencepiece") from None
    path = folder / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path}: not a valid SentencePiece model ({e})") from None
    n = sp.vocab_size()
    size = max(n_vocab, n)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for i in range(n):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    # Added tokens, as llama.cpp's converter reads them: added_tokens.json entries are user-defined;
    # entries of tokenizer_config.json's added_tokens_decoder (or tokenizer.json's added_tokens)
    # are control tokens when flagged special (or when they look special), user-defined otherwise.
    extra: dict[int, tuple[str, bool]] = {}
    if (folder / "added_tokens.json").is_file():
        for text, i in json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items():
            extra[int(i)] = (text, False)
    decoder: dict[int, tuple[str, bool]] = {}
    if (folder / "tokenizer.json").is_file():
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        decoder.update({int(a["id"]): (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])})
    if (folder / "tokenizer_config.json").is_file():
        tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        decoder.update({int(i): (a["content"], bool(a.get("special")))
                        for i, a in (tc.get("added_tokens_decoder") or {}).items()})
    for i, (text, special) in list(extra.items()) + list(decoder.items()):
        if i >= size:
            log.warning("%s: added token %r has id %d beyond the vocabulary (%d); ignored", path, text, i, size)
            continue
        scores[i] = -1000.0
        if special or looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # user-defined tokens are stored pre-normalized
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = text
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=size)
    return Vocab("llama", tokens, [int(t) for t in types], scores=scores, special=special)


def load_vocab(folder: Path, n_vocab: int, prefer_sentencepiece: bool = True,
               spm_add_space_prefix: bool | None = None) -> Vocab:
    """The checkpoint's vocabulary, padded to at least ``n_vocab`` entries.

    Args:
        spm_add_space_prefix: an architecture's forced ``add_space_prefix`` (gemma3: False);
            otherwise ``add_prefix_space`` from tokenizer_config.json when present.
    Raises:
        ConversionError: no tokenizer files, or an unsupported tokenizer.
    """
    has_spm = (folder / "tokenizer.model").is_file()
    has_json = (folder / "tokenizer.json").is_file()
    if has_spm and (prefer_sentencepiece or not has_json):
        v = load_sentencepiece(folder, n_vocab)
        cfg_file = folder / "tokenizer_config.json"
        if spm_add_space_prefix is not None:
            v.add_space_prefix = spm_add_space_prefix
        elif cfg_file.is_file():
            v.add_space_prefix = json.loads(cfg_file.read_text(encoding="utf-8")).get("add_prefix_space")
        return v
    if has_json:
        return load_bpe(folder, n_vocab)
    raise ConversionError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer "
                          f"files of the model into the folder")
