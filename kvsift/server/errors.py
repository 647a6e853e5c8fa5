"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Errors are mapped to HTTP by their type: every :class:`kvsift.errors.KVSiftError` carries its
``status``, ``code`` and ``param`` (never by searching the message text). ``code`` is never null.
A :class:`kvsift.errors.RateLimitError` (429) also carries its ``Retry-After`` header.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvsift.errors import BudgetError, KVSiftError, MethodOptionError, RateLimitError, UnknownMethodError

log = logging.getLogger("kvsift.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
          410: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
          507: "server_error"}

# The HTTP API's codes for library errors whose own code is generic (stable since the first server
# release: clients match on them). Looked up by type, along the class hierarchy.
_API_CODES: dict[type, str] = {BudgetError: "invalid_kv_budget", UnknownMethodError: "unknown_kv_method",
                               MethodOptionError: "invalid_kv_options"}


class APIError(KVSiftError):
    """A server-only error with its status and code given where it is raised."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message, param=param)
        self.status = status
        self.code = code or _default_code(status)
        self.type = type


def _default_code(status: int) -> str:
    return {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
            409: "conflict", 410: "gone", 413: "request_too_large", 415: "unsupported_media_type",
            422: "invalid_request", 429: "rate_limited", 499: "client_disconnected", 503: "server_busy"
            }.get(status, "internal_error" if status >= 500 else "invalid_request")


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def api_code(exc: KVSiftError) -> str:
    for cls in type(exc).__mro__:
        if cls in _API_CODES:
            return _API_CODES[cls]
    return exc.code or _default_code(exc.status)


def _text(s: Any) -> str:
    """A message safe to encode as UTF-8 (lone surrogates from the input become escapes)."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _text(message), "type": type, "param": None if param is None else _text(param),
                      "code": code or "invalid_request"}}


def exc_body(exc: KVSiftError) -> dict[str, Any]:
    t = getattr(exc, "type", None) or error_type(exc.status)
    return error_body(exc.message, t, exc.param, api_code(exc))


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param, code or _default_code(status)),
                        status_code=status, headers=headers)


_OWN_CHECKS = ("value_error", "invalid_unicode")  # our validators' errors, preferred over a union's type errors
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "nullable"}


def _loc_param(loc) -> str | None:
    """``("body", "prompt", "function-after[_unicode(), str]")`` -> ``"prompt"`` (union branch tags dropped)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")
             and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or None


def _count(request: Request, code: str) -> None:
    st = getattr(request.app.state, "kvsift", None)
    if st is not None:
        st.metrics.rejected.labels(code=code).inc()


async def _kvsift_error(request: Request, exc: KVSiftError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, RateLimitError):
        headers = {"Retry-After": str(exc.retry_after)}
    _count(request, api_code(exc))
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, api_code(exc), exc.message)
    return JSONResponse(exc_body(exc), status_code=exc.status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    resp = _validation_response(exc)
    _count(request, json.loads(resp.body)["error"]["code"])
    return resp


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "parse error")
        return error_response(400, f"request body is not valid JSON: {why}", code="invalid_json")
    if first.get("type") == "model_attributes_type" or (first.get("loc") == ("body",) and first.get("type") in
                                                        ("dict_type", "model_type")):
        return error_response(400, "request body must be a JSON object", code="invalid_body")
    if first.get("type") == "missing" and first.get("loc") == ("body",):
        return error_response(400, "request body is missing (send a JSON object)", code="invalid_body")
    # one message per field: a union's branches each report; our own checks (value_error) say most
    # (a union's other branches fail on type when our check fails in the branch that fits: drop them)
    errs = [e for e in errs if e.get("type") in _OWN_CHECKS] or errs
    by_param: dict[str | None, dict] = {}
    for e in errs:
        p = _loc_param(e.get("loc", ()))
        if p not in by_param or (e.get("type") in _OWN_CHECKS and by_param[p].get("type") not in _OWN_CHECKS):
            by_param[p] = e
    msgs = []
    for p, e in list(by_param.items())[:5]:
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        msgs.append(f"{p}: {msg}" if p else msg)
    param, e0 = next(iter(by_param.items()))
    code = {"missing": "missing_field", "invalid_unicode": "invalid_unicode"}.get(e0.get("type"), "invalid_value")
    return error_response(400, "; ".join(msgs), param=param, code=code)


async def _http_error(request: Request, exc: StarletteHTTPException):
    msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = None
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no route {request.method} {request.url.path}"
    if exc.status_code == 400:  # the framework's body parsing (e.g. bytes that are not UTF-8)
        msg, code = f"request body could not be parsed as JSON ({msg})", "invalid_body"
    return error_response(exc.status_code, msg, code=code, headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception):
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error (reference {ref}; see the server log)", code="internal_error")


def install_error_handlers(app) -> None:
    app.add_exception_handler(KVSiftError, _kvsift_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
