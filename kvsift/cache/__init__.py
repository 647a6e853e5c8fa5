from kvsift.cache.layer import SiftCache, SiftLayer

__all__ = ["SiftCache", "SiftLayer"]
