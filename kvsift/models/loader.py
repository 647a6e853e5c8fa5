"""Model loading: a named model (:mod:`kvsift.models.registry`; default ``qwen2.5-coder-0.5b``,
``smollm2`` and others, GGUF files shipped through pip packages), a local HF directory, or any
``.gguf`` file. Never touches the network.

GGUF files are de-quantized by transformers (through the ``gguf`` package) on first load, which
takes ~10-60 s depending on the model; the converted model is kept under ``$KVSIFT_CACHE``
(default ``~/.cache/kvsift/converted``) so later loads take a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvsift.errors import ModelNotFoundError, TensorParallelError
from kvsift.models.registry import DEFAULT_MODEL, MODELS, NamedModel, cache_root, find_model, get_model, model_file

log = logging.getLogger("kvsift")


@dataclass(slots=True)
class ModelInfo:
    name: str
    source: str
    max_positions: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    is_chat: bool
    num_heads: int = 0          # query heads per layer
    tp_size: int = 1            # tensor parallel: ranks the model is sharded over (1: not sharded)
    tp_rank: int = 0            # ...and this process's rank. Head counts above are this rank's own


def default_model_path(name: str | None = None) -> Path:
    """GGUF file of a named model (default: :data:`DEFAULT_MODEL`), joined from its packages if
    needed; raises :class:`~kvsift.errors.ModelNotFoundError` with the install command if absent."""
    return model_file(get_model(name or DEFAULT_MODEL))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def resolve_source(model: str | os.PathLike | None) -> tuple[str, Path]:
    """-> (display name, path of a .gguf file or an HF directory)."""
    name, path, _ = _resolve(model)
    return name, path


def check_model(model: str | os.PathLike | None) -> str:
    """Cheap validation of a ``--model`` value before any loading: a named model must be installed
    (nothing is joined here), a path must be a ``.gguf`` file or an HF directory. Returns the
    display name; raises :class:`~kvsift.errors.ModelNotFoundError` with what to do."""
    from kvsift.models.registry import joined_path, missing_packages, not_installed_error

    key = str(DEFAULT_MODEL if model is None else model)
    entry = find_model(key)
    if entry is not None:
        joined = entry.member is None and joined_path(entry).is_file()
        missing = [] if joined else missing_packages(entry)
        if missing:
            raise not_installed_error(entry, missing)
        return entry.name
    path = Path(key).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
        return path.stem if path.is_file() else path.name
    return _resolve(key)[0]  # raises the not-found error


def _resolve(model: str | os.PathLike | None) -> tuple[str, Path, NamedModel | None]:
    if model is None:
        model = DEFAULT_MODEL
    key = str(model)
    entry = find_model(key)
    if entry is not None:
        return entry.name, model_file(entry), entry
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path, None
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path, None
    raise ModelNotFoundError(
        f"model {key!r} not found: give a named model ({', '.join(m.name for m in MODELS)}; see `kvsift models`), "
        f"a local HF model directory (with config.json), or a .gguf file (no hub downloads are done)", param="model")


def _converted_dir(gguf: Path) -> Path:
    root = cache_root() / "converted"
    st = gguf.stat()
    tag = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return root / f"{gguf.stem}-{tag}"


@contextlib.contextmanager
def _gguf_parsed_once():
    """Share one ``gguf.GGUFReader`` per file for the duration of a conversion.

    transformers parses the file's metadata again for the config, the tokenizer and the weights;
    with a 150k-token vocabulary each parse is ~15 s of Python on a 2-core CPU (per-string numpy
    slicing in ``GGUFReader``), most of a conversion. transformers imports ``GGUFReader`` from
    ``gguf`` at call time, so a memoizing stand-in on the module is seen by every parse; the
    original is restored on exit. Readers are read-only memory maps, safe to share."""
    try:
        import gguf as gguf_pkg
    except ImportError:  # transformers will say it needs gguf
        yield
        return
    original = gguf_pkg.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf_pkg.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf_pkg.GGUFReader = original


def convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file once into an HF directory (safetensors) under
    ``$KVSIFT_CACHE/converted``, atomically; later calls return the cached directory."""
    return _convert_gguf(Path(gguf))


def _convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file once into an HF directory (safetensors), atomically."""
    out = _converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only)", gguf.name)
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain de-quantized fp32 tensors now: save them as an ordinary model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(model: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = "auto", tensor_parallel: int = 1):
    """Load ``(model, tokenizer, ModelInfo)``. ``model``: None (the default named model), a model
    name (``kvsift models``), an HF directory or a ``.gguf`` file. Device auto = CUDA if present
    else CPU; dtype auto = bf16 on CUDA, fp32 on CPU. A base (non-chat) named model is never
    prompted through a chat template, even if its tokenizer carries one.

    ``tensor_parallel`` N > 1 (inside :func:`kvsift.tp.tensor_parallel`, under ``torchrun``): each rank
    loads its shard of the model through transformers' ``tp_plan="auto"`` on its own device (the
    rank's GPU, else the CPU: ``device`` must stay ``auto``); the config is checked first (a plan,
    heads divisible by N), before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvsift import tp

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = tp.check_size(tensor_parallel)
    if size > 1:
        tp.current_group(size)  # a process group of that size, before anything is read
        if device not in (None, "auto"):
            raise TensorParallelError(f"with tensor_parallel={size} each rank runs on its own device (its GPU, "
                                         f"else the CPU): leave device 'auto', not {device!r}", param="device")
    name, path, entry = _resolve(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf_dir = _convert_gguf(path) if path.suffix == ".gguf" else path
    if size > 1:
        tp.check_config(AutoConfig.from_pretrained(hf_dir, local_files_only=True), size)
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if entry is not None and not entry.chat and getattr(tok, "chat_template", None):
        tok.chat_template = None  # a base model: plain completion everywhere (engine, eval prompts, server)
    if size > 1:
        mdl = tp.load_sharded(hf_dir, dt, size).eval()
    else:
        mdl = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dt, local_files_only=True)
        mdl.to(dev).eval()
    return mdl, tok, model_info(mdl, tok, name, str(path))


def model_info(model, tokenizer, name: str = "model", source: str = "") -> ModelInfo:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    from kvsift import tp

    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    # a tensor-parallel model: this rank's heads (its attention modules' sharded projections), which
    # are what its attention calls and its cache see, not the config's totals
    size = tp.model_tp_size(model)
    local_q, local_kv = tp.local_heads(model, heads, kv_heads, size)
    return ModelInfo(
        name=name, source=source,
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 2048),
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=local_kv,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        dtype=next(model.parameters()).dtype, device=next(model.parameters()).device,
        is_chat=bool(getattr(tokenizer, "chat_template", None)), num_heads=local_q,
        tp_size=size, tp_rank=tp.rank_of(size),
    )
