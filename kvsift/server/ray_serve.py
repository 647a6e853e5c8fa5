"""``kvsift serve --replicas N [--ray-address ADDR]``: N engine replicas on Ray Serve behind one
OpenAI endpoint, with context-affinity routing.

    kvsift serve --replicas 2 --contexts-dir /shared/contexts        # local Ray, started and stopped here
    kvsift serve --replicas 8 --ray-address auto --contexts-dir /nfs/kvsift/contexts   # an existing cluster

One Serve application (``kvsift``) of two deployments:

* ``Engine``: N replicas (one GPU each where the cluster has GPUs, else one CPU), each owning an
  ``LLM`` and the very app of the single-process server (``create_app``), so routes, validation,
  limits and error shapes have one source. A replica answers a request forwarded to it as ASGI
  messages (:meth:`EngineReplica.forward`: the request in, the response's start then its body
  chunks out, as a Serve streaming call; SSE streams stay streams).
* ``Ingress``: one replica (no CPU reserved) behind Serve's HTTP proxy. It checks the API key and
  the body size first (the app's own middleware), finds the context a request is about
  (``context_id`` in a completion's body, or ``/v1/contexts/{id}``), and calls ``Engine``
  through a ``DeploymentHandle`` whose request router is :class:`ContextAffinityRouter` (Serve's
  ``RequestRouter`` API): a request for a context goes to the replica that holds it; any other
  request to the least loaded replica (fewest ongoing requests, from Serve's queue-length probes
  and cache; ties broken at random).

Which replica holds which context the ingress learns from the answers (every answer names its
replica, header ``X-Kvsift-Replica``): the replica that created a context, or the last one that
answered from it. Contexts are persisted in ``--contexts-dir``, which every replica shares
(``ServerConfig.shared_contexts``): when the holder is gone (its requests fail with an actor error,
or Serve has removed it), the ingress sends the request again without the affinity, to another
replica, which loads the context from disk and becomes its holder. A request is sent again only
while no byte of its answer has gone to the client (at most ``ATTEMPTS`` times); a stream cut by
a replica's death ends with an OpenAI-shaped error event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvsift.server.app import _Auth, _BodyLimit
from kvsift.server.cli import _bind, http_url, write_ready
from kvsift.server.config import ServerConfig
from kvsift.server.contexts import ID_RE
from kvsift.server.errors import _TYPES, error_body
from kvsift.server.metrics import Metrics

log = logging.getLogger("kvsift.server")

APP_NAME = "kvsift"
SERVE_NAMESPACE = "serve"          # the Ray namespace of Serve's actors
REPLICA_HEADER = "X-Kvsift-Replica"
ATTEMPTS = 3                       # tries of one request when replicas die under it
MAX_HOLDERS = 100_000              # context -> holder entries the ingress remembers (LRU)
_CONTEXT_PATH = re.compile(r"^/v1/contexts/([^/]+)$")
_GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


# ---- routing ---------------------------------------------------------------------------------------
class ContextAffinityRouter(RequestRouter):
    """Serve request router of the ``Engine`` deployment. A request whose ``holder`` keyword names
    a live replica goes there (and waits for it when it is at ``max_ongoing_requests``: the
    context's KV is there); any other request, or one whose holder is gone, goes to the least
    loaded replica: all candidates in one rank, so Serve picks the one with the fewest ongoing
    requests among those with room (queue lengths cached, probed when stale), ties at random."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        holder = pending_request.kwargs.get("holder") if pending_request is not None else None
        if holder:
            for r in candidate_replicas:
                if r.replica_id.unique_id == holder:
                    return [[r]]
        ranked = list(candidate_replicas)
        random.shuffle(ranked)  # the first of equal queue lengths wins: ties at random
        return [ranked]


# ---- engine replicas -----------------------------------------------------------------------------
async def asgi_call(app, req: dict[str, Any]):
    """Run one HTTP request through an ASGI app in process: yields the response's start
    (``{"status", "headers"}``) and then its body chunks (bytes). Leaving the generator early
    (the caller cancelled: its client left) is a client disconnect for the app."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req["method"], "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(),
             "root_path": "", "query_string": req.get("query_string", b""), "headers": req["headers"],
             "client": tuple(req["client"]) if req.get("client") else None, "server": ("127.0.0.1", 0)}
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req.get("body", b""), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        await messages.put(msg)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _t: messages.put_nowait(None))
    try:
        while True:
            msg = await messages.get()
            if msg is None:  # the app returned (or failed) without finishing its response
                task.result()
                raise RuntimeError("the app ended without a complete response")
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                                   for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    break
    finally:
        disconnected.set()
        if not task.done():  # the app sees the disconnect and stops its job; bounded
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:
                task.cancel()


class EngineReplica:
    """One engine replica: an ``LLM`` and the single-process server's app (``create_app``)."""

    def __init__(self, llm_kwargs: dict[str, Any], config: ServerConfig, threads: int | None = None,
                 log_level: str = "warning"):
        import torch
        import transformers

        from kvsift.engine import LLM
        from kvsift.server.app import create_app

        logging.getLogger("kvsift").setLevel(log_level.upper())
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        self.llm = LLM(**llm_kwargs)
        self.app = create_app(self.llm, config)
        rid = serve.get_replica_context().replica_id
        self.info = {"id": rid.unique_id, "actor": rid.to_full_id_str(), "pid": os.getpid(),
                     "actor_id": ray.get_runtime_context().get_actor_id(),
                     "node": ray.get_runtime_context().get_node_id(), "device": str(self.llm.info.device)}

    async def forward(self, req: dict[str, Any], holder: str | None = None):
        """A request forwarded by the ingress (``holder``: the routing hint, read by the router)."""
        first = True
        async for item in asgi_call(self.app, req):
            if first:
                item = dict(item, replica=self.info)
                first = False
            yield item

    def __del__(self):
        state = getattr(getattr(getattr(self, "app", None), "state", None), "kvsift", None)
        if state is not None:
            state.scheduler.shutdown()


# ---- ingress -----------------------------------------------------------------------------------------
def _context_of(method: str, path: str, body: bytes) -> str | None:
    """The context a request is about: ``/v1/contexts/{id}``, or a completion's ``context_id``."""
    m = _CONTEXT_PATH.match(path)
    if m:
        return m.group(1) if ID_RE.match(m.group(1)) else None
    if method == "POST" and path in _GENERATE_PATHS and b'"context_id"' in body:
        try:
            cid = json.loads(body).get("context_id")
        except (ValueError, AttributeError):
            return None  # the replica answers the 400
        return cid if isinstance(cid, str) and ID_RE.match(cid) else None
    return None


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, kind, None, code), status_code=status, headers=headers)


