"""KV-cache methods: one file per method, each registering itself by name.

Every module in this package (except ``base`` and private ``_*`` helpers) is imported here, so a
new method file is picked up by the CLI, the server and eval without further edits.
"""

import importlib
import pkgutil

from kvsift.methods.base import (
    Compose,
    EvictionMethod,
    KVMethod,
    available_methods,
    build_method,
    keep_top,
    method_class,
    parse_budget,
    register,
    validate_budget,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Compose", "EvictionMethod", "KVMethod", "available_methods", "build_method", "keep_top",
           "method_class", "parse_budget", "register", "validate_budget"]
