"""Structured output: a JSON schema (or "any JSON object") -> llama.cpp GBNF, checked before use, and a
grammar filter for the torch engine that runs llama.cpp's own grammar sampler over torch's logits.

The schema -> GBNF conversion is llama-cpp-python's (``llama_cpp.llama_grammar.json_schema_to_gbnf``,
a port of llama.cpp's ``json_schema_to_grammar``); the grammar engine is llama.cpp's
(``llama_sampler_init_grammar``), on both backends, so the same grammar allows the same tokens.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

from edgeinfer.server.request import ApiError, bad

#: Any JSON object (OpenAI's ``json_object``, Ollama's ``"format": "json"``): llama.cpp's json.gbnf.
JSON_OBJECT_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
'''


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for a JSON schema (a dict); 400 if the converter cannot handle it."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise bad(f"'{param}' must be a JSON schema object", param)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, RecursionError, NotImplementedError) as e:
        raise bad(f"'{param}': cannot turn this JSON schema into a grammar ({e})", param) from None


def openai_response_format(rf: Any) -> str | None:
    """OpenAI's ``response_format`` -> GBNF (None for ``text`` or absent)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GBNF
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise bad("'response_format.json_schema' must be an object with a 'schema'", "response_format")
        return schema_grammar(js["schema"], "response_format.json_schema.schema")
    raise bad(f"'response_format.type' must be text, json_object or json_schema (got {kind!r})", "response_format")


def ollama_format(fmt: Any) -> str | None:
    """Ollama's ``format``: ``"json"`` or a JSON schema -> GBNF (None for absent / empty)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return JSON_OBJECT_GBNF
    if isinstance(fmt, dict):
        return schema_grammar(fmt, "format")
    raise bad("'format' must be \"json\" or a JSON schema object", "format")


def check_grammar(vocab, grammar: str) -> None:
    """Parse ``grammar`` with llama.cpp against ``vocab`` (a ``llama_vocab`` pointer); 400 if it does not parse."""
    import llama_cpp as lc

    smpl = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not smpl:
        raise ApiError(400, "the grammar derived from the request does not parse (llama.cpp's GBNF parser refused it)",
                       "response_format", "invalid_grammar")
    lc.llama_sampler_free(smpl)


class GrammarFilter:
    """llama.cpp's grammar sampler applied to a torch logit vector (the torch engine's structured output).

    ``mask(logits)`` sets the logits of tokens the grammar forbids next to ``-inf`` (in place on a CPU
    float32 tensor); ``accept(tok)`` advances the grammar. One per request.
    """

    def __init__(self, vocab, grammar: str, n_vocab: int):
        import llama_cpp as lc
        import numpy as np

        self.lc = lc
        self.smpl = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self.smpl:
            raise ApiError(400, "the grammar does not parse", "response_format", "invalid_grammar")
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        assert dtype.itemsize == ctypes.sizeof(lc.llama_token_data)
        self.data = np.zeros(n_vocab, dtype=dtype)
        self.data["id"] = np.arange(n_vocab, dtype=np.int32)
        self.arr = lc.llama_token_data_array(
            data=self.data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=n_vocab, selected=-1,
            sorted=False)

    def mask(self, logits) -> None:
        """logits: [V] float32 CPU tensor; forbidden tokens -> -inf."""
        import numpy as np
        import torch

        v = logits.numpy()
        n = min(len(v), len(self.data))
        self.data["logit"][:n] = v[:n]
        self.data["id"][:n] = np.arange(n, dtype=np.int32)
        self.arr.size = n
        self.arr.sorted = False
        self.arr.selected = -1
        self.lc.llama_sampler_apply(self.smpl, ctypes.byref(self.arr))
        out = self.data[: self.arr.size]
        allowed = torch.zeros(len(v), dtype=torch.bool)
        ids = out["id"][np.isfinite(out["logit"])]
        allowed[torch.from_numpy(ids.astype(np.int64))] = True
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, tok: int) -> None:
        self.lc.llama_sampler_accept(self.smpl, tok)

    def close(self) -> None:
        if self.smpl:
            self.lc.llama_sampler_free(self.smpl)
            self.smpl = None
