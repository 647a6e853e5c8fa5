"""Token -> text pieces with exact character offsets.

The segmenters work on text, the KV cache works on tokens. :func:`token_pieces` returns one string
per token whose concatenation is the text the segmenter sees, so every character belongs to exactly
one token and character boundaries map back to token boundaries without approximation.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) are decoded exactly: each token's
bytes go through one incremental UTF-8 decoder, and a multi-byte character split over several
tokens is attributed to the token that completes it. Other tokenizers fall back to decoding each
token alone (exact enough for segmentation: a character may come out as U+FFFD).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence


@dataclass(slots=True)
class TokenPieces:
    """``pieces[i]`` is token ``i``'s text; ``special[i]`` marks control tokens (chat markers, BOS/EOS)."""

    pieces: list[str]
    special: list[bool]

    def __post_init__(self):
        if len(self.pieces) != len(self.special):
            raise ValueError(f"pieces ({len(self.pieces)}) and special ({len(self.special)}) differ in length")

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def char_starts(self) -> list[int]:
        """Start offset of each token in :attr:`text`, plus the total length at the end (``n + 1`` items)."""
        out = [0]
        for p in self.pieces:
            out.append(out[-1] + len(p))
        return out


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-unicode map, inverted (char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    return dec is not None and type(dec).__name__ == "ByteLevel"


def token_pieces(token_ids: Sequence[int], tokenizer: Any) -> TokenPieces:
    """Text piece of every token in ``token_ids`` (a list or 1-D tensor of ints).

    ``tokenizer``: a transformers tokenizer (fast or slow). Special tokens keep their literal text
    (e.g. ``<|im_start|>``) and are flagged in ``special``.
    """
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    ids = [int(i) for i in token_ids]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special = [i in special_ids for i in ids]
    if not ids:
        return TokenPieces([], [])
    if _is_byte_level(tokenizer):
        toks = tokenizer.convert_ids_to_tokens(ids)
        bdec = _byte_decoder()
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = []
        for t, sp in zip(toks, special):
            t = t if t is not None else ""
            if sp or any(c not in bdec for c in t):  # special / added tokens hold plain text
                pieces.append(utf8.decode(b"", final=True) + t)
                utf8.reset()
            else:
                pieces.append(utf8.decode(bytes(bdec[c] for c in t)))
        tail = utf8.decode(b"", final=True)
        if tail:
            pieces[-1] += tail
        return TokenPieces(pieces, special)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    return TokenPieces([p if isinstance(p, str) else "" for p in pieces], special)
