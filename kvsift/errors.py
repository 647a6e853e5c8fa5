"""Typed errors, shared by the library, the CLI (``kvsift: error: ...``, exit 2) and the server
(mapped to an OpenAI-shaped HTTP error by type in :mod:`kvsift.server.errors`, never by message text).

Every input error is also a ``ValueError`` (and a missing model a ``FileNotFoundError``), so code
that caught those before keeps working.
"""

from __future__ import annotations


class KVSiftError(Exception):
    """Base of kvsift's own errors. ``status``: the HTTP status the server answers with; ``code``:
    the OpenAI error ``code``; ``param``: the request field at fault, when known."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InputError(KVSiftError, ValueError):
    """Bad input, detected before any expensive work."""


class BudgetError(InputError):
    """A KV budget that is not a token count >= 1 or a ratio in (0, 1], or larger than the context."""

    code = "invalid_budget"


class UnknownMethodError(InputError):
    """A method name that is not registered."""

    code = "unknown_method"


class MethodOptionError(InputError):
    """An unknown method option, or a value of the wrong type or out of range."""

    code = "invalid_method_option"


class ContextLengthError(InputError):
    """A prompt (or document) longer than the model allows."""

    code = "context_length_exceeded"


class ModelNotFoundError(KVSiftError, FileNotFoundError):
    """A model name or path that cannot be resolved, or a named model whose packages are missing."""

    status = 404
    code = "model_not_found"


class ModelIntegrityError(KVSiftError):
    """A named model's joined file does not match its pinned sha256 (or cannot be written whole:
    not enough disk space). Nothing is left in the cache then."""

    status = 500
    code = "model_integrity"
