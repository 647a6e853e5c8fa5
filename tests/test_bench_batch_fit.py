"""bench/batch_fit.py: the search for the largest batch that decodes, full's contexts copied per row
inside the search, and one real CPU run on a small random model."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import batch_fit  # noqa: E402


@pytest.mark.parametrize("limit,max_batch", [(0, 64), (1, 64), (5, 64), (37, 64), (64, 64), (100, 64), (9, 10)])
def test_largest_fitting_finds_the_limit_with_few_tries(limit, max_batch):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    assert batch_fit.largest_fitting(fits, max_batch) == min(limit, max_batch)
    assert len(tried) == len(set(tried)) and len(tried) <= 2 * max_batch.bit_length() + 1


def test_copied_contexts_makes_full_copy_a_context_per_row(tiny_llm):
    ctx = tiny_llm.prefill_context(list(range(40)))
    full = ctx.method if not isinstance(ctx.method, str) else __import__("kvsift").build_method("full")
    assert tiny_llm.runner.shares_context(full, ctx)
    with batch_fit.copied_contexts(tiny_llm):
        assert not tiny_llm.runner.shares_context(full, ctx)
    assert tiny_llm.runner.shares_context(full, ctx)


def test_batch_fit_runs_on_the_cpu(tmp_path):
    """A small random model and an admission limit (the scheduler's KV memory): kivi's quantized
    rows fit more sequences than full's, each row over its own copy of the context."""
    out = tmp_path / "fit.json"
    assert batch_fit.main(["--ctx", "256", "--layers", "2", "--methods", "full,kivi", "--max-batch", "16",
                           "--new-tokens", "2", "--chunk", "128", "--kv-memory", "24MiB", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert 1 <= rows["full"]["max_batch"] < rows["kivi"]["max_batch"]
    assert rows["kivi"]["kv_device_bytes_per_seq"] < rows["full"]["kv_device_bytes_per_seq"]
    assert all(t["fits"] or "KVMemoryError" in t["error"] for r in rows.values() for t in r["tries"].values())
