from kvsift.engine.llm import LLM, Context
from kvsift.engine.params import GenerationStats, RequestOutput, SamplingParams, StreamEvent
from kvsift.engine.runner import ModelRunner
from kvsift.engine.scheduler import Request, Scheduler, SchedulerConfig

__all__ = ["LLM", "Context", "GenerationStats", "ModelRunner", "Request", "RequestOutput", "SamplingParams",
           "Scheduler", "SchedulerConfig", "StreamEvent"]
