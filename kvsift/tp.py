"""Tensor parallel (TP): one model over N processes, each holding 1/N of every layer.

The sharding is transformers' own: the model loads with its ``base_model_tp_plan`` (``tp_plan="auto"``,
through ``DistributedConfig(tp_size=N, tp_plan="auto")``): q/k/v and the MLP's gate/up projections
column-parallel (each rank computes its own heads and its slice of the MLP), o/down row-parallel
(partial sums all-reduced), the embedding vocabulary-parallel (all-reduced) and the LM head
gathered, so every rank ends a forward with the same full logits. kvsift adds nothing to the
forward: each rank's attention function sees only its own query and KV heads, so each rank's
cache holds ``kv_heads / N`` heads (1/N of the KV bytes) and a method's per-head scoring and
selection run locally, with no collective of their own. Launch with ``torchrun``::

    torchrun --nproc-per-node 2 -m kvsift.cli generate --model DIR --prompt-file doc.txt --tp 2

    from kvsift import LLM, tensor_parallel
    with tensor_parallel(2) as tp:      # under torchrun: joins the process group, leaves it on exit
        llm = LLM("path/to/hf_dir", tensor_parallel=2)
        out = llm.generate(prompt, params, method="snapkv", budget=1024)
        if tp.rank == 0:
            print(out[0].text)

Every rank must make the same calls with the same inputs (the collectives pair up). Greedy decoding
is the same on every rank (the logits are identical); a sampled token is rank 0's, broadcast
(:func:`agree`), so ranks never diverge.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from kvsift.errors import TensorParallelError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` sets for every process it starts (``env://`` rendezvous)."""


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group (``size`` 1: no group)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_size(size) -> int:
    """``size`` as an int >= 1, else :class:`TensorParallelError`."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TensorParallelError(f"tensor_parallel must be an integer >= 1, got {size!r}", param="tensor_parallel")
    return size


def launch_env(size: int, env=None) -> tuple[int, int]:
    """``(rank, local_rank)`` of this process in a ``torchrun`` launch of ``size`` processes; a
    :class:`TensorParallelError` outside one, or in one of another size."""
    env = os.environ if env is None else env
    missing = [k for k in LAUNCH_ENV if not env.get(k)]
    if missing:
        raise TensorParallelError(
            f"tensor_parallel={size} needs a distributed launch of {size} processes: run it under "
            f"`torchrun --nproc-per-node {size} ...` (not set: {', '.join(missing)})", param="tensor_parallel")
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise TensorParallelError("WORLD_SIZE, RANK and LOCAL_RANK must be integers", param="tensor_parallel") from None
    if world != size:
        raise TensorParallelError(f"tensor_parallel={size} but this launch has WORLD_SIZE={world} processes: launch "
                                  f"with `torchrun --nproc-per-node {size}`", param="tensor_parallel")
    return rank, local


def default_backend() -> str:
    """``nccl`` where CUDA is (transformers puts the TP mesh on the accelerator), else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise TensorParallelError("tensor parallel needs torch.distributed, which this torch build lacks",
                                  param="tensor_parallel")
    return dist


