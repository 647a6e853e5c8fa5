from kvsift.models.loader import (DEFAULT_MODEL, ModelInfo, check_model, default_model_path, load_model, model_info,
                                  resolve_device, resolve_dtype)
from kvsift.models.registry import MODELS, NamedModel, find_model, get_model, model_file
from kvsift.models.tiny import save_tiny_model, tiny_config, tiny_model

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelInfo", "NamedModel", "check_model", "default_model_path", "find_model",
           "get_model", "load_model", "model_file", "model_info", "resolve_device", "resolve_dtype",
           "save_tiny_model", "tiny_config", "tiny_model"]
