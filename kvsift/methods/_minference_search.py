"""``kvsift minference search``: pick each head's sparse prefill pattern for one model, offline.

    kvsift minference search --model qwen2.5-coder-0.5b            # -> $KVSIFT_CACHE/minference/<model>.json
    kvsift minference search --model path/to/hf_dir --out patterns.json --tokens 8192 --keys 1024
    python -m kvsift.methods._minference_search search --model smollm2 --out smollm2.json

The paper's kernel-aware search (each pattern at the same cost, the best recall wins),
simplified: a calibration prompt of ``--tokens`` tokens (default a retrieval prompt: the eval's
``mk_niah`` task, several keyed facts in the shipped filler text and a question about one of them at
the end, built with its own seed, not one of the eval's samples; ``--text FILE``: a plain text) is
prefilled densely in chunks of ``--chunk-size``; at the last chunk, each
layer's queries and keys are indexed by each pattern at several sizes (``SCALES`` times the sizes
for ``--keys`` keys per query: A-shape ``keys - block`` local keys after the sink block;
vertical-slash ``keys / 2`` columns and ``keys / (4 block)`` diagonals; block-sparse ``keys / block``
blocks); per head, each size's density (selected over causal pairs) and recall (the dense softmax
mass on the selected pairs, mean over the chunk's queries) are measured, and the recall at the
same density for every pattern, ``keys`` over the mean causal keys, is interpolated between them.
A head's recall is the lower of two: over all the chunk's queries, and over its last ``last_q``
queries alone (where a prompt's question sits). Each head keeps vertical-slash unless another
pattern's recall beats it by ``--margin`` (default :data:`MARGIN`); then it takes the pattern of
highest recall at that density. Why the margin: with none (the highest recall wins, before
2026-12-04), the 1.5B's search on the retrieval prompt gave 25 A-shape and 20 block-sparse heads,
most of them ahead of vertical-slash by under 0.03 at the 4k calibration length, and at 16k-30k
(sizes ``vertical=512,slash=1024,local=1024,top_blocks=16``, every chunk sparse, 30 samples per
cell) ``minference+sentencekv`` with those patterns scored 10.1 points under ``sentencekv`` (95%
interval -15.2 to -5.5, mk_niah 0.80 against 0.93, qa 0.37 against 0.60), and with vertical-slash
for every head 1.7 points under it (-4.0 to +0.3, not significant). Vertical-slash estimates its
index from each prompt's own last queries; A-shape is fixed and block-sparse coarse, so a small
edge on one short calibration prompt does not carry to prompts four to eight times longer.
``--recall-from FILE`` picks again from a pattern file's stored recalls (another margin, no model).
Why both recalls: searched on narrative text alone (the Alice chapters, before 2026-12-04)
131 of the 0.5B's 336 heads chose A-shape, whose local window reads nothing far back; with those
patterns (`vertical=256,slash=512,local=512,top_blocks=8`, always sparse) Qwen2.5-Coder-0.5B's
``qa`` at 4k scored 0 of 12 against 5 of 12 with the full cache and with vertical-slash for every
head (``bench/results/minference_sparse_cpu_0.5b.jsonl``). The JSON holds the model name,
layer and head counts (the method checks them), the per-head choice, and each pattern's recall per
head for inspection. Rerunning the command overwrites the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from kvsift.methods.base import KVMethod, Run
from kvsift.methods.minference import FORMAT, PATTERNS, MInference, cache_path


SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Size multipliers each pattern is measured at (its recall at the target density is interpolated)."""

MARGIN = 0.05
"""Recall by which another pattern must beat vertical-slash for a head to leave it (see the module)."""


