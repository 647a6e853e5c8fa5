"""The OpenAI-compatible FastAPI app: completions, chat completions (plain and SSE streaming),
models, reusable contexts, health and Prometheus metrics.

    app = create_app(LLM(), ServerConfig(contexts_dir="~/.cache/kvsift/contexts"))

Everything that can be refused is refused before a request queues for the engine: input shape
and types (schemas), a cheap character bound on texts before tokenizing, the token length, the
method and its options, ``max_tokens`` against the server's cap, and for a new context the count,
memory and disk room it will need (estimated from its token count, the model shape and the budget).
The limits on load come first, before the body is even looked at past its schema: the API key's
concurrency, the queue's length and expected wait (429 with ``Retry-After``; see
:mod:`kvsift.server.scheduler`). A generation running past ``max_request_seconds`` stops at its
next decode step and answers what it has, ``finish_reason: "length"`` with the header
``X-Kvsift-Stopped: time-limit`` (streams: ``"kvsift": {"stopped": "time_limit"}`` on the choice's
last chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from kvsift.budget import default_memory_limits, parse_budget, request_kv_bytes
from kvsift.engine import Context, RequestOutput, SamplingParams, StreamEvent
from kvsift.engine.scheduler import Request as EngineRequest
from kvsift.engine.scheduler import Scheduler as EngineScheduler
from kvsift.errors import (BudgetError, ContextLengthError, IdempotencyKeyReusedError, KVSiftError,
                           MethodOptionError, UnknownMethodError)
from kvsift.methods import KVMethod, build_method, method_class
from kvsift.methods.base import spec_classes
from kvsift.server.auth import ANONYMOUS_ADMIN, Principal
from kvsift.server.config import ServerConfig
from kvsift.server.contexts import ContextRecord, ContextStore, Reservation, model_fingerprint
from kvsift.engine.trace import StepTrace, summarize
from kvsift.server.errors import APIError, error_body, exc_body, install_error_handlers
from kvsift.server.metrics import Metrics
from kvsift.server.scheduler import Job, JobFailed, Scheduler
from kvsift.server.schemas import ChatCompletionRequest, CompletionRequest, ContextRequest

log = logging.getLogger("kvsift.server")

_DISCONNECT_POLL_S = 0.1
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/contexts", "/health", "/metrics",
              "/debug/steps", "/openapi.json")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
TIME_LIMIT = "time_limit"            # the server's finish reason of a generation stopped by max_request_seconds
STOPPED_HEADER = "X-Kvsift-Stopped"  # its header on a non-streaming response (value: "time-limit")


@dataclass
class ServerState:
    llm: Any
    config: ServerConfig
    model_id: str
    metrics: Metrics
    scheduler: Scheduler
    store: ContextStore
    max_tokens_cap: int = 0
    max_token_chars: int = 0          # longest token of the vocabulary, in characters (the cheap length bound)
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: dict = field(default_factory=dict)  # (owner, Idempotency-Key) -> (request hash, asyncio.Task)


@dataclass
class Prepared:
    """A validated generation request, ready for the engine."""

    prompts: list[list[int]]        # token ids per prompt (after the context, if any)
    params: SamplingParams
    method: KVMethod
    method_spec: str
    budget: Any
    context: Context | None
    context_id: str | None
    context_tokens: int
    principal: Principal = ANONYMOUS_ADMIN


# ---- middleware ----------------------------------------------------------------------------------
class _BodyLimit:
    """413 for bodies over ``limit`` bytes, by Content-Length or counted while streaming in
    (chunked uploads). The rest of an oversized body is read and dropped (up to ``drain`` bytes
    and ``drain_s`` seconds) before the 413 goes out: a client that is still sending would otherwise
    see its connection reset instead of reading the answer."""

    def __init__(self, app, limit: int, drain: int = 64 * 2**20, drain_s: float = 10.0):
        self.app, self.limit, self.drain, self.drain_s = app, limit, drain, drain_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    if declared <= self.limit + self.drain:
                        await self._drain(receive, 0)
                    return await self._reject(send)
        state = {"over": False, "n": 0, "started": False, "more": True}

        async def limited_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                state["n"] += len(msg.get("body", b""))
                state["more"] = bool(msg.get("more_body", False))
                if state["n"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if state["over"]:
                return  # the app's own reaction to the cut body is replaced by our 413
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            if state["more"]:
                await self._drain(receive, state["n"])
            await self._reject(send)

    async def _drain(self, receive, n: int) -> None:
        deadline = time.monotonic() + self.drain_s
        while n <= self.limit + self.drain:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                msg = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            n += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body exceeds the server's limit of {self.limit} bytes",
                                     "invalid_request_error", None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Auth:
    """The caller, from ``Authorization: Bearer KEY``, before anything reads the body: a request
    without a valid key gets its 401 first (not a 400 about its body). Sets ``scope["state"]
    ["principal"]``; without keys configured every caller is the anonymous admin. ``/v1/*`` and
    ``/openapi.json`` need a key; ``/health`` and ``/metrics`` too unless ``public_health``."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys = self.config.keys
        who = ANONYMOUS_ADMIN if keys is None else None
        if keys is not None:
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    scheme, _, token = v.decode("latin-1").partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        who = keys.lookup(token.strip())
                    break
        if who is None:
            path = scope.get("path", "")
            if path.startswith("/v1/") or path in ("/v1", "/openapi.json") or (
                    path in ("/health", "/metrics") and not self.config.public_health):
                return await self._reject(receive, send)
        scope.setdefault("state", {})["principal"] = who
        await self.app(scope, receive, send)

    async def _reject(self, receive, send):
        # read the body (bounded by _BodyLimit outside) so that a client still sending reads the 401
        while True:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
        self.metrics.rejected.labels(code="invalid_api_key").inc()
        body = json.dumps(error_body("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                     "authentication_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class _RequestMetrics:
    """Counts finished requests by endpoint and status and times them (streams until their last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in _ENDPOINTS:
            endpoint = path
        else:
            endpoint = "/v1/contexts/{id}" if path.startswith("/v1/contexts/") else "other"
        status = {"code": 500}

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            if endpoint != "other":
                self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


# ---- app -----------------------------------------------------------------------------------------
def create_app(llm, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    model_id = config.model_name or llm.info.name
    metrics = Metrics(model_id)
    store = ContextStore(llm, model_fingerprint(llm), config.contexts_dir, config.context_memory_bytes,
                         config.max_contexts, metrics, disk_limit=config.contexts_disk_bytes, keep_ids=config.keep_ids,
                         shared=config.shared_contexts)
    n = store.scan()
    if n or store.skipped:
        log.info("contexts: %d registered from %s, %d skipped", n, config.contexts_dir, len(store.skipped))
    cap = config.max_tokens_cap or llm.info.max_positions
    kv_mem, host_mem = config.kv_memory_bytes, config.host_memory_bytes
    if kv_mem is None or host_mem is None:  # on CUDA: shares of what is free now (budget.default_memory_limits)
        dev_d, host_d = default_memory_limits(llm.device)
        kv_mem = kv_mem if kv_mem is not None else dev_d
        host_mem = host_mem if host_mem is not None else host_d
        if dev_d is not None:
            log.info("admission: %s of KV on the device, %s in host memory (--kv-memory / --host-memory to change)",
                     _gib(kv_mem), _gib(host_mem))
    if host_mem is not None and llm.device.type == "cuda" and not os.environ.get("KVSIFT_HOST_POOL"):
        from kvsift.cache.host import host_pool

        host_pool().set_limit(host_mem)  # offloaded KV is admitted up to it: its locked blocks are cached as much
    engine = EngineScheduler(llm.scheduler_config(max_batch=config.max_batch, kv_memory=kv_mem,
                                                  host_memory=host_mem, preempt=config.preempt))
    # the served engine's step trace is the server's to set (--step-trace N; off: none)
    llm.step_trace = StepTrace(config.step_trace) if config.step_trace else None
    scheduler = Scheduler(config.max_waiting, metrics, max_run_s=config.max_request_seconds,
                          max_queue_s=config.max_queue_seconds, max_per_key=config.max_concurrent_per_key,
                          engine=engine,
                          run_batch=lambda group, join=None: llm.run_batch(group, join=join, memory=engine,
                                                                           on_rows_changed=metrics.observe_rebuild),
                          join_running=config.continuous_batching)
    state = ServerState(llm, config, model_id, metrics, scheduler, store,
                        max_tokens_cap=cap, max_token_chars=_max_token_chars(llm.tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.scheduler.shutdown()

    app = FastAPI(title="kvsift", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.kvsift = state
    install_error_handlers(app)
    app.add_middleware(_Auth, config=config, metrics=metrics)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_RequestMetrics, metrics=metrics)

    async def principal(request: Request) -> Principal:
        """The caller (checked by ``_Auth`` before the body was read)."""
        who = request.scope.get("state", {}).get("principal")
        if who is None:
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return who

    async def monitor(request: Request) -> None:
        if not config.public_health:
            await principal(request)

    v1 = APIRouter(prefix="/v1")

    @app.get("/health", dependencies=[Depends(monitor)])
    async def health():
        return {"status": "ok", "model": model_id, "running": state.scheduler.running,
                "waiting": state.scheduler.waiting, "contexts": len(state.store.records)}

    @app.get("/metrics", dependencies=[Depends(monitor)])
    async def metrics_endpoint():
        metrics.observe_preemptions(engine.preemptions)
        metrics.observe_device(llm.device)
        return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @app.get("/debug/steps")
    async def debug_steps(since: float | None = None, who: Principal = Depends(principal)):
        """The engine's step trace (``--step-trace N``): each gap of a running batch and what it spent
        its time on (records whose tokens went out at ``t >= since``, seconds on the trace's clock),
        and their summary: the slow gaps' parts (:func:`kvsift.engine.trace.summarize`)."""
        if not who.admin:  # other tenants' timings
            raise APIError(403, "the step trace is for admin keys", code="permission_denied")
        trace = llm.step_trace
        if trace is None:
            raise APIError(404, "the step trace is off: start the server with --step-trace N", code="not_found")
        if since is not None and not math.isfinite(since):
            raise APIError(400, f"since must be a finite number of seconds, got {since}", param="since",
                           code="invalid_value")
        records = trace.snapshot(since)
        return {"now": trace.now(), "records": records, "summary": summarize(records)}

    @app.get("/openapi.json", dependencies=[Depends(principal)], include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    def model_card() -> dict[str, Any]:  # no file paths: clients see the served id only
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "kvsift",
                "max_model_len": llm.info.max_positions, "max_tokens_cap": state.max_tokens_cap}

    @v1.get("/models", dependencies=[Depends(principal)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_name:path}", dependencies=[Depends(principal)])
    async def model(model_name: str):
        _check_model(state, model_name)
        return model_card()

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request, who: Principal = Depends(principal)):
        return await _generate(state, req, request, chat=False, who=who)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request, who: Principal = Depends(principal)):
        return await _generate(state, req, request, chat=True, who=who)

    @v1.post("/contexts")
    async def create_context(req: ContextRequest, request: Request, who: Principal = Depends(principal)):
        return await _create_context(state, req, request, who)

    @v1.get("/contexts")
    async def list_contexts(who: Principal = Depends(principal)):
        recs = await asyncio.to_thread(state.store.list, who)
        return {"object": "list", "data": [r.public() for r in recs]}

    @v1.get("/contexts/{context_id}")
    async def get_context(context_id: str, who: Principal = Depends(principal)):
        return state.store.get(context_id, who).public()

    @v1.delete("/contexts/{context_id}")
    async def delete_context(context_id: str, who: Principal = Depends(principal)):
        await asyncio.to_thread(state.store.delete, context_id, who)
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    app.include_router(v1)
    return app


def _version() -> str:
    from kvsift import __version__

    return __version__


def _max_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token (byte-level BPE: one character per byte, so at
    least the characters it decodes to). A text longer than ``positions * this`` cannot fit."""
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(t) for t in vocab), default=0)
    except Exception:  # noqa: BLE001 - no vocabulary to look at: a generous bound
        return 256
    return max(4, longest + 1)


# ---- validation ------------------------------------------------------------------------------------
def _check_model(state: ServerState, name: str | None) -> None:
    if name in (None, "", state.model_id, state.llm.info.name):
        return
    raise APIError(404, f"the model {name!r} does not exist: this server serves {state.model_id!r}",
                   param="model", code="model_not_found")


_METHOD_PARAMS = {UnknownMethodError: "kv_method", BudgetError: "kv_budget", MethodOptionError: "kv_options"}


def _method_error(e: Exception, spec: str) -> KVSiftError:
    """A method-building error with the request field it comes from (by type)."""
    if isinstance(e, KVSiftError):
        for cls, param in _METHOD_PARAMS.items():
            if isinstance(e, cls):
                e.param = param
        return e
    # plain ValueError / TypeError of a method's own option checks
    return MethodOptionError(f"invalid kv_options for method {spec!r}: {e}", param="kv_options")


def _type_names(tp) -> set[str] | None:
    """``int | None`` (a type or its string form) -> {"int", "None"}; None when not understood."""
    if isinstance(tp, str):
        names = {t.strip() for t in tp.split("|")}
    elif isinstance(tp, type):
        names = {tp.__name__}
    elif isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        names = set()
        for a in typing.get_args(tp):
            names |= _type_names(a) or {"?"}
    else:
        return None
    names = {"None" if n in ("NoneType", "None") else n for n in names}
    return names if names <= {"int", "float", "str", "bool", "None", "Budget"} else None


def _accepts(names: set[str], v) -> bool:
    if v is None:
        return "None" in names or "Budget" in names
    if isinstance(v, bool):
        return "bool" in names
    if isinstance(v, int):
        return bool(names & {"int", "float", "Budget"})
    if isinstance(v, float):
        return bool(names & {"float", "Budget"})
    if isinstance(v, str):
        return "str" in names
    return False


def _check_options(spec: str, options: dict | None) -> dict:
    """Type-check ``kv_options`` against the method's option fields before building it, so that a
    wrong type is a clear 400 naming the option (not a Python comparison error from inside)."""
    options = dict(options or {})
    if not options or not isinstance(spec, str):
        return options
    try:
        classes = spec_classes(spec)
    except KVSiftError:
        return options  # build_method reports the unknown name
    declared: dict[str, set[str] | None] = {}
    for c in classes:
        if not dataclasses.is_dataclass(c):
            return options
        for f in dataclasses.fields(c):
            if f.init and f.name != "budget":
                declared[f.name] = _type_names(f.type)
    paths = {o for c in classes for o in getattr(c, "path_options", ())}
    for name, v in options.items():
        if name in paths and v not in (None, "default"):  # a request must not make the server read its files
            raise MethodOptionError(f"kv_options.{name} names a file on the server: a request may pass only "
                                    f"'default' or null (the server uses its own file for the model)",
                                    param=f"kv_options.{name}")
        if name not in declared:
            continue  # build_method reports unknown options with the list of known ones
        names = declared[name]
        if names is not None and not _accepts(names, v):
            want = " or ".join(sorted("null" if n == "None" else "number" if n == "Budget" else n for n in names))
            raise MethodOptionError(f"kv_options.{name} must be {want} for method {spec!r}, got "
                                    f"{type(v).__name__} {json.dumps(v)[:60]}", param=f"kv_options.{name}")
    return options


def _method(state: ServerState, spec: str | None, budget_in, options: dict | None, default_method: str,
            default_budget) -> tuple[KVMethod, str, Any]:
    try:
        budget = parse_budget(budget_in, what="kv_budget") if budget_in is not None else default_budget
    except BudgetError as e:
        raise _method_error(e, str(spec)) from None
    spec = spec if spec is not None else default_method
    opts = _check_options(spec, options)
    try:
        m = build_method(spec, budget, **opts)
        m.check_model(state.llm.info)  # per-model method data (minference's patterns) fits the model
    except (ValueError, TypeError) as e:
        raise _method_error(e, spec) from None
    return m, spec, budget


def _check_length(state: ServerState, n: int, what: str, param: str) -> None:
    """The engine's length rule (``LLM.check_length``), checked before the request queues."""
    try:
        state.llm.check_length(n, what)
    except ValueError as e:
        raise ContextLengthError(str(e), param=param) from None


def _check_chars(state: ServerState, chars: int, base_tokens: int, what: str, param: str) -> None:
    """Before tokenizing: a text of more characters than the model's remaining positions times the
    vocabulary's longest token cannot fit, whatever its tokens (a 8 MB prompt is refused at once)."""
    room = state.llm.info.max_positions - 1 - base_tokens
    bound = max(room, 0) * state.max_token_chars
    if chars > bound:
        raise ContextLengthError(f"{what} of {chars} characters cannot fit the model's limit of "
                                 f"{state.llm.info.max_positions - 1} tokens"
                                 + (f" ({base_tokens} taken by the context)" if base_tokens else "")
                                 + f": even at {state.max_token_chars} characters per token it needs more",
                                 param=param)


def _check_max_tokens(state: ServerState, value: int | None, param: str) -> None:
    if value is not None and value > state.max_tokens_cap:
        raise APIError(400, f"{param} {value} is above this server's cap of {state.max_tokens_cap} "
                            f"(--max-tokens-cap)", param=param, code="max_tokens_too_large")


def _encode_chat_tail(llm, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that continues a chat context: the context opened the first user
    turn with the document; the first message's text follows it."""
    marker = "\x00KVSIFT\x00"
    msgs = [dict(m) for m in messages]
    msgs[0]["content"] = marker + "\n\n" + msgs[0]["content"]
    text = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(llm.tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"])


def _check_token_ids(llm, ids, param: str) -> None:
    vocab = llm.model.config.get_text_config().vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise APIError(400, f"{param} token ids must be in [0, {vocab})", param=param, code="invalid_token_id")


def _prepare(state: ServerState, req, chat: bool, who: Principal = ANONYMOUS_ADMIN) -> Prepared:
    """Everything that can fail on bad input, before the request queues (runs in a thread)."""
    llm, cfg = state.llm, state.config
    _check_model(state, req.model)
    if chat:
        _check_max_tokens(state, req.max_completion_tokens, "max_completion_tokens")
    _check_max_tokens(state, req.max_tokens, "max_tokens")
    ctx, rec = None, None
    if req.context_id is not None:
        ctx, rec = state.store.acquire(req.context_id, who)
        # the context holds compressed KV already: generation on top of it is "full" unless asked,
        # except when part of its KV lives off the device (sentencekv): then its own method fetches it
        if ctx.needs_planner:
            opts = req.kv_options if req.kv_options is not None else ctx.method_kwargs
            m, spec, budget = _method(state, req.kv_method, req.kv_budget, opts, ctx.method, ctx.budget)
        else:
            m, spec, budget = _method(state, req.kv_method, req.kv_budget, req.kv_options, "full", None)
    else:
        m, spec, budget = _method(state, req.kv_method, req.kv_budget, req.kv_options, cfg.default_method,
                                  cfg.default_budget)
    ctx_chat = bool(rec.meta.get("chat")) if rec is not None else False
    base = ctx.length if ctx is not None else 0
    if chat:
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        messages = [{"role": "system" if mm.role == "developer" else mm.role, "content": mm.text()}
                    for mm in req.messages]
        _check_chars(state, sum(len(mm["content"]) for mm in messages), base, "the messages", "messages")
        if ctx is not None:
            if not ctx_chat:
                raise APIError(400, "this context was made with chat=false: use /v1/completions with it",
                               param="context_id", code="context_not_chat")
            if messages[0]["role"] != "user":
                raise APIError(400, "with context_id the first message must be the user's (the context holds "
                                    "the start of that turn, after any system prompt)", param="messages",
                               code="invalid_messages")
            prompts = [_encode_chat_tail(llm, messages)]
        else:
            prompts = [llm.encode_chat(messages)]
        max_tokens = req.max_completion_tokens or req.max_tokens or min(cfg.default_max_tokens, state.max_tokens_cap)
    else:
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        for it in items:
            if isinstance(it, str):
                _check_chars(state, len(it), base, "the prompt", "prompt")
        prompts = []
        for it in items:
            if isinstance(it, str):
                prompts.append(llm.encode_question(it, chat=ctx_chat) if ctx is not None
                               else llm.encode(it, chat=False))
            else:
                _check_token_ids(llm, it, "prompt")
                prompts.append(list(it))
        max_tokens = req.max_tokens or min(16, state.max_tokens_cap)
    _check_length(state, base + max(len(x) for x in prompts), "the prompt" + (" with its context" if ctx else ""),
                  "messages" if chat else "prompt")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop=list(req.stop or []), ignore_eos=req.ignore_eos,
                                min_tokens=req.min_tokens)
    except ValueError as e:  # SamplingParams' messages start with the field's name
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), code="invalid_value",
                       param=field if field in SamplingParams.__slots__ else None) from None
    return Prepared(prompts, params, m, spec, budget, ctx, req.context_id, base, who)


# ---- generation ------------------------------------------------------------------------------------
async def _generate(state: ServerState, req, request: Request, chat: bool, who: Principal = ANONYMOUS_ADMIN):
    job = state.scheduler.new_job(who)  # the key's and the queue's limits: 429 before any work
    try:
        prep = await asyncio.to_thread(_prepare, state, req, chat, who)
    except BaseException:
        state.scheduler.abandon(job)
        raise
    if prep.context is not None:
        state.metrics.context_tokens.inc(prep.context_tokens * len(prep.prompts))
    try:
        ereq = await asyncio.to_thread(
            state.llm.request, prep.prompts, prep.params, method=prep.method, context=prep.context,
            cancel=job.is_cancelled)
        state.scheduler.engine.check(ereq)  # a request too large for the engine's KV memory: 400 now
    except KVSiftError as e:  # e.g. a budget larger than the prompt (the engine checks it before any compute)
        state.scheduler.abandon(job)
        raise _method_error(e, prep.method_spec) from None
    except ValueError as e:  # the engine's own checks (the server checked the same before)
        state.scheduler.abandon(job)
        raise APIError(400, str(e), code="invalid_value") from None
    except BaseException:
        state.scheduler.abandon(job)
        raise

    def on_item(ev: StreamEvent) -> StreamEvent:  # in the worker thread, for each event of this request
        if ev.output is not None:  # observed here: a cancelled request has no reader any more
            if job.timed_out and ev.output.finish_reason == "cancelled":
                ev.output.finish_reason = TIME_LIMIT
            _observe_output(state, ev.output)
        return ev

    job.on_item = on_item

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        # the background task also runs when the client left before the stream even started
        return StreamingResponse(_sse(state, job, ereq, prep, rid, created, chat, include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(_release_async, state, job),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        outputs = await _until_disconnect(request, job, _collect(state, job, ereq))
    finally:
        _release(state, job)
    stopped = any(o.finish_reason == TIME_LIMIT for o in outputs.values())
    return JSONResponse(_full_response(state, prep, outputs, rid, created, chat),
                        headers={STOPPED_HEADER: "time-limit"} if stopped else None)


def _release(state: ServerState, job: Job) -> None:
    job.cancel()  # no-op once finished
    if job.started is None:
        state.scheduler.abandon(job)


async def _release_async(state: ServerState, job: Job) -> None:  # on the event loop, like the scheduler
    _release(state, job)


async def _collect(state: ServerState, job: Job, ereq: EngineRequest) -> dict[int, RequestOutput]:
    await state.scheduler.run(job, ereq)
    outputs: dict[int, RequestOutput] = {}
    first = True
    async for ev in _events(state, job):
        if first:
            state.metrics.ttft.observe(time.perf_counter() - job.arrived)
            first = False
        if ev.output is not None:
            outputs[ev.index] = ev.output
    return outputs


async def _events(state: ServerState, job: Job):
    try:
        async for ev in job.items():
            yield ev
    except JobFailed as f:
        if isinstance(f.exc, KVSiftError):
            raise f.exc from None
        if isinstance(f.exc, ValueError):
            raise APIError(400, str(f.exc), code="invalid_value") from None
        state.metrics.finished.labels(reason="error").inc()
        ref = uuid.uuid4().hex[:12]
        log.error("engine job failed (reference %s)", ref, exc_info=f.exc)
        raise APIError(500, f"generation failed: {type(f.exc).__name__} (reference {ref}; see the server log)",
                       code="internal_error") from None


async def _until_disconnect(request: Request, job: Job | None, coro):
    """Run ``coro``; if the client disconnects first, cancel it and the job (its decode loop stops)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if task in done:
                return task.result()
            if await request.is_disconnected():
                if job is not None:
                    job.cancel()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise APIError(499, "client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            if job is not None:
                job.cancel()
            task.cancel()
        if job is not None and job.started is None:
            job.cancel()


def _gib(n: int | None) -> str:
    return "unbounded" if n is None else f"{n / 2**30:.1f} GiB"


def _observe_output(state: ServerState, out: RequestOutput) -> None:
    m, s = state.metrics, out.stats
    m.prompt_tokens.inc(s.prompt_tokens)
    m.generation_tokens.inc(len(out.token_ids))
    m.prefill.observe(s.prefill_s)
    if s.decode_steps:
        m.tpot.observe(s.decode_s / s.decode_steps)
    m.request_kv.labels(location="device").observe(s.kv_device_bytes)
    m.request_kv.labels(location="host").observe(s.kv_host_bytes)
    # last: a scrape that counts this request finished also sees its tokens and timings
    m.finished.labels(reason=out.finish_reason).inc()


def _usage(prep: Prepared, outputs: dict[int, RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(p) + prep.context_tokens for p in prep.prompts)
    completion = sum(len(o.token_ids) for o in outputs.values())
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if prep.context is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": prep.context_tokens * len(prep.prompts)}
    return usage


def _finish(reason: str) -> str:
    """The OpenAI finish reason: a generation stopped by the run-time limit ends as "length" (cut
    short by a server limit, like max_tokens; the response says which)."""
    return "length" if reason in ("length", TIME_LIMIT) else "stop"


def _kvsift_info(prep: Prepared, outputs: dict[int, RequestOutput]) -> dict[str, Any]:
    info = {"kv_method": prep.method_spec, "kv_budget": prep.budget, "context_id": prep.context_id,
            "stats": [outputs[i].stats.to_dict() for i in sorted(outputs)]}
    if any(o.finish_reason == TIME_LIMIT for o in outputs.values()):
        info["stopped"] = TIME_LIMIT
    return info


def _full_response(state: ServerState, prep: Prepared, outputs: dict[int, RequestOutput], rid: str, created: int,
                   chat: bool) -> dict[str, Any]:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                    "finish_reason": _finish(o.finish_reason)} for i, o in sorted(outputs.items())]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": _finish(o.finish_reason)}
                   for i, o in sorted(outputs.items())]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": choices,
            "usage": _usage(prep, outputs), "kvsift": _kvsift_info(prep, outputs)}


def _data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(state: ServerState, job: Job, ereq: EngineRequest, prep: Prepared, rid: str, created: int,
               chat: bool, include_usage: bool):
    """Server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``. If the client goes away,
    starlette cancels this generator and ``finally`` cancels the job."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None, stopped: bool = False):
        c = {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": choices}
        if include_usage:
            c["usage"] = usage
        if stopped:
            c["kvsift"] = {"stopped": TIME_LIMIT}
        return _data(c)

    outputs: dict[int, RequestOutput] = {}
    try:
        await state.scheduler.run(job, ereq)
        if chat:
            for i in range(len(prep.prompts)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        first = True
        async for ev in _events(state, job):
            ev: StreamEvent
            if first:
                state.metrics.ttft.observe(time.perf_counter() - job.arrived)
                first = False
            reason, stopped = None, False
            if ev.output is not None:
                outputs[ev.index] = ev.output
                reason = _finish(ev.output.finish_reason)
                stopped = ev.output.finish_reason == TIME_LIMIT
            if not ev.text and reason is None:
                continue
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                yield chunk([{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": reason}],
                            stopped=stopped)
            else:
                yield chunk([{"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": reason}],
                            stopped=stopped)
        if include_usage:
            yield chunk([], _usage(prep, outputs))
    except KVSiftError as e:
        yield _data(exc_body(e))
    finally:
        _release(state, job)  # stops the decode loop when the client left
    yield "data: [DONE]\n\n"


# ---- contexts ---------------------------------------------------------------------------------------
async def _create_context(state: ServerState, req: ContextRequest, request: Request, who: Principal):
    key = request.headers.get("idempotency-key")
    if key is None:
        rec = await _until_disconnect(request, None, _make_context(state, req, who, None, None))
        return rec.public()
    if not _IDEMPOTENCY_KEY_RE.match(key):
        raise APIError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
                       param="Idempotency-Key", code="invalid_idempotency_key")
    digest = hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    slot = (who.owner, key)
    done = state.store.find_idempotent(who.owner, key)
    if done is not None:
        if done.meta.get("request_hash") != digest:
            raise IdempotencyKeyReusedError(f"Idempotency-Key {key!r} was used for a different request",
                                            param="Idempotency-Key")
        return JSONResponse(done.public(), headers={"Idempotent-Replayed": "true"})
    running = state.inflight.get(slot)
    if running is not None:
        if running[0] != digest:
            raise IdempotencyKeyReusedError(f"Idempotency-Key {key!r} is in use for a different request",
                                            param="Idempotency-Key")
        task = running[1]
    else:
        # with a key, the work goes on when the client leaves: its retry gets the same context
        task = asyncio.ensure_future(_make_context(state, req, who, key, digest))
        state.inflight[slot] = (digest, task)

        def done(t: asyncio.Task) -> None:
            state.inflight.pop(slot, None)
            if not t.cancelled():
                t.exception()  # retrieved here: the clients that waited got it; none may be left

        task.add_done_callback(done)
    rec = await _until_disconnect(request, None, asyncio.shield(task))
    return JSONResponse(rec.public(), headers={"Idempotent-Replayed": "true"} if running is not None else None)


async def _make_context(state: ServerState, req: ContextRequest, who: Principal, idem_key: str | None,
                        digest: str | None) -> ContextRecord:
    """Admit (the key's and the queue's limits: 429 before any work), validate, hold room (count,
    memory, disk), prefill, keep: the context's record."""
    job = state.scheduler.new_job(who)
    try:
        return await _build_context(state, req, who, idem_key, digest, job)
    finally:
        _release(state, job)


async def _build_context(state: ServerState, req: ContextRequest, who: Principal, idem_key: str | None,
                         digest: str | None, job: Job) -> ContextRecord:
    llm = state.llm
    _check_model(state, req.model)
    m, spec, budget = _method(state, req.kv_method, req.kv_budget, req.kv_options, state.config.default_method,
                              state.config.default_budget)
    chat = llm.info.is_chat if req.chat is None else req.chat
    if chat and not llm.info.is_chat:
        raise APIError(400, "this model has no chat template: use chat=false", param="chat", code="no_chat_template")

    def encode():
        if isinstance(req.document, str):
            _check_chars(state, len(req.document), 0, "the document", "document")
            return llm.encode_document(req.document, chat)
        _check_token_ids(llm, req.document, "document")
        return list(req.document)

    ids = await asyncio.to_thread(encode)
    _check_length(state, len(ids), "the document", "document")
    try:
        mrun = m.start(len(ids), llm.info.num_layers)  # budget vs. length, before queueing
    except (ValueError, TypeError) as e:
        raise _method_error(e, spec) from None
    # room for it, before any compute: from the tokens the budget keeps and the model's shape
    kept = min(len(ids), mrun.tokens)
    kv_est = kept * llm.kv_bytes_per_token
    dev, host = request_kv_bytes(llm.kv_bytes_per_token, 1, len(ids), mrun.tokens, 0,
                                 offloads=m.host_share(llm.info.head_dim))
    ereq = EngineRequest([ids], None, m, mrun, kv_bytes=dev, host_bytes=host, kind="prefill")
    state.scheduler.engine.check(ereq)
    reservation: Reservation = state.store.reserve(who.owner, kv_est, kv_est + 8 * len(ids), req.persist)
    try:
        def work(j: Job):
            j.emit(llm.prefill_context(ids, method=m, chat=chat, progress=False))

        async def run():
            await state.scheduler.run(job, ereq, work)
            async for item in _events(state, job):
                await job.ended.wait()  # the key's slot is free before the answer goes out
                return item
            raise APIError(499, "client disconnected", code="client_disconnected")

        try:
            ctx: Context = await run()
        except KVSiftError as e:
            raise _method_error(e, spec) from None
        ctx.method_kwargs = dict(req.kv_options or {})  # answers re-build the method with the same options
        meta = {"created": int(time.time()), "model": state.model_id, "owner": who.owner, "kv_method": spec,
                "kv_budget": budget, "kv_options": ctx.method_kwargs, "chat": chat, "stats": ctx.stats.to_dict(),
                "metadata": req.metadata or {}}
        if idem_key is not None:
            meta.update(idempotency_key=idem_key, request_hash=digest)
        rec = await asyncio.to_thread(state.store.add, ctx, meta, req.persist, reservation)
    finally:
        state.store.release(reservation)
    state.metrics.prompt_tokens.inc(len(ids))
    return rec
