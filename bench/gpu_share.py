"""Several processes on one GPU: what each one's decode step costs when others run beside it, with
and without CUDA MPS (issue #15's suite runs its method groups as parallel processes).

    python3 bench/gpu_share.py --json bench/results/gpu_share_h200.json          # on the GPU machine

Each worker process runs a decode-like step (Qwen2.5-Coder-1.5B's shape, random bf16 weights: per
layer the q/k/v, o, gate/up and down projections of ``--batch`` rows and SDPA over ``--ctx`` cached
tokens; eager, many small kernels as an eager decode step) or a prefill-like one (the same layers
over ``--prefill-tokens`` tokens, a few large kernels), for ``--seconds`` each. Settings:

* ``alone``: one decode worker;
* ``3 decode``: three decode workers at once;
* ``1 decode + 2 prefill``: the suite's mix (a cell's decode beside other processes' prefills);

each without MPS, then (``--mps``, the default when ``nvidia-cuda-mps-control`` is on PATH) with an
MPS control daemon this script starts with its own pipe and log folders under ``/tmp`` (only its
workers see them, through ``CUDA_MPS_PIPE_DIRECTORY``) and stops at the end (``quit``), also when
a worker fails. The table gives each setting's decode ms per step (median over workers), the
decode steps per second of all decode workers together, and the prefill workers' tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 1536, 8960, 28, 12, 2, 128


def worker(kind: str, seconds: float, batch: int, ctx: int, prefill_tokens: int, out: str) -> None:
    """One process's loop; writes ``{"kind", "steps", "seconds"}`` to ``out``."""
    import torch
    import torch.nn.functional as F

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w = dict(qkv=torch.randn(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt, generator=g) * 0.02,
             o=torch.randn(HEADS * HEAD_DIM, HIDDEN, device=dev, dtype=dt, generator=g) * 0.02,
             up=torch.randn(HIDDEN, 2 * INTER, device=dev, dtype=dt, generator=g) * 0.02,
             down=torch.randn(INTER, HIDDEN, device=dev, dtype=dt, generator=g) * 0.02)
    rows = batch if kind == "decode" else 1
    q_len = 1 if kind == "decode" else prefill_tokens
    kv_len = ctx if kind == "decode" else prefill_tokens
    k = torch.randn(rows, HEADS, kv_len, HEAD_DIM, device=dev, dtype=dt, generator=g)
    v = torch.randn_like(k)
    x0 = torch.randn(rows, q_len, HIDDEN, device=dev, dtype=dt, generator=g)

    def step():
        x = x0
        for _ in range(LAYERS):
            qkv = x @ w["qkv"]
            q = qkv[..., :HEADS * HEAD_DIM].view(rows, q_len, HEADS, HEAD_DIM).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=kind != "decode")
            x = x + a.transpose(1, 2).reshape(rows, q_len, -1) @ w["o"]
            gu = x @ w["up"]
            x = x + (F.silu(gu[..., :INTER]) * gu[..., INTER:]) @ w["down"]
        return x

    for _ in range(3):  # warm-up (cuBLAS and SDPA plans)
        step()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        torch.cuda.synchronize()
        n += 1
    Path(out).write_text(json.dumps({"kind": kind, "steps": n, "seconds": time.perf_counter() - t0}))


def run_setting(kinds: list[str], args, env: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="gpu_share_"))
    procs = []
    for i, kind in enumerate(kinds):
        cmd = [sys.executable, __file__, "--worker", kind, "--seconds", str(args.seconds), "--batch", str(args.batch),
               "--ctx", str(args.ctx), "--prefill-tokens", str(args.prefill_tokens), "--out", str(tmp / f"{i}.json")]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait(timeout=args.seconds * 4 + 120) for p in procs]
    if any(codes):
        raise RuntimeError(f"a worker failed (exit codes {codes})")
    res = [json.loads((tmp / f"{i}.json").read_text()) for i in range(len(kinds))]
    shutil.rmtree(tmp, ignore_errors=True)
    dec = [r for r in res if r["kind"] == "decode"]
    pre = [r for r in res if r["kind"] == "prefill"]
    return {"decode_ms_per_step": statistics.median(1e3 * r["seconds"] / r["steps"] for r in dec) if dec else None,
            "decode_steps_per_s": sum(r["steps"] / r["seconds"] for r in dec),
            "prefill_tokens_per_s": sum(args.prefill_tokens * r["steps"] / r["seconds"] for r in pre) or None,
            "workers": res}


class MPS:
    """An MPS control daemon of this script's own (pipe and log folders under /tmp), stopped on exit."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="kvsift_mps_"))
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(self.dir / "pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(self.dir / "log"))
        (self.dir / "pipe").mkdir()
        (self.dir / "log").mkdir()

    def __enter__(self):
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=self.env, timeout=30)
        time.sleep(1.0)
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="each worker's run time per setting")
    ap.add_argument("--batch", type=int, default=28, help="decode rows")
    ap.add_argument("--ctx", type=int, default=8192, help="decode: cached tokens per row")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="prefill workers: tokens per forward")
    ap.add_argument("--mps", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.seconds, a.batch, a.ctx, a.prefill_tokens, a.out)
        return 0
    if a.seconds <= 0 or a.batch < 1 or a.ctx < 1 or a.prefill_tokens < 1:
        ap.error("--seconds, --batch, --ctx and --prefill-tokens must be positive")
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (it measures processes sharing one GPU)")
    settings = [("alone", ["decode"]), ("3 decode", ["decode"] * 3),
                ("1 decode + 2 prefill", ["decode", "prefill", "prefill"])]
    use_mps = a.mps == "yes" or (a.mps == "auto" and shutil.which("nvidia-cuda-mps-control") is not None)
    out = {"batch": a.batch, "ctx": a.ctx, "prefill_tokens": a.prefill_tokens, "seconds": a.seconds,
           "shape": "Qwen2.5-1.5B (28 layers, hidden 1536), random bf16, eager", "rows": []}
    for name, kinds in settings:
        out["rows"].append({"setting": name, "mps": False, **run_setting(kinds, a, dict(os.environ))})
    if use_mps:
        try:
            with MPS() as mps:
                for name, kinds in settings:
                    out["rows"].append({"setting": name, "mps": True, **run_setting(kinds, a, mps.env)})
        except Exception as e:  # noqa: BLE001 - report it with the rows measured without MPS
            out["mps_error"] = f"{type(e).__name__}: {e}"
    else:
        out["mps_error"] = "nvidia-cuda-mps-control not found" if a.mps == "auto" else "not asked (--mps no)"
    print(f"{'setting':<24} {'MPS':>4} {'decode ms/step':>15} {'decode steps/s (all)':>21} {'prefill tok/s':>14}")
    for r in out["rows"]:
        ms = f"{r['decode_ms_per_step']:.2f}" if r["decode_ms_per_step"] else "-"
        pt = f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-"
        print(f"{r['setting']:<24} {'yes' if r['mps'] else 'no':>4} {ms:>15} {r['decode_steps_per_s']:>21.1f} {pt:>14}")
    if out.get("mps_error"):
        print(f"MPS: {out['mps_error']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
