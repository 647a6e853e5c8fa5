"""Token-aligned segmentation: exact partitions, sentence/newline/special boundaries, length bounds."""

import random

import pytest
import torch

from kvsift.segment import (
    SegmentConfig,
    check_partition,
    chunk_index,
    segment_tokens,
    sentence_ends_rules,
    spans_from_bounds,
    token_pieces,
)


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level BPE tokenizer without merges (one token per UTF-8 byte), plus a special token:
    multi-byte characters are split over several tokens, the hard case for offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|sep|>"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, additional_special_tokens=["<|sep|>"])


class WordTok:
    """Minimal non-byte-level tokenizer: whitespace-attached words (exercises the decode fallback)."""

    all_special_ids = [0]

    def __init__(self):
        self.vocab = ["<bos>"]

    def encode(self, text):
        import re

        ids = []
        for w in re.findall(r"\s*\S+|\s+", text):
            if w not in self.vocab:
                self.vocab.append(w)
            ids.append(self.vocab.index(w))
        return ids

    def batch_decode(self, seqs, **kw):
        return ["".join(self.vocab[i] for i in s) for s in seqs]


def texts(spans, pieces):
    return ["".join(pieces[s:e]) for s, e in spans]


def test_token_pieces_byte_level_exact(byte_tok):
    text = "Café naïve 日本語です。 Ok!\n"
    ids = byte_tok(text)["input_ids"]
    tp = token_pieces(ids, byte_tok)
    assert tp.text == text == byte_tok.decode(ids)
    assert len(tp.pieces) == len(ids)
    # a 3-byte character is attributed to the token that completes it
    i = tp.pieces.index("日")
    assert tp.pieces[i - 2:i] == ["", ""]
    sep = byte_tok.convert_tokens_to_ids("<|sep|>")
    tp2 = token_pieces([sep] + ids, byte_tok)
    assert tp2.special[0] and not any(tp2.special[1:]) and tp2.pieces[0] == "<|sep|>"


def test_sentence_rules():
    text = "Mr. Smith went to Washington D.C. yesterday. He said: \"Hello!\" Then e.g. left? Yes. 中文。下一句。"
    ends = sentence_ends_rules(text)
    cut = [text[a:b] for a, b in zip([0] + ends, ends + [len(text)])]
    assert cut[0] == "Mr. Smith went to Washington D.C. yesterday."
    assert cut[1] == " He said: \"Hello!\""
    assert cut[2] == " Then e.g. left?"
    assert cut[3] == " Yes."
    assert cut[4] == " 中文。"


def test_sentences_to_tokens(byte_tok):
    sents = ["The cat sat on the mat.", " A dog barked loudly!", " Why is the sky blue?", " Nobody knows."]
    text = "".join(sents)
    ids = byte_tok(text)["input_ids"]
    spans = segment_tokens(ids, byte_tok, SegmentConfig(min_len=1, max_len=1000))
    tp = token_pieces(ids, byte_tok)
    assert texts(spans, tp.pieces) == sents
    check_partition(spans, len(ids))


def test_newlines_and_special_tokens(byte_tok):
    sep = byte_tok.convert_tokens_to_ids("<|sep|>")
    code = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    ids = byte_tok(code)["input_ids"] + [sep] + byte_tok("after")["input_ids"]
    spans = segment_tokens(ids, byte_tok, SegmentConfig(min_len=1, max_len=1000))
    got = texts(spans, token_pieces(ids, byte_tok).pieces)
    assert got == ["def f(x):\n", "    return x + 1\n\n", "print(f(2))\n", "<|sep|>", "after"]


def test_no_punctuation_falls_back_to_fixed_size(byte_tok):
    text = " ".join(["word"] * 200)  # 999 tokens, no sentence end, no newline
    ids = byte_tok(text)["input_ids"]
    spans = segment_tokens(ids, byte_tok, SegmentConfig(min_len=4, max_len=32))
    check_partition(spans, len(ids))
    lens = [e - s for s, e in spans]
    assert max(lens) <= 32 and min(lens) >= 31  # near-equal pieces
    fixed = [(i, min(i + 100, len(ids))) for i in range(0, len(ids), 100)]
    assert segment_tokens(ids, None, SegmentConfig(max_len=100)) == fixed


