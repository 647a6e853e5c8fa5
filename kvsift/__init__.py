"""kvsift: fast long-context LLM inference through a smart KV cache."""

from kvsift.engine import LLM, Context, GenerationStats, RequestOutput, SamplingParams, StreamEvent
from kvsift.methods import available_methods, build_method, register
from kvsift.tp import tensor_parallel

__version__ = "0.1.0"
__all__ = ["LLM", "Context", "GenerationStats", "RequestOutput", "SamplingParams", "StreamEvent",
           "available_methods", "build_method", "register", "tensor_parallel", "__version__"]
