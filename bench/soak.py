"""Bounded soak test of the server on loopback: N clients for T seconds with a mix of normal,
cancelled and bad requests; reports requests served, outcomes by class, latencies and the
server's RSS before and after. It stops by itself (deadline + per-request timeouts).

    python bench/soak.py --clients 8 --seconds 180            # starts a tiny random-weight model server
    python bench/soak.py --url http://127.0.0.1:8000 --api-key KEY --pid 1234 --seconds 60

Only loopback URLs are accepted. Exit status 1 when a request failed unexpectedly (a 5xx, a
connection error on a request that was not cancelled on purpose, a 4xx on a valid request other
than 429 busy) or when the server does not answer /health at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class Soak:
    def __init__(self, url: str, key: str | None, seconds: float, clients: int, seed: int, timeout: float):
        self.url, self.seconds, self.clients, self.seed, self.timeout = url, seconds, clients, seed, timeout
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.outcomes: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.deadline = 0.0

    # ---- bookkeeping ------------------------------------------------------------------------------
    def record(self, kind: str, outcome: str, ok: bool, dt: float | None = None) -> None:
        with self.lock:
            self.by_kind[kind] += 1
            self.outcomes[outcome] += 1
            if not ok:
                self.unexpected[f"{kind}: {outcome}"] += 1
            if dt is not None and ok:
                self.latency.setdefault(kind, []).append(dt)

    @staticmethod
    def classify(r: httpx.Response) -> str:
        if r.status_code < 400:
            return f"{r.status_code}"
        try:
            code = r.json()["error"]["code"]
        except Exception:  # noqa: BLE001
            code = "not-openai-shaped"
        return f"{r.status_code}:{code}"

    # ---- the request mix ----------------------------------------------------------------------------
    def normal(self, c: httpx.Client, rng: random.Random) -> None:
        kind = rng.choice(["completion", "chat", "snapkv"])
        if kind == "chat":
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Say {rng.random()}"}]}
        else:
            path, body = "/v1/completions", {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))}
        body.update(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 0.8]), seed=rng.randint(0, 2**31))
        if kind == "snapkv":
            body.update(kv_method="snapkv", kv_budget=0.5, kv_options={"window": 4})
        t0 = time.perf_counter()
        r = c.post(path, json=body, headers=self.headers, timeout=self.timeout)
        out = self.classify(r)
        self.record(kind, out, r.status_code == 200 or out == "429:server_busy", time.perf_counter() - t0)

    def stream(self, c: httpx.Client, rng: random.Random, cancel: bool) -> None:
        kind = "stream_cancelled" if cancel else "stream"
        body = {"prompt": "Once upon a time " * rng.randint(1, 40), "max_tokens": 12 if not cancel else 64,
                "stream": True, "ignore_eos": cancel}
        t0 = time.perf_counter()
        with c.stream("POST", self.url + "/v1/completions", json=body, headers=self.headers,
                      timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                out = self.classify(r)
                self.record(kind, out, out == "429:server_busy")
                return
            n, done = 0, False
            for line in r.iter_lines():
                if line.startswith("data: "):
                    n += 1
                    done = line == "data: [DONE]"
                    if '"error"' in line and not done:
                        self.record(kind, "stream-error-event", False)
                        return
                    if cancel and n >= 2:
                        break  # leave mid-stream: the server must cancel the generation
        if cancel:
            self.record(kind, "cancelled", True)
        else:
            self.record(kind, "200" if done else "stream-without-[DONE]", done, time.perf_counter() - t0)

    def give_up(self, c: httpx.Client, rng: random.Random) -> None:
        """A non-streaming request whose client leaves before the answer."""
        try:
            c.post("/v1/completions", json={"prompt": "x " * 50, "max_tokens": 64, "ignore_eos": True},
                   headers=self.headers, timeout=0.05)
            self.record("gave_up", "answered-in-time", True)
        except httpx.TimeoutException:
            self.record("gave_up", "cancelled", True)

    def bad(self, c: httpx.Client, rng: random.Random) -> None:
        kind = rng.choice(["bad_json", "surrogate", "unknown_method", "max_tokens", "kv_options", "too_large",
                           "no_key", "budget", "seed", "context_missing"])
        h = dict(self.headers, **{"content-type": "application/json"})
        if kind == "bad_json":
            r = c.post("/v1/completions", content=b'{"prompt": ', headers=h, timeout=self.timeout)
        elif kind == "surrogate":
            r = c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
                       headers=h, timeout=self.timeout)
        elif kind == "too_large":
            r = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}', headers=h,
                       timeout=self.timeout)
        elif kind == "no_key" and self.headers:
            r = c.post("/v1/completions", json={"prompt": "x"}, timeout=self.timeout)
        else:
            body = {"unknown_method": {"prompt": "x", "kv_method": "nope"},
                    "max_tokens": {"prompt": "x", "max_tokens": 2**63},
                    "kv_options": {"prompt": "x", "kv_method": "snapkv", "kv_budget": 4, "kv_options": {"window": "8"}},
                    "budget": {"prompt": [5, 6, 7], "kv_method": "snapkv", "kv_budget": 500},
                    "seed": {"prompt": "x", "seed": 2**70},
                    "context_missing": {"prompt": "x", "context_id": "ctx_" + "0" * 32},
                    "no_key": {"prompt": "x", "stream": "yes"}}[kind]
            r = c.post("/v1/completions", json=body, headers=self.headers, timeout=self.timeout)
        out = self.classify(r)
        self.record("bad:" + kind, out, 400 <= r.status_code < 500 and "not-openai" not in out)

    def contexts(self, c: httpx.Client, rng: random.Random) -> None:
        doc = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 600)))
        body = {"document": doc, "kv_method": rng.choice(["full", "snapkv"]), "persist": rng.random() < 0.5}
        if body["kv_method"] == "snapkv":
            body["kv_budget"] = 0.5
        r = c.post("/v1/contexts", json=body, headers=self.headers, timeout=self.timeout)
        out = self.classify(r)
        # a full store or memory pressure are expected answers under load, not failures
        self.record("context_create", out, r.status_code == 200 or out in ("429:server_busy", "409:too_many_contexts"))
        if r.status_code != 200:
            return
        cid = r.json()["id"]
        for _ in range(rng.randint(1, 3)):
            q = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "What is it about?"}],
                                                     "max_tokens": 4, "context_id": cid},
                       headers=self.headers, timeout=self.timeout)
            out = self.classify(q)
            # another client's context may push a non-persisted one out: 410 is the honest answer
            self.record("context_ask", out, q.status_code == 200 or out in ("429:server_busy", "410:context_evicted"))
        d = c.delete(f"/v1/contexts/{cid}", headers=self.headers, timeout=self.timeout)
        out = self.classify(d)
        self.record("context_delete", out, d.status_code == 200 or out in ("410:context_evicted",))

    # ---- run ------------------------------------------------------------------------------------------
    def client(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        mix = [(self.normal, 40), (lambda c, r: self.stream(c, r, False), 10),
               (lambda c, r: self.stream(c, r, True), 10), (self.give_up, 5), (self.bad, 25), (self.contexts, 10)]
        funcs, weights = zip(*mix)
        with httpx.Client(base_url=self.url) as c:
            while time.monotonic() < self.deadline:
                fn = rng.choices(funcs, weights)[0]
                try:
                    fn(c, rng)
                except httpx.HTTPError as e:
                    self.record(getattr(fn, "__name__", "stream"), f"exception:{type(e).__name__}", False)

    def run(self) -> None:
        self.deadline = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + self.timeout + 30)


WORDS = ("the quick brown fox jumps over a lazy dog while seven keepers write numbers in the old logbook "
         "near the lighthouse at dawn and the river runs north past the mill").split()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (loopback only); default: start a tiny one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--pid", type=int, default=None, help="the server's pid, for its RSS (with --url)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="per request")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 3600 or not 1 <= args.clients <= 256:
        ap.error("--seconds must be in (0, 3600] and --clients in [1, 256]")

    srv, tmp = None, None
    if args.url is None:
        from kvsift.server.testing import ServerProcess

        tmp = tempfile.TemporaryDirectory(prefix="kvsift-soak-")
        model_dir = _tiny_model(Path(tmp.name) / "tiny")
        args.api_key = args.api_key or "soak-key-0001"
        srv = ServerProcess(["--model", str(model_dir), "--contexts-dir", str(Path(tmp.name) / "contexts"),
                             "--api-key", args.api_key, "--chunk-size", "64", "--max-tokens-cap", "64",
                             "--context-memory", "2M", "--contexts-disk-limit", "64M", "--max-contexts", "200",
                             "--max-waiting", str(4 * args.clients)])
        srv.start()
        url, pid = srv.url, srv.proc.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
        if urlparse(url).hostname not in LOOPBACK:
            ap.error("--url must be a loopback address")
    try:
        soak = Soak(url, args.api_key, args.seconds, args.clients, args.seed, args.timeout)
        with httpx.Client(base_url=url) as c:  # warm up, then the baseline RSS
            for _ in range(5):
                c.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, headers=soak.headers, timeout=60)
        rss0, t0 = rss(pid), time.monotonic()
        peak = [rss0 or 0]
        stop = threading.Event()

        def sample():
            while not stop.wait(1.0):
                peak[0] = max(peak[0], rss(pid) or 0)

        threading.Thread(target=sample, daemon=True).start()
        soak.run()
        stop.set()
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # cancelled generations finish their last step
        health = httpx.get(url + "/health", headers=soak.headers, timeout=10)
        mtext = httpx.get(url + "/metrics", headers=soak.headers, timeout=10).text
        rss1 = rss(pid)
    finally:
        if srv is not None:
            srv.stop()
        if tmp is not None:
            tmp.cleanup()

    total = sum(soak.outcomes.values())
    lat = {k: {"n": len(v), "p50_ms": round(1000 * statistics.median(v), 1),
               "p99_ms": round(1000 * sorted(v)[round(0.99 * (len(v) - 1))], 1)}
           for k, v in sorted(soak.latency.items())}
    report = {
        "clients": args.clients, "seconds": round(elapsed, 1), "requests": total,
        "requests_per_s": round(total / elapsed, 2) if elapsed else None,
        "by_kind": dict(sorted(soak.by_kind.items())), "outcomes": dict(sorted(soak.outcomes.items())),
        "unexpected": dict(sorted(soak.unexpected.items())), "latency": lat,
        "rss_mib": {"before": _mib(rss0), "after": _mib(rss1), "peak": _mib(peak[0])},
        "health_after": health.status_code,
        "server": {"running": metric(mtext, "kvsift_requests_running"),
                   "waiting": metric(mtext, "kvsift_requests_waiting"),
                   "cancelled": metric(mtext, 'kvsift_generations_total{reason="cancelled"}'),
                   "evicted_unpersisted": metric(mtext, 'kvsift_contexts_evicted_total{persisted="false"}')},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 0 if not soak.unexpected and health.status_code == 200 else 1


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _tiny_model(path: Path) -> Path:
    from transformers import AutoTokenizer

    from kvsift.models import save_tiny_model
    from kvsift.models.loader import _convert_gguf, default_model_path

    tok = AutoTokenizer.from_pretrained(_convert_gguf(default_model_path()))
    return save_tiny_model(path, tokenizer=tok, seed=1, max_positions=4096)


if __name__ == "__main__":
    sys.exit(main())
