"""Shipped public-domain text and the token-counted filler built from it.

``kvsift/data/alice_ch1_3.txt`` holds chapters I-III of Lewis Carroll's *Alice's Adventures in
Wonderland* (1865, public domain), typed from memory of the Project Gutenberg edition (it may
differ from that edition in small details of wording and punctuation). It is the haystack filler
for the needle tasks.

The perplexity task scores a longer text, ``alice`` (:data:`PPL_TEXT`): the shipped files of
:data:`PPL_PARTS` joined in order, the whole book (``alice_ch4_12.txt`` typed the same way),
34,387 tokens for a Qwen2.5 tokenizer, so that the suite's 30k-token ppl cells (30,000 + 64
tokens) have a text to cut from (chapters I-III alone, 7,521 tokens, served 4k only).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

DEFAULT_TEXT = "alice_ch1_3.txt"
PPL_TEXT = "alice"   # the perplexity task's default text: PPL_PARTS joined
PPL_PARTS = ("alice_ch1_3.txt", "alice_ch4_12.txt")


class Tokenizer(Protocol):
    """What the eval code needs from a tokenizer (a transformers tokenizer satisfies it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def available_texts() -> list[str]:
    return sorted(p.name for p in DATA_DIR.glob("*.txt"))


@lru_cache(maxsize=8)
def load_text(name: str = DEFAULT_TEXT) -> str:
    """The shipped text ``name`` (a file in ``kvsift/data``), with its title lines kept."""
    names = available_texts()
    if name not in names:
        raise FileNotFoundError(f"no shipped text {name!r}; available: {names}")
    return (DATA_DIR / name).read_text(encoding="utf-8")


def ppl_texts() -> list[str]:
    """The names ``--ppl-text`` accepts besides a file path: :data:`PPL_TEXT` and each shipped file."""
    return [PPL_TEXT, *available_texts()]


def load_ppl_text(name: str = PPL_TEXT) -> str:
    """A perplexity text by name: :data:`PPL_TEXT` (its parts joined by a blank line) or a shipped file."""
    if name == PPL_TEXT:
        return "\n\n".join(load_text(n).strip() for n in PPL_PARTS) + "\n"
    return load_text(name)


_SENT_RE = re.compile(r"(?<=[.!?])[\"')\u201d]*\s+(?=[\"'(\u201cA-Z])")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for filler; never returns empty strings).
    Paragraph breaks and chapter headings also split."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        start = 0
        for m in _SENT_RE.finditer(para):
            piece = para[start:m.start()].strip()
            if piece:
                out.append(piece)
            start = m.end()
        tail = para[start:].strip()
        if tail:
            out.append(tail)
    return out


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


class Filler:
    """Sentences of the shipped text with their token counts, taken cyclically from an offset.

    Token counts are per sentence (each with its leading space); the count of the joined text
    differs from their sum by a few tokens at most, which the task builders correct by measuring.
    """

    def __init__(self, tokenizer: Tokenizer, text: str | None = None):
        self.tok = tokenizer
        self.sentences = split_sentences(load_text() if text is None else text)
        if not self.sentences:
            raise ValueError("filler text has no sentences")
        self.counts = [count_tokens(tokenizer, " " + s) for s in self.sentences]

    def __len__(self) -> int:
        return len(self.sentences)

    def take(self, n_tokens: int, start: int = 0) -> tuple[list[str], list[int]]:
        """``(pieces, token_counts)``: consecutive sentences (wrapping around) from sentence
        ``start`` whose counts add up to at most ``n_tokens``, then the longest word prefix of the
        next sentence that still fits (so the filler grows smoothly with ``n_tokens``)."""
        out: list[str] = []
        counts: list[int] = []
        total, i = 0, start % len(self.sentences)
        while n_tokens > 0:
            c = self.counts[i]
            if total + c > n_tokens:
                break
            out.append(self.sentences[i])
            counts.append(c)
            total += c
            i = (i + 1) % len(self.sentences)
            if len(out) > 1_000_000:
                raise RuntimeError("filler take() runaway")
        rest = n_tokens - total
        if rest > 0:
            words = self.sentences[i].split()
            lo, hi = 0, len(words) - 1
            while lo < hi:  # longest prefix of the next sentence within `rest` tokens
                mid = (lo + hi + 1) // 2
                if count_tokens(self.tok, " " + " ".join(words[:mid])) <= rest:
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                frag = " ".join(words[:lo])
                out.append(frag)
                counts.append(count_tokens(self.tok, " " + frag))
        return out, counts