@pytest.mark.parametrize("seed", range(5))
def test_random_partition_and_bounds(seed, byte_tok):
    rng = random.Random(seed)
    words = ["alpha", "beta.", "Gamma!", "\n", "x", "yes?", "Dr.", "日本。", "", "\n\n", "{", "}"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 300)))
    ids = byte_tok(text)["input_ids"]
    lo, hi = rng.randint(1, 6), rng.randint(6, 40)
    for splitter in ("rules", "pysbd", "fixed"):
        cfg = SegmentConfig(min_len=lo, max_len=hi, splitter=splitter)
        spans = segment_tokens(torch.tensor(ids, dtype=torch.long), byte_tok, cfg)
        check_partition(spans, len(ids))
        lens = [e - s for s, e in spans]
        assert all(x <= hi for x in lens)
        # short chunks only where merging with the next chunk would exceed max_len
        for a, b in zip(lens[:-1], lens[1:]):
            assert a >= lo or a + b > hi
        if len(ids):
            idx = chunk_index(spans, len(ids))
            assert idx.shape == (len(ids),) and idx[0] == 0 and idx[-1] == len(spans) - 1


def test_word_tokenizer_fallback():
    tok = WordTok()
    ids = [0] + tok.encode("One sentence here. Another one here! A third")
    spans = segment_tokens(ids, tok, SegmentConfig(min_len=1, max_len=50))
    pieces = token_pieces(ids, tok).pieces
    assert texts(spans, pieces) == ["<bos>", "One sentence here.", " Another one here!", " A third"]


def test_spans_from_bounds_merge_and_cap():
    assert spans_from_bounds([2, 3, 4, 20], 24, min_len=3, max_len=10) == [(0, 3), (3, 12), (12, 20), (20, 24)]
    assert spans_from_bounds([], 0, 1, 4) == []
    assert spans_from_bounds([5], 6, 2, 8) == [(0, 6)]  # short tail merged


def test_bad_input():
    with pytest.raises(ValueError, match="min_len"):
        SegmentConfig(min_len=0)
    with pytest.raises(ValueError, match="max_len"):
        SegmentConfig(min_len=8, max_len=4)
    with pytest.raises(ValueError, match="splitter"):
        SegmentConfig(splitter="nltk")
    with pytest.raises(ValueError, match="partition"):
        check_partition([(0, 2), (3, 4)], 4)
    with pytest.raises(ValueError, match="cover"):
        check_partition([(0, 2)], 4)
    with pytest.raises(ValueError, match="1-D"):
        segment_tokens(torch.zeros(2, 2, dtype=torch.long), None)


def test_default_tokenizer_chat_prompt(default_tokenizer):
    """The default model's byte-level tokenizer on a chat prompt: exact text, markers split chunks."""
    tok = default_tokenizer
    msgs = [{"role": "user", "content": "First sentence here. Second one follows! Then code:\nx = 1\ny = 2\n"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tp = token_pieces(ids, tok)
    assert tp.text == tok.decode(ids)
    spans = segment_tokens(ids, tok, SegmentConfig(min_len=1, max_len=64))
    check_partition(spans, len(ids))
    got = texts(spans, tp.pieces)
    assert "First sentence here." in got and " Second one follows!" in got
    assert "<|im_start|>" in got and "x = 1\n" in got


def test_spans_are_remembered_per_prompt_tokenizer_and_config(byte_tok, monkeypatch):
    """segment_tokens is pure: a prompt segmented again (an eval grid's next budget) is not
    recomputed; another config or prompt is; the caller gets its own list."""
    import kvsift.segment.chunker as ch

    calls = []
    real = ch.segment_pieces
    monkeypatch.setattr(ch, "segment_pieces", lambda tp, cfg: calls.append(1) or real(tp, cfg))
    ids = byte_tok.encode("One sentence here. Another one follows! And a third?")
    a = segment_tokens(ids, byte_tok, SegmentConfig(min_len=1, max_len=8))
    a.append((-1, -1))
    b = segment_tokens(torch.tensor(ids), byte_tok, SegmentConfig(min_len=1, max_len=8))
    assert len(calls) == 1 and b == a[:-1]
    segment_tokens(ids[:-1], byte_tok, SegmentConfig(min_len=1, max_len=8))
    assert len(calls) == 2
    monkeypatch.setattr(ch, "SPANS_MEMO", 1)
    segment_tokens(ids, byte_tok, SegmentConfig(min_len=1, max_len=4))   # another config: the only one kept
    segment_tokens(ids, byte_tok, SegmentConfig(min_len=1, max_len=8))   # so this one was let go
    assert len(calls) == 4
