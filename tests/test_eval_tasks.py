"""Task generators: deterministic, sized in tokens, needles where asked, answers extractable."""

from __future__ import annotations

import re

import pytest

from kvsift.eval.data import PPL_PARTS, PPL_TEXT, Filler, available_texts, load_ppl_text, load_text, split_sentences
from kvsift.eval.fakes import WordTokenizer
from kvsift.eval.scoring import perplexity, score, score_all, score_any
from kvsift.eval.tasks import TASKS, TaskBuilder, TaskConfig, insert_at_depths, render_prompt


@pytest.fixture(scope="module")
def builder():
    return TaskBuilder(WordTokenizer(), TaskConfig(samples=2))


def test_shipped_text_is_small_and_splits():
    assert "alice_ch1_3.txt" in available_texts()
    text = load_text()
    assert 20_000 < len(text.encode()) < 300_000
    sents = split_sentences(text)
    assert len(sents) > 200 and all(s.strip() == s and s for s in sents)
    assert sents[0].startswith("ALICE'S ADVENTURES")
    assert any(s.startswith("Alice was beginning to get very tired") for s in sents)
    with pytest.raises(FileNotFoundError):
        load_text("missing.txt")


def test_filler_take_respects_budget_and_wraps():
    tok = WordTokenizer()
    f = Filler(tok, "One two three. Four five six! Seven eight nine? Ten eleven twelve.")
    assert len(f) == 4 and f.counts == [7, 7, 7, 7]  # " One two three." = 3 words, 3 spaces, "."
    assert f.take(0) == ([], [])
    got, counts = f.take(16, start=3)  # wraps to the start, then a word prefix of the next sentence
    assert got == ["Ten eleven twelve.", "One two three.", "Four"] and counts == [7, 7, 2]
    for n in range(0, 40):
        assert sum(f.take(n, 1)[1]) <= n and sum(f.take(n, 1)[1]) >= n - 3  # within a word


def test_insert_at_depths_positions():
    sents = [f"s{i}." for i in range(10)]
    counts = [10] * 10
    out = insert_at_depths(sents, counts, [(0.0, "A"), (1.0, "Z"), (0.5, "M")])
    assert out[0] == "A" and out[-1] == "Z" and out.index("M") == 6  # after 5 sentences + "A"
    with pytest.raises(ValueError):
        insert_at_depths(sents, counts, [(1.5, "X")])


@pytest.mark.parametrize("task", [t for t in TASKS if t != "ppl"])
def test_tasks_deterministic_and_sized(task, builder):
    a = builder.build(task, 600, seed=3)
    b = TaskBuilder(WordTokenizer(), TaskConfig(samples=2)).build(task, 600, seed=3)
    c = builder.build(task, 600, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    tok = WordTokenizer()
    for s in a:
        n = len(tok.encode(s.prompt))
        assert n == s.prompt_tokens and 0.85 * 600 <= n <= 600, (s.sample_id, n)
        assert s.answers and s.max_new_tokens > 0
        assert s.prompt.endswith(s.answer_prefix)


def test_niah_needle_at_requested_depth(builder):
    depths = (0.0, 0.1, 0.33, 0.5, 0.9, 1.0)
    b = TaskBuilder(WordTokenizer(), TaskConfig(depths=depths))
    tok = b.tok
    samples = b.build("niah", 2000, seed=0)
    assert [s.meta["depth"] for s in samples] == list(depths)
    for s in samples:
        needle, ctx = s.meta["needle"], s.context
        assert ctx.count(needle) == 1
        pos = len(tok.encode(ctx[:ctx.index(needle)]))
        measured = pos / len(tok.encode(ctx))
        assert abs(measured - s.meta["depth"]) < 0.04, (s.meta["depth"], measured)
        # the answer is extractable from the prompt: the needle for the asked key holds it
        key = re.search(r"magic number for ([\w-]+) mentioned", s.question).group(1)
        found = re.findall(rf"magic numbers for {re.escape(key)} is: (\d+)", s.prompt)
        assert found == s.answers and len(s.answers[0]) == 7


def test_ruler_tasks_answers_extractable(builder):
    mk = builder.build("mk_niah", 800, 0)[0]
    vals = dict(re.findall(r"magic numbers for ([\w-]+) is: (\d+)", mk.context))
    assert len(vals) == 4 and vals[mk.meta["key"]] == mk.answers[0]

    mv = builder.build("mv_niah", 800, 0)[0]
    assert re.findall(rf"numbers for {mv.meta['key']} is: (\d+)", mv.context) == mv.answers

    vt = builder.build("vt", 800, 0)[0]
    assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", vt.context))
    resolved = {}
    for v in assign:
        x = v
        while assign[x].startswith("VAR "):
            x = assign[x][4:]
        resolved[v] = assign[x]
    assert sorted(v for v, val in resolved.items() if val == vt.meta["value"]) == sorted(vt.answers)
    assert len(resolved) == 8  # the chain and a decoy chain

    cwe = builder.build("cwe", 800, 0)[0]
    words = re.findall(r"^\d+\. (\w+)$", cwe.context, flags=re.M)
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=lambda w: -counts[w])[:10]
    assert sorted(top) == sorted(cwe.answers)
    assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)
    text = load_text().lower()
    assert all(re.search(rf"\b{w}\b", text) for w in set(words))  # whole words of the text, never cut

    qa = builder.build("qa", 800, 0)[0]
    name, town = qa.meta["name"], qa.answers[0]
    assert f"{name}, a " in qa.context and f"born in the town of {town} " in qa.context
    assert town not in qa.meta["distractor_towns"] and len(qa.meta["distractor_towns"]) == 5


