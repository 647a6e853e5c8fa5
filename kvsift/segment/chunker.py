"""Sentence / chunk boundaries of a token sequence, as exact token spans.

Pipeline: token pieces (:mod:`kvsift.segment.pieces`) -> text -> sentence ends (character offsets,
from a fast rule set or pysbd) plus hard breaks (newlines, special tokens) -> token boundaries ->
long segments split to at most ``max_len`` tokens, short ones merged up to ``min_len``.

The spans always partition ``[0, n)``: every token is in exactly one chunk, chunks are contiguous
and in order. Text without punctuation (or code without newlines) still gets chunks: the
``max_len`` cap turns it into fixed-size pieces.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import astuple, dataclass
from typing import Any, Sequence

import torch

from kvsift.segment.pieces import TokenPieces, token_pieces

SPLITTERS = ("rules", "pysbd", "fixed")

# Words after which a period does not end a sentence (compared lower-case, without the period).
_ABBREV = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig figs eq eqs no nos vol pp approx dept est inc ltd co corp "
    "jan feb mar apr jun jul aug sep sept oct nov dec mt ft gen col lt sgt rev u.s a.m p.m".split()
)
# Sentence-final punctuation (optionally followed by closing quotes/brackets) then whitespace.
_SENT_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)")
# CJK full stops end a sentence without whitespace after them.
_CJK_END = re.compile(r"[。！？]+[」』”’)\]]*")
_WORD_BEFORE = re.compile(r"([\w.]+)$")


@dataclass(slots=True)
class SegmentConfig:
    """How to cut a prompt into chunks.

    ``min_len``/``max_len``: chunk length bounds in tokens (a chunk is shorter than ``min_len`` only
    when merging would exceed ``max_len``, or the whole input is shorter). ``splitter``: ``"rules"``
    (fast regex rules, the default), ``"pysbd"`` (pysbd's rule set: better on abbreviations, about
    50 us per character: slow beyond a few thousand tokens) or ``"fixed"`` (fixed-size chunks of
    ``max_len`` tokens). ``newline_breaks``: every newline ends a segment (code, lists).
    """

    min_len: int = 8
    max_len: int = 48
    splitter: str = "rules"
    newline_breaks: bool = True
    language: str = "en"

    def __post_init__(self):
        if self.min_len < 1:
            raise ValueError(f"min_len must be >= 1, got {self.min_len}")
        if self.max_len < self.min_len:
            raise ValueError(f"max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        if self.splitter not in SPLITTERS:
            raise ValueError(f"splitter must be one of {SPLITTERS}, got {self.splitter!r}")


# ---- character-level boundaries ---------------------------------------------------------------
def sentence_ends_rules(text: str) -> list[int]:
    """Character offsets where a new sentence starts (just after the final punctuation and
    closing quotes), by regex rules with an abbreviation list. Sorted, may repeat."""
    out = []
    for m in _SENT_END.finditer(text):
        if text[m.start():m.end()].rstrip("\"'”’)]") == ".":
            w = _WORD_BEFORE.search(text[max(0, m.start() - 32):m.start()])
            if w is not None:
                word = w.group(1).lower().rstrip(".")
                # single letters ("J. Smith", "U.S.") and known abbreviations do not end sentences
                if word in _ABBREV or (len(word) == 1 and word.isalpha()) or re.fullmatch(r"(\w\.)+\w", word):
                    continue
        out.append(m.end())
    out.extend(m.end() for m in _CJK_END.finditer(text))
    out.sort()
    return out


def sentence_ends_pysbd(text: str, language: str = "en") -> list[int]:
    """Character offsets where pysbd starts a new sentence."""
    try:
        import pysbd
    except ImportError as e:  # pragma: no cover - pysbd is a dependency
        raise RuntimeError("splitter='pysbd' needs the pysbd package (pip install pysbd)") from e
    seg = pysbd.Segmenter(language=language, clean=False, char_span=True)
    # pysbd's spans include trailing whitespace, which byte-level BPE glues to the next word
    return [s.start + len(s.sent.rstrip()) for s in seg.segment(text)][:-1]


def newline_breaks(text: str) -> list[int]:
    """Offsets just after each run of newlines."""
    return [m.end() for m in re.finditer(r"\n+", text)]


# ---- token-level ------------------------------------------------------------------------------
def _char_to_token_bounds(char_bounds: Sequence[int], starts: list[int], n: int) -> list[int]:
    """Map character offsets to token boundaries: a boundary at character ``c`` becomes the first
    token starting at or after ``c`` (a token straddling ``c`` stays with the earlier segment)."""
    out = []
    for c in char_bounds:
        t = bisect.bisect_left(starts, c, 0, n)
        if 0 < t < n:
            out.append(t)
    return out


def _split_long(start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into near-equal pieces of at most ``max_len`` tokens."""
    L = end - start
    if L <= max_len:
        return [(start, end)]
    k = -(-L // max_len)
    cuts = [start + (L * i) // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def spans_from_bounds(bounds: Sequence[int], n: int, min_len: int, max_len: int) -> list[tuple[int, int]]:
    """Token boundaries (any order, duplicates allowed; values outside (0, n) ignored) ->
    chunk spans partitioning ``[0, n)`` with lengths capped at ``max_len`` and merged up to
    ``min_len`` where that stays within ``max_len``."""
    if n <= 0:
        return []
    cuts = sorted({b for b in bounds if 0 < b < n})
    segs = []
    prev = 0
    for c in cuts + [n]:
        segs.extend(_split_long(prev, c, max_len))
        prev = c
    out: list[list[int]] = []
    for s, e in segs:
        if out and (out[-1][1] - out[-1][0] < min_len) and (e - out[-1][0] <= max_len):
            out[-1][1] = e
        else:
            out.append([s, e])
    # a short last chunk joins its predecessor when that fits
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_len and out[-1][1] - out[-2][0] <= max_len:
        out[-2][1] = out[-1][1]
        out.pop()
    return [(s, e) for s, e in out]


def segment_pieces(tp: TokenPieces, config: SegmentConfig | None = None) -> list[tuple[int, int]]:
    """Chunk spans ``[(start, end), ...]`` (token indices) of already-decoded token pieces."""
    cfg = config or SegmentConfig()
    n = len(tp.pieces)
    if cfg.splitter == "fixed":
        return spans_from_bounds(range(cfg.max_len, n, cfg.max_len), n, 1, cfg.max_len)
    text = tp.text
    starts = tp.char_starts()[:-1]
    if cfg.splitter == "pysbd":
        chars = sentence_ends_pysbd(text, cfg.language)
    else:
        chars = sentence_ends_rules(text)
    if cfg.newline_breaks:
        chars = chars + newline_breaks(text)
    bounds = _char_to_token_bounds(chars, starts, n)
    # control tokens (chat-turn markers, BOS/EOS) are segments of their own (merged by min_len)
    for i, sp in enumerate(tp.special):
        if sp:
            bounds += [i, i + 1]
    return spans_from_bounds(bounds, n, cfg.min_len, cfg.max_len)


def segment_tokens(token_ids: Sequence[int] | torch.Tensor, tokenizer: Any | None,
                   config: SegmentConfig | None = None) -> list[tuple[int, int]]:
    """Sentence-aligned chunk spans of ``token_ids`` (list or 1-D tensor), partitioning ``[0, n)``.

    Without a tokenizer (``None``) the spans are fixed-size chunks of ``config.max_len`` tokens.
    """
    cfg = config or SegmentConfig()
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    n = len(token_ids)
    if tokenizer is None or cfg.splitter == "fixed":
        return spans_from_bounds(range(cfg.max_len, n, cfg.max_len), n, 1, cfg.max_len)
    # a pure function of the tokens, the tokenizer and the config: remembered (an evaluation grid
    # segments the same prompts at every budget, 0.2 s per 30k-token prompt on one CPU core)
    key = (hashlib.blake2b(torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest(),
           astuple(cfg))
    with _SPANS_LOCK:
        try:
            memo = _SPANS.setdefault(tokenizer, OrderedDict())
        except TypeError:   # a tokenizer that takes no weak reference: not remembered
            memo = None
        hit = memo.get(key) if memo is not None else None
        if hit is not None:
            memo.move_to_end(key)
            return list(hit)
    spans = segment_pieces(token_pieces(token_ids, tokenizer), cfg)
    if memo is not None:
        with _SPANS_LOCK:
            memo[key] = tuple(spans)
            while len(memo) > SPANS_MEMO:
                memo.popitem(last=False)
    return spans


SPANS_MEMO = 256
"""Prompts whose spans :func:`segment_tokens` remembers per tokenizer (least recently used out)."""
_SPANS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_SPANS_LOCK = threading.Lock()   # sentencekv segments on a worker thread beside the prefill


def chunk_index(spans: Sequence[tuple[int, int]], n: int) -> torch.Tensor:
    """``(n,)`` int64: the chunk of every token. Raises if ``spans`` do not partition ``[0, n)``."""
    check_partition(spans, n)
    lens = torch.tensor([e - s for s, e in spans], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(spans)), lens)


def check_partition(spans: Sequence[tuple[int, int]], n: int) -> None:
    """Raise ``ValueError`` unless ``spans`` are non-empty, contiguous and cover ``[0, n)`` exactly."""
    pos = 0
    for i, (s, e) in enumerate(spans):
        if s != pos or e <= s:
            raise ValueError(f"spans do not partition [0, {n}): span {i} is ({s}, {e}), expected start {pos}")
        pos = e
    if pos != n:
        raise ValueError(f"spans cover [0, {pos}), expected [0, {n})")