@contextlib.contextmanager
def tensor_parallel(size: int, backend: str | None = None, timeout_s: float = 600.0):
    """The process group of a ``size``-rank tensor-parallel run, for the duration of the block.

    Under ``torchrun`` (its environment, checked first: :func:`launch_env`) it initializes the
    default process group (``backend``: None = :func:`default_backend`) and destroys it, with every
    group made on it (transformers' device mesh), when the block ends: after a barrier when it ends
    normally (the ranks leave together), at once when it raises. A group already initialized by the
    caller is used as it is (its world size must be ``size``) and left alone. ``size`` 1: no
    group. Yields a :class:`TPGroup`."""
    size = check_size(size)
    if size == 1 or _dist().is_initialized():
        yield current_group(size)  # the caller's group (its size checked), left alone
        return
    dist = _dist()
    rank, local = launch_env(size)
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    try:
        yield TPGroup(size, rank, local, dist.get_backend())
    except BaseException:
        # a failing rank leaves at once: a barrier here would wait for ranks that may never come
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # the ranks leave together: one that tore its connections down while another still finished
    # its last collective could abort that one (gloo's worker threads, seen as a SIGABRT)
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def current_group(size: int) -> TPGroup:
    """The active group for ``LLM(tensor_parallel=size)``: a :class:`TensorParallelError` unless a
    process group of exactly ``size`` ranks is initialized (see :func:`tensor_parallel`)."""
    size = check_size(size)
    if size == 1:
        return TPGroup()
    dist = _dist()
    if not dist.is_initialized():
        raise TensorParallelError(
            f"tensor_parallel={size} needs a process group of {size} ranks: launch with `torchrun --nproc-per-node "
            f"{size}` and create the LLM inside `with kvsift.tensor_parallel({size}):`", param="tensor_parallel")
    if dist.get_world_size() != size:
        raise TensorParallelError(f"tensor_parallel={size} but the process group has {dist.get_world_size()} ranks",
                                  param="tensor_parallel")
    rank = dist.get_rank()
    return TPGroup(size, rank, int(os.environ.get("LOCAL_RANK", rank)), dist.get_backend())


def check_config(config, size: int) -> None:
    """Before any weight loads: the model can be sharded over ``size`` ranks (a tensor parallel
    plan, attention and KV heads divisible by ``size``), else :class:`TensorParallelError`."""
    if size == 1:
        return
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads", None)
    if not getattr(cfg, "base_model_tp_plan", None) or not heads:
        raise TensorParallelError(f"{type(cfg).__name__} has no tensor parallel plan (base_model_tp_plan) in this "
                                  f"transformers version: it cannot run with tensor_parallel={size}",
                                  param="tensor_parallel")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    bad = [f"{n} attention heads" if what == "q" else f"{n} KV heads"
           for what, n in (("q", heads), ("kv", kv)) if n % size]
    if bad:
        raise TensorParallelError(f"tensor_parallel={size} must divide the model's heads: it has "
                                  f"{' and '.join(bad)}", param="tensor_parallel")


def load_sharded(path, dtype: torch.dtype, size: int):
    """``AutoModelForCausalLM`` from the HF directory ``path``, each rank loading only its shard
    (transformers' ``tp_plan="auto"``); the device is the rank's accelerator, or the CPU."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers before DistributedConfig: the plan as from_pretrained arguments
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, tp_plan="auto",
                                                    tp_size=size)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                distributed_config=DistributedConfig(tp_size=size, tp_plan="auto"))


def model_tp_size(model) -> int:
    """How many ranks ``model`` is sharded over (transformers' ``_tp_size``; 1 when not sharded)."""
    return int(getattr(model, "_tp_size", None) or 1)


def local_heads(model, heads: int, kv_heads: int, size: int) -> tuple[int, int]:
    """``(query heads, KV heads)`` of this rank's attention layers: from the first attention module's
    sharded q/k projections (rows held here // head_dim), else the config's counts // ``size``."""
    if size == 1:
        return heads, kv_heads
    for m in model.modules():
        q, k, d = getattr(m, "q_proj", None), getattr(m, "k_proj", None), getattr(m, "head_dim", None)
        if q is not None and k is not None and isinstance(d, int) and d > 0 and hasattr(k, "weight"):
            return _rows(q.weight) // d, _rows(k.weight) // d
    return heads // size, kv_heads // size


def _rows(w: torch.Tensor) -> int:
    return (w.to_local() if hasattr(w, "to_local") else w).shape[0]


def rank_of(size: int) -> int:
    if size == 1:
        return 0
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def agree(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Rank 0's ``tokens``, on every rank (a broadcast; ``size`` 1: unchanged). Sampled tokens go
    through it so that ranks whose random streams differ still decode the same sequence."""
    if size == 1:
        return tokens
    import torch.distributed as dist

    out = tokens.clone()
    dist.broadcast(out, src=0)
    return out
