"""Tensor parallel on the CPU: 2 ranks (gloo, ``torchrun`` on a free loopback port) over a tiny
random-weight model saved to a temporary directory, against the same model in one process: the
same greedy tokens with ``full``, ``snapkv`` and ``quest`` (one prompt, a batch prefilled row by row,
static decoding), no collective beyond those of ``full``
(selection is local to each rank), the same sampled tokens on both ranks, each rank's cache holding
half the KV heads (half the bytes); the CLI path (``torchrun -m
kvsift.cli generate --tp 2``); how the ranks leave the group (together, or at once when a rank's
block raises); and the typed errors that come before any loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import random_prompt

ROOT = Path(__file__).resolve().parent.parent
METHODS = [("full", None), ("snapkv", 32), ("quest", 32)]
MAX_TOKENS = 10


def _gloo_missing() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


pytestmark = pytest.mark.skipif(_gloo_missing() is not None, reason=_gloo_missing() or "")

# one rank of the run: every rank makes the same calls; each writes what it saw to OUT/rank<r>.json
WORKER = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from kvsift import LLM, SamplingParams, tensor_parallel

# count the collectives this process issues (plain and functional ones), per model forward
import collections
import torch.distributed._functional_collectives as funcol
calls = collections.Counter()
def counted(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        calls[mod.__name__ + "." + name] += 1
        return f(*a, **k)
    setattr(mod, name, g)
for n in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all"):
    counted(dist, n)
for n in ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "broadcast"):
    if hasattr(funcol, n):
        counted(funcol, n)

model, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with tensor_parallel(2) as tp:
    llm = LLM(model, tensor_parallel=2, chunk_size=64)
    forwards = [0]
    llm.model.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    res = {"rank": tp.rank, "backend": tp.backend,
           "info": [llm.info.num_heads, llm.info.num_kv_heads, llm.info.tp_size, llm.info.tp_rank],
           "greedy": {}, "collectives": {}}
    for m, b in spec["methods"]:
        calls.clear()
        forwards[0] = 0
        res["greedy"][m] = llm.generate([spec["prompt"]], SamplingParams(max_tokens=spec["max_tokens"]), method=m,
                                        budget=b)[0].token_ids
        res["collectives"][m] = {k: v / forwards[0] for k, v in calls.items()}
    # a batch of two prompts (snapkv: prefilled row by row, then stacked), and static decoding
    res["batch"] = [o.token_ids for o in llm.generate([spec["prompt"], spec["prompt2"]],
                                                      SamplingParams(max_tokens=spec["max_tokens"]),
                                                      method="snapkv", budget=32)]
    llm.decode_mode = "static"
    res["static"] = llm.generate([spec["prompt"]], SamplingParams(max_tokens=spec["max_tokens"]), method="quest",
                                 budget=32)[0].token_ids
    llm.decode_mode = "auto"
    # unseeded sampling: each rank's own random stream would differ; rank 0's draw is broadcast
    res["sampled"] = llm.generate([spec["prompt"]], SamplingParams(max_tokens=6, temperature=1.5),
                                  method="full")[0].token_ids
    res["cache"] = {}
    for m, b in spec["methods"]:
        ctx = llm.prefill_context(spec["prompt"], method=m, budget=b)
        res["cache"][m] = {"kv_heads": [ly.k_buf.shape[1] for ly in ctx.cache.layers],
                           "bytes": ctx.cache.memory()["device"]}
    print("rank %d: work done" % tp.rank, file=sys.stderr, flush=True)  # where a failure came, in the log
print("rank %d: group left" % res["rank"], file=sys.stderr, flush=True)
res["initialized_after"] = dist.is_initialized()
with open(os.path.join(out, "rank%d.json" % res["rank"]), "w") as f:
    json.dump(res, f)
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``args`` under ``torchrun --nproc-per-node 2`` on a free loopback port (one thread per rank)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_tokenizer):
    """A tiny llama (4 query heads, 2 KV heads) with the tests' tokenizer, on disk so that every
    rank and the single process load the same weights."""
    from kvsift.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tp") / "tiny-llama", "llama", seed=3, tokenizer=default_tokenizer)


def test_two_ranks_match_one_process(tiny_dir, tmp_path):
    from kvsift import LLM, SamplingParams

    prompt, prompt2 = random_prompt(120, seed=11), random_prompt(90, seed=12)
    spec = {"prompt": prompt, "prompt2": prompt2, "methods": METHODS, "max_tokens": MAX_TOKENS}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    r = _torchrun([str(script), str(tiny_dir), str(tmp_path), json.dumps(spec)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    one = LLM(str(tiny_dir), chunk_size=64)
    assert one.info.tp_size == 1 and (one.info.num_heads, one.info.num_kv_heads) == (4, 2)
    for res in ranks:
        assert res["backend"] == "gloo"
        # this rank's own heads (its sharded projections), not the config's
        assert res["info"] == [2, 1, 2, res["rank"]]
        assert not res["initialized_after"]  # the context manager left the process group
    for m, b in METHODS:
        want = one.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS), method=m, budget=b)[0].token_ids
        assert len(want) == MAX_TOKENS
        for res in ranks:
            assert res["greedy"][m] == want, (m, res["rank"])
        ctx = one.prefill_context(prompt, method=m, budget=b)
        full_heads = [ly.k_buf.shape[1] for ly in ctx.cache.layers]
        for res in ranks:
            got = res["cache"][m]
            assert [2 * h for h in got["kv_heads"]] == full_heads
            assert 2 * got["bytes"] == ctx.cache.memory()["device"], m
    batch = [o.token_ids for o in one.generate([prompt, prompt2], SamplingParams(max_tokens=MAX_TOKENS),
                                                method="snapkv", budget=32)]
    one.decode_mode = "static"
    static = one.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS), method="quest", budget=32)[0].token_ids
    for res in ranks:
        assert res["batch"] == batch and res["static"] == static
    assert ranks[0]["sampled"] == ranks[1]["sampled"] and len(ranks[0]["sampled"]) > 0
    # selection is local: per model forward, every method issues exactly the collectives of `full`
    # (those of transformers' TP plan), and greedy decoding broadcasts nothing
    for res in ranks:
        per_forward = res["collectives"]
        assert per_forward["full"] and all(per_forward[m] == per_forward["full"] for m, _ in METHODS)
        assert not any("broadcast" in k for k in per_forward["full"])


def test_cli_tp_matches_one_process(tiny_dir, capsys):
    from kvsift.cli import main

    args = ["generate", "--model", str(tiny_dir), "--prompt", "The cat sat on the mat and then it",
            "--no-chat", "--max-tokens", "8", "--method", "snapkv", "--budget", "4", "--json"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)
    r = _torchrun(["-m", "kvsift.cli", *args, "--tp", "2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 prints, rank 1 does not
    got = json.loads(lines[0])
    assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"])
    assert got["stats"]["generated_tokens"] == want["stats"]["generated_tokens"] > 0
    # the KV on rank 0 is its half of the heads
    assert 2 * got["stats"]["kv_kept_bytes"] == want["stats"]["kv_kept_bytes"]


# how the ranks leave the group: together after a normal end; when one rank's block raises, the
# others' exit from the block fails at once (its peer closed the connections) instead of waiting
LEAVE = r'''
import json, os, sys, time
import torch, torch.distributed as dist
from kvsift import tensor_parallel
out, fail_rank = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
res = {}
try:
    with tensor_parallel(2, timeout_s=300) as tp:
        res["rank"] = tp.rank
        t = torch.ones(1)
        dist.all_reduce(t)
        res["sum"] = t.item()
        if tp.rank == fail_rank:
            raise ValueError("rank %d fails inside the block" % tp.rank)
    res["left"] = "normally"
except ValueError as e:
    res["left"] = "raised: %s" % e
except RuntimeError as e:
    res["left"] = "peer gone: %s" % str(e)[:200]
res["initialized_after"] = dist.is_initialized()
res["seconds"] = time.perf_counter() - t0
with open(os.path.join(out, "rank%d.json" % res["rank"]), "w") as f:
    json.dump(res, f)
'''


@pytest.mark.parametrize("fail_rank", [-1, 1])
def test_ranks_leave_the_group(tmp_path, fail_rank):
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    r = _torchrun([str(script), str(tmp_path), str(fail_rank)], timeout=200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for res in ranks:
        assert res["sum"] == 2.0 and not res["initialized_after"]
    if fail_rank < 0:
        assert [res["left"] for res in ranks] == ["normally", "normally"]
    else:
        assert ranks[1]["left"] == "raised: rank 1 fails inside the block"
        # rank 0 ended its block normally; the barrier there fails fast (its peer is gone), well
        # before the group's 300 s timeout
        assert ranks[0]["left"].startswith("peer gone"), ranks[0]
        assert ranks[0]["seconds"] < 120


# ---- bad input: typed errors before any loading ---------------------------------------------------
def test_size_and_launch_errors(tiny_dir, monkeypatch):
    from kvsift import LLM, tensor_parallel
    from kvsift.errors import InputError, TensorParallelError
    from kvsift.tp import check_size, launch_env

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(TensorParallelError, match="integer >= 1"):
            check_size(bad)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TensorParallelError, match="torchrun --nproc-per-node 2"):
        with tensor_parallel(2):
            pass
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(TensorParallelError, match="WORLD_SIZE=4"):
        launch_env(2, env)
    assert launch_env(4, env) == (0, 0)
    # the LLM without a process group: refused before the model loads
    with pytest.raises(TensorParallelError, match="process group of 2 ranks") as e:
        LLM(str(tiny_dir), tensor_parallel=2)
    assert isinstance(e.value, InputError) and e.value.param == "tensor_parallel"
    with tensor_parallel(1) as g:  # no group needed for one rank
        assert (g.size, g.rank, g.is_main) == (1, 0, True)


def test_heads_not_divisible():
    from kvsift.errors import TensorParallelError
    from kvsift.models import tiny_config
    from kvsift.tp import check_config

    check_config(tiny_config("qwen2", heads=4, kv_heads=2), 2)
    with pytest.raises(TensorParallelError, match="3 KV heads"):
        check_config(tiny_config("llama", heads=6, kv_heads=3, hidden=96), 2)
    with pytest.raises(TensorParallelError, match="6 attention heads and 3 KV heads"):
        check_config(tiny_config("llama", heads=6, kv_heads=3, hidden=96), 4)
    cfg = tiny_config("llama")
    cfg.base_model_tp_plan = None
    with pytest.raises(TensorParallelError, match="no tensor parallel plan"):
        check_config(cfg, 2)


def test_cli_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    from kvsift.cli import main
    from kvsift.models import tiny_config

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    base = ["generate", "--prompt", "hello there", "--no-chat", "--max-tokens", "2"]
    assert main(base + ["--model", str(tiny_dir), "--tp", "2"]) == 2
    assert "kvsift: error: tensor_parallel=2 needs a distributed launch" in capsys.readouterr().err
    assert main(base + ["--model", str(tiny_dir), "--tp", "0"]) == 2
    assert "kvsift: error: tensor_parallel must be an integer >= 1" in capsys.readouterr().err
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # under a (pretended) 2-process launch: heads that do not split, checked from the config alone
    odd = tmp_path / "odd"
    odd.mkdir()
    tiny_config("llama", heads=6, kv_heads=3, hidden=96).save_pretrained(odd)
    assert main(base + ["--model", str(odd), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "kvsift: error: tensor_parallel=2 must divide the model's heads: it has 3 KV heads" in err
    assert main(base + ["--model", str(tiny_dir), "--tp", "2", "--device", "cpu"]) == 2
    assert "leave --device auto" in capsys.readouterr().err


def test_minference_pattern_file_refused_under_tp(tmp_path):
    from dataclasses import replace

    from kvsift.errors import TensorParallelError
    from kvsift.methods import build_method
    from kvsift.models.loader import ModelInfo

    info = ModelInfo("tiny", "", 4096, 2, 1, 16, torch.float32, torch.device("cpu"), False, num_heads=2,
                     tp_size=2, tp_rank=1)
    build_method("minference", None, patterns="default").check_model(info)  # built-in patterns: per local head
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"format": "kvsift-minference-patterns/1", "model": "tiny", "num_layers": 2,
                             "num_heads": 4, "layers": [["a_shape"] * 4] * 2}))
    with pytest.raises(TensorParallelError, match="patterns='default'"):
        build_method("minference", None, patterns=str(f)).check_model(info)
    build_method("minference", None, patterns=str(f)).check_model(replace(info, num_heads=4, tp_size=1, tp_rank=0))
