"""Exceptions that reach the user.

Every error a user can cause (a bad path, a corrupt file, a bad flag value) is an
:class:`EdgeinferError`: the CLI prints its message on one line and exits with code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeinferError(Exception):
    """A user-facing error: one clear line naming the file/tensor, the problem and a fix."""

    exit_code = 2


class ModelNotFoundError(EdgeinferError):
    """A model name or path does not resolve to a file."""


class InvalidModelError(EdgeinferError):
    """A file exists but is not a valid/usable GGUF (bad magic, truncated, unknown architecture)."""


class ConversionError(EdgeinferError):
    """A checkpoint cannot be converted (missing files, bad shapes, unsupported dtype...)."""


class TemplateError(EdgeinferError):
    """A chat template cannot be rendered safely."""


class BackendError(EdgeinferError):
    """A backend cannot load or run a model."""


class BackendCrashedError(BackendError):
    """The process that runs a model died (a signal, an abort, out of memory). The next request
    starts a new one; the message says what crashed, how, with which model, and what to try."""
