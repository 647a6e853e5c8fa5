"""Token-aligned sentence / chunk segmentation (used by ``sentencekv``)."""

from kvsift.segment.chunker import (
    SPLITTERS,
    SegmentConfig,
    check_partition,
    chunk_index,
    segment_pieces,
    segment_tokens,
    sentence_ends_pysbd,
    sentence_ends_rules,
    spans_from_bounds,
)
from kvsift.segment.pieces import TokenPieces, token_pieces

__all__ = ["SPLITTERS", "SegmentConfig", "TokenPieces", "check_partition", "chunk_index", "segment_pieces",
           "segment_tokens", "sentence_ends_pysbd", "sentence_ends_rules", "spans_from_bounds", "token_pieces"]