def _internal_error(method: str, path: str) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.error("forwarding %s %s failed (reference %s)", method, path, ref, exc_info=True)
    return _error(500, f"the request failed (reference {ref}; see the server log)", "internal_error")


def _controller_view(actor_names: list[str]) -> tuple[set[str], dict[str, Any] | None]:
    """(names of these replica actors that are gone, the Engine deployment's status from Serve);
    blocking calls to Ray's GCS and Serve's controller."""
    gone = set()
    for name in actor_names:
        try:  # a replica's actor name goes away with it
            ray.get_actor(name, namespace=SERVE_NAMESPACE)
        except ValueError:
            gone.add(name)
    try:
        dep = serve.status().applications[APP_NAME].deployments["Engine"]
        deployment = {"status": str(getattr(dep.status, "value", dep.status)),
                      "replica_states": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}}
    except Exception:  # noqa: BLE001 - the controller's view is extra information only
        deployment = None
    return gone, deployment


@serve.ingress()
class Ingress:
    """The HTTP side: auth and body size, context affinity, retries on replica death."""

    def __init__(self, engine, config: ServerConfig, model_id: str):
        self.engine = engine.options(stream=True)
        self.config, self.model_id = config, model_id
        self.holders: OrderedDict[str, str] = OrderedDict()   # context id -> replica id
        self.replicas: dict[str, dict[str, Any]] = {}           # replica id -> what the ingress saw of it

    def __serve_build_asgi_app__(self):
        app = FastAPI(title="kvsift", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_Auth, config=self.config, metrics=Metrics(self.model_id))
        app.add_middleware(_BodyLimit, limit=self.config.max_body_bytes)

        @app.get("/v1/replicas")
        async def replicas(request: Request):
            who = request.scope.get("state", {}).get("principal")
            if who is None or not who.admin:  # pids, actor names and every owner's context count: admins only
                return _error(403, "GET /v1/replicas needs an admin key", "admin_key_required")
            names = [r["actor"] for r in self.replicas.values() if r["state"] == "serving"]
            gone, deployment = await asyncio.to_thread(_controller_view, names)
            return self.status(gone, deployment)

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
        async def forward(request: Request):
            return await self.forward(request)

        return app

    # ---- what the ingress knows ----
    def status(self, gone: set[str], deployment: dict[str, Any] | None) -> dict[str, Any]:
        held: dict[str, int] = {}
        for rid in self.holders.values():
            held[rid] = held.get(rid, 0) + 1
        for r in self.replicas.values():
            if r["actor"] in gone:
                r["state"] = "gone"
        data = [dict(r, contexts=held.get(rid, 0)) for rid, r in self.replicas.items()]
        out: dict[str, Any] = {"object": "list", "data": data, "routing": "context affinity, else least loaded"}
        if deployment is not None:
            out["deployment"] = deployment
        return out

    def _seen(self, info: dict[str, Any]) -> None:
        r = self.replicas.setdefault(info["id"], {**info, "state": "serving", "requests": 0})
        r.update(state="serving", last_seen=time.time())
        r["requests"] += 1

    def _failed(self, e: BaseException) -> None:
        actor = getattr(e, "actor_id", None)
        if actor is not None and not isinstance(actor, str):
            actor = actor.hex()
        for r in self.replicas.values():
            if actor and r.get("actor_id") == actor:
                r["state"] = "gone"
        for cid, rid in list(self.holders.items()):
            if self.replicas.get(rid, {}).get("state") == "gone":
                del self.holders[cid]

    def _hold(self, cid: str, rid: str) -> None:
        self.holders[cid] = rid
        self.holders.move_to_end(cid)
        while len(self.holders) > MAX_HOLDERS:
            self.holders.popitem(last=False)

    def _learn(self, method: str, path: str, cid: str | None, rid: str, status: int, body: bytes | None) -> None:
        if method == "POST" and path == "/v1/contexts" and status == 200 and body:
            try:
                new = json.loads(body).get("id")
            except (ValueError, AttributeError):
                new = None
            if isinstance(new, str):
                self._hold(new, rid)
        elif cid is not None:
            # not a 404: that may be another owner asking (the context lives on); a stale entry only
            # sends requests to a replica that answers 404 itself
            if status == 410 or (method == "DELETE" and status == 200):
                self.holders.pop(cid, None)
            elif status == 200:
                self._hold(cid, rid)

    # ---- forwarding ----
    async def forward(self, request: Request):
        body = await request.body()
        method, path = request.method, request.url.path
        req = {"method": method, "path": path, "query_string": request.scope.get("query_string", b""),
               "headers": list(request.scope.get("headers", [])), "body": body,
               "client": list(request.client) if request.client else None}
        cid = _context_of(method, path, body)
        holder = self.holders.get(cid) if cid is not None else None
        gen, start = None, None
        for attempt in range(ATTEMPTS):
            gen = self.engine.forward.remote(req, holder=holder)
            try:
                start = await gen.__anext__()
                break
            except RayActorError as e:  # the replica died (or is unreachable) before answering: send it again
                log.warning("replica failed under %s %s (attempt %d): %s", method, path, attempt + 1,
                            type(e).__name__)
                self._failed(e)
                if cid is not None:
                    self.holders.pop(cid, None)
                holder = None
            except asyncio.CancelledError:  # the client left: so does the replica's work
                gen.cancel()
                raise
            except Exception:  # noqa: BLE001 - a bug: OpenAI's shape, a reference, no internals
                return _internal_error(method, path)
        if start is None:
            return _error(503, f"no engine replica could answer after {ATTEMPTS} attempts; retry later",
                          "replica_unavailable", {"Retry-After": "1"})
        info = start["replica"]
        self._seen(info)
        status = start["status"]
        headers = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
        headers[REPLICA_HEADER] = info["id"]
        if headers.get("content-type", "").startswith("text/event-stream"):
            if cid is not None:
                self._learn(method, path, cid, info["id"], status, None)
            return StreamingResponse(self._stream(gen), status_code=status, headers=headers)
        chunks = []
        try:
            async for chunk in gen:
                chunks.append(chunk)
        except RayActorError as e:
            self._failed(e)
            return _error(502, "the engine replica failed while sending its answer; retry", "replica_failed",
                          {"Retry-After": "1"})
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception:  # noqa: BLE001
            return _internal_error(method, path)
        content = b"".join(chunks)
        self._learn(method, path, cid, info["id"], status, content)
        return Response(content, status_code=status, headers=headers)

    async def _stream(self, gen):
        done = False
        try:
            async for chunk in gen:
                yield chunk
            done = True
        except RayActorError as e:
            self._failed(e)
            err = error_body("the engine replica serving this stream failed; retry the request", "server_error",
                             None, "replica_failed")
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
            done = True
        finally:
            if not done:  # the client left: stop the replica's generation
                gen.cancel()


