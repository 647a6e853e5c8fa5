"""The OpenAI-compatible FastAPI app: completions, chat completions (plain and SSE streaming),
models, reusable contexts, health and Prometheus metrics.

    app = create_app(LLM(), ServerConfig(contexts_dir="~/.cache/kvsift/contexts"))
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from kvsift.engine import Context, RequestOutput, SamplingParams, StreamEvent
from kvsift.methods import KVMethod, build_method, parse_budget
from kvsift.server.config import ServerConfig
from kvsift.server.contexts import ContextRecord, ContextStore, model_fingerprint
from kvsift.server.errors import APIError, error_body, install_error_handlers
from kvsift.server.metrics import Metrics
from kvsift.server.scheduler import Job, JobFailed, Scheduler
from kvsift.server.schemas import ChatCompletionRequest, CompletionRequest, ContextRequest

log = logging.getLogger("kvsift.server")

_DISCONNECT_POLL_S = 0.1
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/contexts", "/health", "/metrics")


@dataclass
class ServerState:
    llm: Any
    config: ServerConfig
    model_id: str
    metrics: Metrics
    scheduler: Scheduler
    store: ContextStore
    created: int = field(default_factory=lambda: int(time.time()))


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


# ---- middleware ----------------------------------------------------------------------------------
class _BodyLimit:
    """413 for bodies over ``limit`` bytes (by Content-Length, or counted while streaming in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(send)
        state = {"over": False, "n": 0, "started": False}

        async def limited_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                state["n"] += len(msg.get("body", b""))
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
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body exceeds the server's limit of {self.limit} bytes",
                                     "invalid_request_error", None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
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
                         config.max_contexts, metrics)
    n = store.scan()
    if n or store.skipped:
        log.info("contexts: %d reloaded from %s, %d skipped", n, config.contexts_dir, len(store.skipped))
    state = ServerState(llm, config, model_id, metrics, Scheduler(config.max_waiting, metrics), store)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.scheduler.shutdown()

    app = FastAPI(title="kvsift", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kvsift = state
    install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_RequestMetrics, metrics=metrics)

    async def auth(request: Request):
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "running": state.scheduler.running,
                "waiting": state.scheduler.waiting, "contexts": len(state.store.records)}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": state.created,
                                            "owned_by": "kvsift", "max_model_len": llm.info.max_positions,
                                            "root": llm.info.source or llm.info.name}]}

    @v1.get("/models/{model_name:path}")
    async def model(model_name: str):
        _check_model(state, model_name)
        return {"id": model_id, "object": "model", "created": state.created, "owned_by": "kvsift",
                "max_model_len": llm.info.max_positions}

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _generate(state, req, request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await _generate(state, req, request, chat=True)

    @v1.post("/contexts")
    async def create_context(req: ContextRequest, request: Request):
        return await _create_context(state, req, request)

    @v1.get("/contexts")
    async def list_contexts():
        recs = await asyncio.to_thread(state.store.list)
        return {"object": "list", "data": [r.public() for r in recs]}

    @v1.get("/contexts/{context_id}")
    async def get_context(context_id: str):
        return _get_record(state, context_id).public()

    @v1.delete("/contexts/{context_id}")
    async def delete_context(context_id: str):
        _get_record(state, context_id)
        try:
            await asyncio.to_thread(state.store.delete, context_id)
        except KeyError:
            raise _no_context(context_id) from None
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    app.include_router(v1)
    return app


def _version() -> str:
    from kvsift import __version__

    return __version__


# ---- validation ------------------------------------------------------------------------------------
def _check_model(state: ServerState, name: str | None) -> None:
    if name in (None, "", state.model_id, state.llm.info.name):
        return
    raise APIError(404, f"the model {name!r} does not exist: this server serves {state.model_id!r}",
                   param="model", code="model_not_found")


def _no_context(cid: str) -> APIError:
    return APIError(404, f"no context with id {cid!r}", param="context_id", code="context_not_found")


def _get_record(state: ServerState, cid: str) -> ContextRecord:
    try:
        return state.store.get(cid)
    except KeyError:
        raise _no_context(cid) from None


def _method(state: ServerState, spec: str | None, budget_in, options: dict | None, default_method: str,
            default_budget) -> tuple[KVMethod, str, Any]:
    try:
        budget = parse_budget(budget_in) if budget_in is not None else default_budget
    except ValueError as e:
        raise APIError(400, str(e), param="kv_budget", code="invalid_kv_budget") from None
    spec = spec if spec is not None else default_method
    try:
        m = build_method(spec, budget, **(options or {}))
    except (ValueError, TypeError) as e:
        msg = str(e)
        if "unknown method" in msg or "non-empty name" in msg:
            raise APIError(400, msg, param="kv_method", code="unknown_kv_method") from None
        if "budget" in msg:
            raise APIError(400, msg, param="kv_budget", code="invalid_kv_budget") from None
        raise APIError(400, msg, param="kv_options", code="invalid_kv_options") from None
    return m, spec, budget


def _value_error(e: ValueError) -> APIError:
    """A ``ValueError`` of the engine (validated before any compute) -> 400."""
    msg = str(e)
    if "budget" in msg:
        return APIError(400, msg, param="kv_budget", code="invalid_kv_budget")
    if "exceeds the model" in msg:
        return APIError(400, msg, param="prompt", code="context_length_exceeded")
    return APIError(400, msg, code="invalid_value")


def _check_length(state: ServerState, n: int, what: str) -> None:
    """The engine's length rule, checked before the request queues."""
    try:
        state.llm.check_length(n, what)
    except ValueError as e:
        raise _value_error(e) from None


def _encode_chat_tail(llm, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that continues a chat context: the context opened the first user
    turn with the document; the first message's text follows it."""
    marker = "\x00KVSIFT\x00"
    msgs = [dict(m) for m in messages]
    msgs[0]["content"] = marker + "\n\n" + msgs[0]["content"]
    text = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(llm.tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"])


def _prepare(state: ServerState, req, chat: bool) -> Prepared:
    """Everything that can fail on bad input, before the request queues (runs in a thread)."""
    llm, cfg = state.llm, state.config
    _check_model(state, req.model)
    ctx, rec = None, None
    if req.context_id is not None:
        _get_record(state, req.context_id)
        try:
            ctx, rec = state.store.acquire(req.context_id)
        except KeyError:
            raise _no_context(req.context_id) from None
        except (OSError, ValueError) as e:
            raise APIError(500, f"context {req.context_id} could not be loaded: {e}", param="context_id",
                           code="context_unavailable") from None
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
    if chat:
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        messages = [{"role": "system" if mm.role == "developer" else mm.role, "content": mm.text()}
                    for mm in req.messages]
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
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    else:
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        prompts = []
        for it in items:
            if isinstance(it, str):
                prompts.append(llm.encode_question(it, chat=ctx_chat) if ctx is not None
                               else llm.encode(it, chat=False))
            else:
                vocab = llm.model.config.get_text_config().vocab_size
                if any(t < 0 or t >= vocab for t in it):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                                   code="invalid_token_id")
                prompts.append(list(it))
        max_tokens = req.max_tokens or 16
    base = ctx.length if ctx is not None else 0
    _check_length(state, base + max(len(x) for x in prompts), "the prompt" + (" with its context" if ctx else ""))
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop=list(req.stop or []), ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return Prepared(prompts, params, m, spec, budget, ctx, req.context_id, base)


# ---- generation ------------------------------------------------------------------------------------
async def _generate(state: ServerState, req, request: Request, chat: bool):
    prep = await asyncio.to_thread(_prepare, state, req, chat)
    job = state.scheduler.new_job()
    if prep.context is not None:
        state.metrics.context_tokens.inc(prep.context_tokens * len(prep.prompts))
    try:
        stream = await asyncio.to_thread(
            state.llm.stream, prep.prompts, prep.params, method=prep.method, context=prep.context,
            progress=False, cancel=job.is_cancelled)
    except ValueError as e:
        state.scheduler.abandon(job)
        raise _value_error(e) from None
    except BaseException:
        state.scheduler.abandon(job)
        raise

    def work(j: Job):
        try:
            for ev in stream:
                if ev.output is not None:  # observed here: a cancelled request has no reader any more
                    _observe_output(state, ev.output)
                j.emit(ev)
        finally:
            stream.close()  # releases the engine lock and the KV of this generation

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        # the background task also runs when the client left before the stream even started
        return StreamingResponse(_sse(state, job, work, prep, rid, created, chat, include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(_release_async, state, job),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outputs = await _until_disconnect(request, job, _collect(state, job, work))
    return JSONResponse(_full_response(state, prep, outputs, rid, created, chat))


def _release(state: ServerState, job: Job) -> None:
    job.cancel()  # no-op once finished
    if job.started is None:
        state.scheduler.abandon(job)


async def _release_async(state: ServerState, job: Job) -> None:  # on the event loop, like the scheduler
    _release(state, job)


async def _collect(state: ServerState, job: Job, work) -> dict[int, RequestOutput]:
    await state.scheduler.run(job, work)
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
        if isinstance(f.exc, ValueError):
            raise _value_error(f.exc) from None
        state.metrics.finished.labels(reason="error").inc()
        log.exception("generation failed", exc_info=f.exc)
        raise APIError(500, f"generation failed: {type(f.exc).__name__}: {f.exc}", code="internal_error") from None


async def _until_disconnect(request: Request, job: Job, coro):
    """Run ``coro``; if the client disconnects first, cancel the job (its decode loop stops)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if task in done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise APIError(499, "client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            job.cancel()
            task.cancel()
        if job.started is None:
            job.cancel()


def _observe_output(state: ServerState, out: RequestOutput) -> None:
    m, s = state.metrics, out.stats
    m.finished.labels(reason=out.finish_reason).inc()
    m.prompt_tokens.inc(s.prompt_tokens)
    m.generation_tokens.inc(len(out.token_ids))
    m.prefill.observe(s.prefill_s)
    if s.decode_steps:
        m.tpot.observe(s.decode_s / s.decode_steps)
    m.request_kv.labels(location="device").observe(s.kv_device_bytes)
    m.request_kv.labels(location="host").observe(s.kv_host_bytes)


def _usage(prep: Prepared, outputs: dict[int, RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(p) + prep.context_tokens for p in prep.prompts)
    completion = sum(len(o.token_ids) for o in outputs.values())
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if prep.context is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": prep.context_tokens * len(prep.prompts)}
    return usage


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _kvsift_info(prep: Prepared, outputs: dict[int, RequestOutput]) -> dict[str, Any]:
    return {"kv_method": prep.method_spec, "kv_budget": prep.budget, "context_id": prep.context_id,
            "stats": [outputs[i].stats.to_dict() for i in sorted(outputs)]}


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


async def _sse(state: ServerState, job: Job, work, prep: Prepared, rid: str, created: int, chat: bool,
               include_usage: bool):
    """Server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``. If the client goes away,
    starlette cancels this generator and ``finally`` cancels the job."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        c = {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _data(c)

    outputs: dict[int, RequestOutput] = {}
    try:
        await state.scheduler.run(job, work)
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
            reason = None
            if ev.output is not None:
                outputs[ev.index] = ev.output
                reason = _finish(ev.output.finish_reason)
            if not ev.text and reason is None:
                continue
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                yield chunk([{"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": reason}])
            else:
                yield chunk([{"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            yield chunk([], _usage(prep, outputs))
    except APIError as e:
        yield _data(e.body())
    finally:
        _release(state, job)  # stops the decode loop when the client left
    yield "data: [DONE]\n\n"


# ---- contexts ---------------------------------------------------------------------------------------
async def _create_context(state: ServerState, req: ContextRequest, request: Request):
    llm = state.llm
    _check_model(state, req.model)
    m, spec, budget = _method(state, req.kv_method, req.kv_budget, req.kv_options, state.config.default_method,
                              state.config.default_budget)
    chat = llm.info.is_chat if req.chat is None else req.chat
    if chat and not llm.info.is_chat:
        raise APIError(400, "this model has no chat template: use chat=false", param="chat", code="no_chat_template")

    def encode():
        if isinstance(req.document, str):
            return llm.encode_document(req.document, chat)
        vocab = llm.model.config.get_text_config().vocab_size
        if any(t < 0 or t >= vocab for t in req.document):
            raise APIError(400, f"document token ids must be in [0, {vocab})", param="document",
                           code="invalid_token_id")
        return list(req.document)

    ids = await asyncio.to_thread(encode)
    _check_length(state, len(ids), "the document")
    try:
        m.start(len(ids), llm.info.num_layers)  # budget vs. length, before queueing
    except ValueError as e:
        raise APIError(400, str(e), param="kv_budget", code="invalid_kv_budget") from None

    job = state.scheduler.new_job()

    def work(j: Job):
        j.emit(llm.prefill_context(ids, method=m, chat=chat, progress=False))

    async def run():
        await state.scheduler.run(job, work)
        async for item in _events(state, job):
            return item
        raise APIError(499, "client disconnected", code="client_disconnected")

    ctx: Context = await _until_disconnect(request, job, run())
    ctx.method_kwargs = dict(req.kv_options or {})  # answers re-build the method with the same options
    meta = {"created": int(time.time()), "model": state.model_id, "kv_method": spec, "kv_budget": budget,
            "kv_options": ctx.method_kwargs, "chat": chat, "stats": ctx.stats.to_dict(),
            "metadata": req.metadata or {}}
    try:
        rec = await asyncio.to_thread(state.store.add, ctx, meta, req.persist)
    except ValueError as e:
        raise APIError(400, str(e), param="kv_budget", code="context_too_large") from None
    except OverflowError as e:
        raise APIError(409, str(e), code="too_many_contexts") from None
    state.metrics.prompt_tokens.inc(len(ids))
    return rec.public()