def test_ppl_samples_are_contiguous_text(builder):
    s = builder.build("ppl", 500, 1)[0]
    ids = builder.tok.encode(load_ppl_text())
    st = s.meta["start"]
    assert s.context_ids == ids[st:st + 500] and s.continuation_ids == ids[st + 500:st + 500 + 128]
    assert s.meta["text"] == PPL_TEXT == builder.ppl_text
    with pytest.raises(ValueError, match="too few"):
        builder.build("ppl", 10 ** 6, 0)


def test_the_ppl_text_is_long_enough_for_the_suites_30k_cells():
    """The default ppl text is the shipped parts in order (the needle filler, chapters I-III, first),
    every part whole. The suite's 30,000-token cells need 30,064 tokens; a Qwen2.5 tokenizer makes
    1.26-1.30 tokens per word here (the filler: 5,954 words, 7,521 tokens; the whole book: 26,402
    words, 34,387 tokens), so 30,064 tokens need at least about 23,900 words."""
    text = load_ppl_text()
    assert text.startswith(load_text().strip()) and set(PPL_PARTS) <= set(available_texts())
    for part in PPL_PARTS:
        assert load_text(part).strip() in text
    assert len(text.split()) * 1.26 > 30_064 * 1.05
    b = TaskBuilder(WordTokenizer(), TaskConfig(samples=2, ppl_tokens=64))
    s = b.build("ppl", 23_000, 0)[0]   # beyond chapters I-III alone (5,954 words)
    assert len(s.context_ids) == 23_000 and len(s.continuation_ids) == 64


def test_ppl_text_by_name_or_path_and_a_bad_one_fails_at_once(tmp_path):
    tok = WordTokenizer()
    ids = TaskBuilder(tok, TaskConfig(ppl_text="alice_ch1_3.txt")).ppl_text_ids()
    assert ids == tok.encode(load_text(), add_special_tokens=False)
    f = tmp_path / "t.txt"
    f.write_text("One two three. " * 100)
    b = TaskBuilder(tok, TaskConfig(ppl_text=str(f)))
    assert b.ppl_text == str(f) and b.ppl_text_ids() == tok.encode(f.read_text(), add_special_tokens=False)
    assert TaskBuilder(WordTokenizer(), text="Some other text. " * 50).ppl_text == "filler"
    with pytest.raises(ValueError, match="neither a shipped text"):
        TaskConfig(ppl_text="no_such_text.txt")


def test_bad_inputs():
    b = TaskBuilder(WordTokenizer())
    with pytest.raises(ValueError, match="unknown task"):
        b.build("nope", 1000, 0)
    with pytest.raises(ValueError, match="too short"):
        b.build("niah", 20, 0)
    with pytest.raises(ValueError):
        TaskConfig(depths=(0.5, 2.0))
    with pytest.raises(ValueError):
        TaskConfig(samples=0)


def test_real_tokenizer_chat_prompt(default_tokenizer):
    p = render_prompt(default_tokenizer, "Instr.", "Ctx.", "Q?", "Answer:")
    assert p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\nAnswer:")
    s = TaskBuilder(default_tokenizer, TaskConfig(depths=(0.5,))).build("niah", 512, 0)[0]
    n = len(default_tokenizer.encode(s.prompt, add_special_tokens=False))
    assert n == s.prompt_tokens and 440 <= n <= 512


def test_scoring():
    assert score_any(" 1234567.", ["1234567"]) == 1.0
    assert score_any("12345678", ["1234567"]) == 0.0  # no match inside a longer number
    assert score_any("It is Fernleigh", ["fernleigh"]) == 1.0
    assert score_all("AB, CD and ef", ["ab", "cd", "EF", "gh"]) == 0.75
    assert score("all", "x", ["x"]) == 1.0
    with pytest.raises(ValueError):
        score("ppl", "x", ["x"])
    with pytest.raises(ValueError):
        score_any("x", [])
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
