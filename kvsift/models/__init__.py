from kvsift.models.loader import (DEFAULT_MODEL, ModelInfo, default_model_path, load_model, model_info,
                                  resolve_device, resolve_dtype)
from kvsift.models.tiny import save_tiny_model, tiny_config, tiny_model

__all__ = ["DEFAULT_MODEL", "ModelInfo", "default_model_path", "load_model", "model_info", "resolve_device",
           "resolve_dtype", "save_tiny_model", "tiny_config", "tiny_model"]
