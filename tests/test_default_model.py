"""The default model (``LLM()``: Qwen2.5-Coder-0.5B-Instruct from its part packages).

Kept to a few short prompts: this model is ~4x slower per token than SmolLM2 on a 2-core CPU
(the README's full 5k-token command is timed in docs/models.md, not here)."""

from pathlib import Path

import pytest
import torch

from kvsift import SamplingParams
from kvsift.models import DEFAULT_MODEL

pytestmark = pytest.mark.real

REPORT = Path(__file__).resolve().parents[1] / "examples" / "village_report.txt"
QUESTION = "Where is the key to the old chapel kept?"


def excerpt(first: int = 26, last: int = 38) -> str:
    """About 1k tokens of the README's document, the answer in the middle."""
    return "\n\n".join(REPORT.read_text(encoding="utf-8").split("\n\n")[first:last])


def test_default_is_the_named_chat_model(default_llm):
    assert default_llm.info.name == DEFAULT_MODEL and default_llm.info.is_chat
    assert default_llm.info.max_positions >= 32768


def test_default_answers_the_readme_question(default_llm):
    """The README's question (snapkv at 50%, as in its first command) over a shorter excerpt."""
    out = default_llm.generate(f"{excerpt()}\n\n{QUESTION}", SamplingParams(max_tokens=32),
                               method="snapkv", budget=0.5)[0]
    text = out.text.lower()
    assert "third stone" in text and "garden wall" in text, out.text
    assert out.stats.prompt_tokens > 800


def test_default_full_matches_transformers_generate(default_llm):
    ids = default_llm.encode(f"{excerpt(30, 34)}\n\n{QUESTION}")
    with torch.inference_mode():
        ref = default_llm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    ours = default_llm.generate(ids, SamplingParams(max_tokens=12))[0].token_ids
    assert ours == ref.tolist()[:len(ours)] and len(ours) > 0


def test_default_cli_job_with_kivi(tmp_path, capsys):
    """The README's first command with ``--method kivi`` (int4 KV; no budget) over the excerpt: the
    CLI job runs through the quantized cache on the CPU and still answers."""
    from kvsift.cli import main

    doc = tmp_path / "report.txt"
    doc.write_text(excerpt(), encoding="utf-8")
    assert main(["generate", "--prompt-file", str(doc), "--question", QUESTION, "--method", "kivi",
                 "--max-tokens", "32"]) == 0
    out = capsys.readouterr().out.lower()
    assert "third stone" in out and "garden wall" in out, out
