from kvsift.engine.llm import LLM, Context
from kvsift.engine.params import GenerationStats, RequestOutput, SamplingParams, StreamEvent

__all__ = ["LLM", "Context", "GenerationStats", "RequestOutput", "SamplingParams", "StreamEvent"]