# ---- the cluster side (driver) --------------------------------------------------------------------------
def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


class ReplicaServer:
    """Starts Ray (local, or connects to ``address``), Serve's proxy on ``config.host:port`` and the
    application; :meth:`stop` deletes the application and, for a local Ray, shuts Serve and Ray down."""

    def __init__(self, llm_kwargs: dict[str, Any], config: ServerConfig, replicas: int, address: str | None = None,
                 log_level: str = "warning", on_connected=None):
        self.llm_kwargs, self.config, self.replicas = dict(llm_kwargs), config, replicas
        self.on_connected = on_connected  # called right after ray.init (which installs its own signal handlers)
        self.address, self.log_level = address, log_level
        self.port = config.port
        self.started_ray = False
        self.gpus = 0.0

    @property
    def url(self) -> str:
        return http_url(self.config.host, self.port)

    def start(self) -> "ReplicaServer":
        level = getattr(logging, self.log_level.upper(), logging.WARNING)
        device = str(self.llm_kwargs.get("device") or "auto")
        if self.address is None and device != "cpu":  # refused before Ray starts
            import torch

            have = torch.cuda.device_count()
            if have and self.replicas > have:
                raise ValueError(f"--replicas {self.replicas} needs one GPU each, and this machine has {have} "
                                 f"(fewer replicas, or --device cpu)")
        if device.startswith("cuda:"):  # a replica sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES)
            self.llm_kwargs["device"] = "cuda"
        if self.address is None:
            cpus = os.cpu_count() or 1
            # the workers (started by this Ray, with this environment) import this very kvsift
            root = str(Path(__file__).resolve().parents[2])
            paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            if root not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a local run
            ray.init(address="local", num_cpus=max(cpus, self.replicas), include_dashboard=False,
                     object_store_memory=512 * 2**20, logging_level=level, log_to_driver=True)
            self.started_ray = True
        else:
            try:
                ray.init(address=self.address, logging_level=level, log_to_driver=True)
            except (ConnectionError, RuntimeError) as e:  # no cluster there, or it refused us (auth token)
                raise ValueError(f"cannot connect to the Ray cluster at --ray-address {self.address}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        try:
            if self.on_connected is not None:
                self.on_connected()
            self.gpus = cluster_gpus() if device != "cpu" else 0.0
            threads = None
            if self.gpus >= 1:
                actor = {"num_gpus": 1, "num_cpus": 1}
            else:
                actor = {"num_cpus": 1}
                if self.address is None:  # share this machine's cores between the replicas
                    threads = max(1, (os.cpu_count() or 1) // self.replicas)
            serve.start(http_options={"host": self.config.host, "port": self.port},
                        logging_config={"log_level": logging.getLevelName(level)})
            engine = serve.deployment(
                EngineReplica, name="Engine", num_replicas=self.replicas, ray_actor_options=actor,
                max_ongoing_requests=self.config.max_waiting + self.config.max_batch + 8,
                request_router_config=RequestRouterConfig(request_router_class=ContextAffinityRouter),
                graceful_shutdown_timeout_s=5, health_check_period_s=5)
            ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                       max_ongoing_requests=10_000, graceful_shutdown_timeout_s=5)
            model_id = self.config.model_name or _model_name(self.llm_kwargs.get("model"))
            serve.run(ingress.bind(engine.bind(self.llm_kwargs, self.config, threads, self.log_level),
                                   self.config, model_id), name=APP_NAME, route_prefix="/",
                      logging_config={"log_level": logging.getLevelName(level), "enable_access_log": level <= logging.INFO})
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 - stopping: report and go on
            log.warning("stopping Serve: %s", e)
        finally:
            ray.shutdown()


def _model_name(model) -> str:
    from kvsift.models import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    return Path(str(model)).name if os.sep in str(model) or Path(str(model)).exists() else str(model)


def free_port(host: str) -> int:
    """A port free on ``host`` now (Serve's proxy binds it itself)."""
    with _bind(host, 0) as s:
        return s.getsockname()[1]


def run_replicas(args, config: ServerConfig) -> int:
    """``kvsift serve --replicas N``: start, serve until SIGINT / SIGTERM, stop (``finally``)."""
    if config.port == 0:
        config.port = free_port(config.host)
    llm_kwargs = {"model": args.model, "device": args.device, "dtype": args.dtype, "chunk_size": args.chunk_size,
                  "kv_arena": args.kv_arena, "join_chunks": getattr(args, "join_chunks", 1),
                  "join_chunk_size": getattr(args, "join_chunk_size", None),
                  "join_order": getattr(args, "join_order", "together"),
                  "max_batched_tokens": getattr(args, "max_batched_tokens", 16384)}
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def on_signals():  # SIGTERM / SIGINT end the loop below, so that `finally` stops Serve and Ray
        for s in signals:
            signal.signal(s, lambda *_: stop.set())

    on_signals()
    server = ReplicaServer(llm_kwargs, config, args.replicas or 1, args.ray_address, args.log_level,
                           on_connected=on_signals)
    t0 = time.perf_counter()
    try:
        server.start()
        where = "local Ray" if args.ray_address is None else f"Ray at {args.ray_address}"
        each = "one GPU each" if server.gpus >= 1 else "CPU"
        print(f"kvsift: serving {server.replicas} engine replicas ({each}, {where}, up in "
              f"{time.perf_counter() - t0:.1f}s) on {server.url}/v1", file=sys.stderr, flush=True)
        if args.ready_file is not None:
            write_ready(args.ready_file, config.host, config.port, replicas=server.replicas)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