def check_margin(margin: float, name: str = "margin") -> None:
    """``ValueError`` unless ``margin`` (a recall difference) is in [0, 1]."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {margin}")


def choose_patterns(recall: dict[str, list[list[float]]], margin: float = MARGIN) -> list[list[str]]:
    """Each head's pattern from its recalls (``{pattern: [layer][head]}``): vertical-slash, unless the
    best other pattern's recall exceeds vertical-slash's by at least ``margin`` (ties between the
    others: the first in :data:`PATTERNS`)."""
    check_margin(margin)
    vs = recall["vertical_slash"]
    out = []
    for i, row in enumerate(vs):
        layer = []
        for h, base in enumerate(row):
            best = max((p for p in PATTERNS if p != "vertical_slash"), key=lambda p: recall[p][i][h])
            layer.append(best if recall[best][i][h] >= base + margin else "vertical_slash")
        out.append(layer)
    return out


def pattern_config(pattern: str, keys: int, block: int, last_q: int) -> MInference:
    """The pattern's sizes for about ``keys`` keys per query: A-shape ``keys - block`` local keys
    after the sink block; vertical-slash ``keys / 2`` columns and ``keys / (4 block)`` diagonals (each
    crossing at most two key blocks per query block); block-sparse ``keys / block`` blocks."""
    return MInference(last_q=last_q, vertical=max(1, keys // 2), slash=max(1, keys // (4 * block)), block=block,
                      top_blocks=max(2, keys // block), local=max(0, keys - block), min_len=0, patterns="default")


@dataclass
class _ProbeRun(Run):
    recall: dict = field(default_factory=dict)    # layer -> {pattern: [per head]}
    target: dict = field(default_factory=dict)    # layer -> target density


@dataclass(frozen=True)
class _Probe(KVMethod):
    """Dense prefill that measures each pattern's recall per head at the last prefill chunk."""

    needs_budget: ClassVar[bool] = False
    name: ClassVar[str] = "minference-search"
    keys: int = 512
    block: int = 64
    last_q: int = 64

    def start(self, prompt_len, num_layers):
        return _ProbeRun(0, prompt_len, num_layers)

    def prefill_attention(self, run, layer, query, keys, values, scale, module, ctx):
        if ctx.prefill_end:
            run.recall[layer.layer_idx], run.target[layer.layer_idx] = pattern_recall(
                query, keys, scale, self.keys, self.block, self.last_q)
        return None  # the engine attends densely


def _recall_at(points: list[tuple[float, float]], target: float) -> float:
    """Recall at density ``target`` from measured ``(density, recall)`` points: linear between them;
    below the sparsest, scaled down with the density; above the densest, the densest's recall."""
    pts = sorted(points)
    if target <= pts[0][0]:
        return pts[0][1] * target / max(pts[0][0], 1e-9)
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if target <= d1:
            return r0 if d1 <= d0 else r0 + (r1 - r0) * (target - d0) / (d1 - d0)
    return pts[-1][1]


