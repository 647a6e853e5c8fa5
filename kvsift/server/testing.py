"""Run a kvsift server in a subprocess on a free loopback port (tests, examples, benchmarks).

    with ServerProcess(["--model", str(model_dir), "--no-persist"]) as srv:
        httpx.get(srv.url + "/health")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class ServerProcess:
    """``python -m kvsift.server ARGS --host 127.0.0.1 --port 0``; waits (bounded) until /health answers
    (200, or 401 when the server requires a key there);
    ``stop()`` terminates it (then kills it after ``stop_timeout``)."""

    def __init__(self, args: list[str], start_timeout: float = 120.0, stop_timeout: float = 15.0,
                 env: dict[str, str] | None = None, entry: list[str] | None = None):
        self.args, self.start_timeout, self.stop_timeout = list(args), start_timeout, stop_timeout
        self.env = env
        self.entry = list(entry) if entry is not None else ["-m", "kvsift.server"]  # e.g. [script.py] (fault tests)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="kvsift-server-")
        self.log_path = Path(self._tmp.name) / "server.log"

    def start(self, port: int = 0) -> "ServerProcess":
        ready = Path(self._tmp.name) / "ready.json"
        ready.unlink(missing_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(self.env or {}))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.entry, *self.args, "--host", "127.0.0.1",
                                      "--port", str(port), "--ready-file", str(ready), "--log-level", "warning"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if ready.is_file():
                info = json.loads(ready.read_text())
                self.url, self.port = info["url"], info["port"]
                try:  # 401: up, with keys (and no --public-health)
                    if httpx.get(self.url + "/health", timeout=5).status_code in (200, 401):
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {self.start_timeout}s:\n{self.log()}")

    def restart(self) -> "ServerProcess":
        """Stop the server and start it again with the same arguments on the same port."""
        port = self.port
        self.stop()
        return self.start(port)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        code, self.proc = self.proc.returncode, None
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()
