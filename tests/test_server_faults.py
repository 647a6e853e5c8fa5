"""Storage faults against a real server process: kill -9 in the middle of a context write, then a
restart on the same directory (no partial context, nothing half-written left behind). Corrupted,
truncated and malformed files and an injected ENOSPC are in test_server_hardening.py and
test_server_tenants.py (in process)."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import httpx
import pytest

from kvsift.server.testing import ServerProcess

# Runs the server with the second context write stopping half-way (the KV file cut to half its
# size inside the .tmp- directory), a marker file written, then a hang until killed.
_LAUNCHER = textwrap.dedent('''
    import os, sys, time
    import kvsift.server.contexts as contexts
    real, calls = contexts.save_file, []
    def save_file(tensors, path):
        calls.append(path)
        real(tensors, path)
        if len(calls) == 2:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            open(os.environ["KVSIFT_FAULT_MARKER"], "w").close()
            time.sleep(600)
    contexts.save_file = save_file
    from kvsift.server.__main__ import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    from kvsift.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=default_tokenizer, seed=1)


def test_kill_9_during_a_context_write_leaves_no_partial_context(tiny_dir, tmp_path):
    ctx_dir, marker = tmp_path / "contexts", tmp_path / "writing"
    launcher = tmp_path / "launcher.py"
    launcher.write_text(_LAUNCHER)
    args = ["--model", str(tiny_dir), "--contexts-dir", str(ctx_dir), "--chunk-size", "64"]
    srv = ServerProcess(args, entry=[str(launcher)], env={"KVSIFT_FAULT_MARKER": str(marker)})
    srv.start()
    try:
        doc = {"document": list(range(1000, 1400)), "kv_method": "full", "chat": False}
        good = httpx.post(srv.url + "/v1/contexts", json=doc, timeout=60).json()
        assert good["persisted"], good
        errors = []
        t = threading.Thread(target=lambda: errors.append(
            _swallow(lambda: httpx.post(srv.url + "/v1/contexts", json=doc, timeout=60))))
        t.start()
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), srv.log()
        assert [p.name for p in ctx_dir.iterdir() if p.name.startswith(".tmp-")], "the write was not under way"
        os.kill(srv.proc.pid, signal.SIGKILL)
        t.join(30)
        assert errors and isinstance(errors[0], httpx.HTTPError)  # the client saw the server die, not a success
    finally:
        srv.stop()
    # what a crash leaves on disk: the good context and a half-written .tmp- directory
    assert {p.name for p in ctx_dir.iterdir() if not p.name.startswith(".tmp-")} == {good["id"]}

    with ServerProcess(args) as again:  # a normal restart on the same directory
        listed = httpx.get(again.url + "/v1/contexts", timeout=10).json()["data"]
        assert [c["id"] for c in listed] == [good["id"]]
        assert sorted(p.name for p in ctx_dir.iterdir()) == [good["id"]]  # the partial write is gone
        assert sorted(p.name for p in (ctx_dir / good["id"]).iterdir()) == ["kv.safetensors", "meta.json"]
        r = httpx.post(again.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2,
                                                             "context_id": good["id"]}, timeout=60)
        assert r.status_code == 200, r.text


def _swallow(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return e
