"""Evaluation harness: NIAH / RULER-style tasks, long-text perplexity, a resumable runner and reports.

Nothing here imports the engine at import time (the kvpress side-by-side worker runs these modules
under another transformers version); the kvsift backend loads it on use.
"""

from kvsift.eval.runner import BenchConfig, KvsiftBackend, load_rows, run_grid
from kvsift.eval.scoring import score, score_all, score_any
from kvsift.eval.tasks import TASKS, Sample, TaskBuilder, TaskConfig, render_prompt

__all__ = ["BenchConfig", "KvsiftBackend", "Sample", "TASKS", "TaskBuilder", "TaskConfig", "load_rows",
           "render_prompt", "run_grid", "score", "score_all", "score_any"]