def pattern_recall(query: torch.Tensor, keys: torch.Tensor, scale: float, n_keys: int, block: int, last_q: int):
    """Each pattern's recall per query head at one density: query ``(1, q_heads, L, dim)`` and keys
    ``(1, kv_heads, n, dim)`` (the chunk being the last ``L`` slots). Each pattern is indexed at the
    sizes for ``n_keys * s`` keys per query, ``s`` in :data:`SCALES`; per head, its recall (the
    dense softmax mass on the pairs it selects, mean over the chunk's queries, and mean over its
    last ``last_q`` queries alone) and density (selected over causal pairs) are measured, and the
    recall at the target density ``n_keys / mean causal keys`` interpolated; the lower of the two
    recalls is the head's. Returns ``({pattern: [recall per head]}, target density)``."""
    from kvsift.kernels.sparse_prefill_attention import selected_mask

    _, hq, L, _ = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    causal = torch.arange(n)[None, :] <= (n - L + torch.arange(L))[:, None]
    target = min(1.0, n_keys / float(causal.sum(-1).float().mean()))
    probs = []
    for h in range(hq):
        w = torch.matmul(query[0, h].float(), keys[0, h // g].float().T).cpu() * scale
        probs.append(torch.softmax(w.masked_fill(~causal, float("-inf")), dim=-1))
    recall = {}
    tail = min(last_q, L)
    for pat in PATTERNS:
        points = [[] for _ in range(hq)]
        tail_points = [[] for _ in range(hq)]
        for sc in SCALES:
            cfg = pattern_config(pat, max(block, int(n_keys * sc)), block, last_q)
            bi, cols = cfg.index(query, keys, (pat,) * hq, scale)
            mask = selected_mask(bi.cpu(), None if cols is None else cols.cpu(), L, n, block)[0]
            for h in range(hq):
                dens = float(mask[h].sum() / causal.sum())
                mass = (probs[h] * mask[h]).sum(-1)
                points[h].append((dens, float(mass.mean())))
                tail_points[h].append((dens, float(mass[-tail:].mean())))
        recall[pat] = [round(min(_recall_at(points[h], target), _recall_at(tail_points[h], target)), 4)
                       for h in range(hq)]
    return recall, round(target, 4)


def check_sizes(tokens: int, keys: int | None, block: int) -> int:
    """``ValueError`` unless the calibration length and the keys per query hold two blocks; returns
    the keys per query (default ``tokens // 8``)."""
    if tokens < 2 * block:
        raise ValueError(f"--tokens must be at least 2 blocks ({2 * block}), got {tokens}")
    keys = keys if keys is not None else tokens // 8
    if keys < 2 * block:
        raise ValueError(f"--keys must be at least 2 blocks ({2 * block}), got {keys}")
    return keys


CALIBRATION_SEED = 7919
"""The default calibration prompt's seed (the eval's cells use seeds from 0: a prompt of its own)."""


def retrieval_prompt(llm, tokens: int) -> str:
    """The default calibration prompt: the eval's ``mk_niah`` task at about ``tokens`` tokens (keyed
    facts in the shipped filler, a question about one of them at the end), as the model reads it."""
    from kvsift.eval.tasks import TaskBuilder, TaskConfig

    return TaskBuilder(llm.tokenizer, TaskConfig(samples=1)).build("mk_niah", tokens, CALIBRATION_SEED)[0].prompt


def search(llm, text: str, tokens: int = 4096, keys: int | None = None, last_q: int = 64,
           block: int = 64, margin: float = MARGIN) -> dict:
    """Pick a pattern per head of ``llm``'s model on the last ``tokens`` tokens of ``text``
    (repeated when shorter), comparing the patterns' recall at the density of ``keys`` keys per
    query (default ``tokens // 8``; :func:`choose_patterns` with ``margin``). Returns the pattern
    file's JSON object."""
    keys = check_sizes(tokens, keys, block)
    ids = llm.encode(text, chat=False)
    if not ids:
        raise ValueError("the calibration text is empty")
    while len(ids) < tokens:
        ids = ids + ids
    ids = ids[-tokens:]   # the end kept: a retrieval prompt's question
    llm.check_length(len(ids), "calibration text")
    probe = _Probe(keys=keys, block=block, last_q=last_q)
    run = probe.start(len(ids), llm.info.num_layers)
    with llm.lock:
        llm.runner.prefill([ids], probe, run, None, False)
    if len(run.recall) != llm.info.num_layers:
        raise ValueError(f"the calibration prefill reached {len(run.recall)} of {llm.info.num_layers} layers "
                         f"(sliding-window layers attend densely and are not searched)")
    recall = {p: [run.recall[i][p] for i in range(llm.info.num_layers)] for p in PATTERNS}
    return {"format": FORMAT, "model": llm.info.name, "num_layers": llm.info.num_layers,
            "num_heads": llm.info.num_heads, "layers": choose_patterns(recall, margin),
            "search": {"tokens": len(ids), "chunk": llm.chunk_size, "keys": keys, "last_q": last_q, "block": block,
                       "scales": list(SCALES), "density": [run.target[i] for i in range(llm.info.num_layers)],
                       "margin": margin},
            "recall": recall}


def repick(data: dict, margin: float) -> dict:
    """A pattern file's JSON object with its heads picked again from its stored recalls."""
    if data.get("format") != FORMAT or not isinstance(data.get("recall"), dict) \
            or set(data["recall"]) != set(PATTERNS):
        raise ValueError(f"not a searched pattern file with recalls (format {FORMAT}, a 'recall' per pattern)")
    return dict(data, layers=choose_patterns(data["recall"], margin), search=dict(data.get("search") or {},
                                                                                  margin=margin))


def add_parser(sub) -> None:
    """``kvsift minference search ...`` (added to the ``kvsift`` command)."""
    from kvsift.cli import _add_model_args

    m = sub.add_parser("minference", help="MInference sparse prefill: search each head's pattern for a model")
    msub = m.add_subparsers(dest="minference_command", required=True)
    s = msub.add_parser("search", help="pick each head's pattern (A-shape, vertical-slash, block-sparse) by recall "
                                       "on a calibration text; writes the JSON the minference method loads")
    _add_model_args(s)
    for a in s._actions:
        if a.dest == "chunk_size":
            a.help = "prefill chunk length (default tokens/4, between 2 blocks and 1024): the last one is measured"
    s.add_argument("--out", type=Path, default=None,
                   help="output JSON (default $KVSIFT_CACHE/minference/<model>.json, which minference loads by itself)")
    s.add_argument("--text", type=Path, default=None,
                   help="calibration text file (default: a retrieval prompt, the eval's mk_niah task at --tokens "
                        "with a seed of its own)")
    s.add_argument("--tokens", type=int, default=4096, help="calibration length in tokens")
    s.add_argument("--keys", type=int, default=None, help="keys per query given to every pattern (default tokens/8)")
    s.add_argument("--last-q", type=int, default=64, help="queries estimating the vertical-slash index")
    s.add_argument("--block", type=int, default=64, help="block size (16, 32, 64 or 128)")
    s.add_argument("--margin", type=float, default=MARGIN,
                   help=f"recall by which another pattern must beat vertical-slash for a head to leave it "
                        f"(default {MARGIN}; 0: the highest recall wins)")
    s.add_argument("--recall-from", type=Path, default=None, metavar="FILE",
                   help="pick again from this pattern file's stored recalls (with --margin), without the model")


def run(args) -> int:
    from kvsift.engine import LLM
    from kvsift.models import check_model

    check_margin(args.margin, "--margin")   # before reading a file or loading a model
    if args.recall_from is not None:   # no model: the stored recalls picked again
        try:
            data = repick(json.loads(args.recall_from.read_text(encoding="utf-8")), args.margin)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the pattern file {args.recall_from}: {e}") from None
        out = args.out if args.out is not None else cache_path(data["model"])
    else:
        check_model(args.model)
        if args.text is not None and not args.text.is_file():
            raise ValueError(f"calibration text not found: {args.text}")
        text = args.text.read_text(encoding="utf-8", errors="replace") if args.text is not None else None
        MInference(block=args.block, last_q=args.last_q)  # bad sizes: an error before loading the model
        check_sizes(args.tokens, args.keys, args.block)
        chunk = args.chunk_size or max(args.block * 2, min(1024, args.tokens // 4))
        llm = LLM(args.model, device=args.device, dtype=args.dtype, chunk_size=chunk)
        data = search(llm, text if text is not None else retrieval_prompt(llm, args.tokens), args.tokens,
                      args.keys, args.last_q, args.block, args.margin)
        data["search"]["calibration"] = str(args.text) if text is not None else f"mk_niah seed {CALIBRATION_SEED}"
        out = args.out if args.out is not None else cache_path(llm.info.name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e}") from None
    counts = {p: sum(row.count(p) for row in data["layers"]) for p in PATTERNS}
    dens = data["search"]["density"]
    print(f"recall at {sum(dens) / len(dens):.3f} of the causal keys ({data['search']['keys']} keys per query):")
    for p in PATTERNS:
        flat_r = [x for row in data["recall"][p] for x in row]
        print(f"{p:<15} heads {counts[p]:>4}  mean recall {sum(flat_r) / len(flat_r):.3f}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvsift.cli import run_command

    ap = argparse.ArgumentParser(prog="python -m kvsift.methods._minference_search")
    add_parser(ap.add_subparsers(dest="command", required=True))
    return run_command(run, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
