"""How many keys MInference's vertical-slash index lists on a real model, and how much of the true
attention it holds: fixed sizes (the paper's) against a cumulative-attention ``coverage``.

    PYTHONPATH=. python3 bench/minference_coverage.py --model qwen2.5-coder-0.5b --lengths 4096,8192 \\
        --coverages none,0.99,0.95,0.9 --out bench/out/minference_coverage.json

Each prompt (the eval suite's first sample of each ``--tasks`` task at each length) is prefilled
densely, in chunks of ``--chunk``, with a hook on the prefill attention of every layer. For each
chunk-layer and each setting, the hook builds the vertical-slash index every head would get
(``MInference.index``, ``patterns=default``) and measures, on the dense activations:

* ``density``: the keys listed over the causal keys (``listed_fraction``, as the method's stats);
* ``recall``: the share of the true softmax attention of ``--rows`` sampled query rows that falls on
  the selected keys (selected and causal), mean over heads and rows, and the 5th percentile over
  (head, row) pairs (``recall_p5``);
* ``tail_recall``: the same over the prompt's last ``--tail`` rows (where a question sits).

Recall is taken on dense activations (each layer's input is what dense prefill gives), the
MInference paper's measure; how the loss compounds through a sparse prefill is what the eval suite's
accuracy runs show. The sizes (``--vertical``, ``--slash``, ``--last-q``, ``--block``) are the
method's defaults unless given; ``coverage`` keeps, of those, the shortest top-ranked prefix holding
that share of the last ``last_q`` queries' attention. Device-independent numbers: the CPU gives what
a GPU gives (up to float rounding). Prints a table and writes the rows to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without an install (the GPU machine)

import torch  # noqa: E402


def attention_rows(query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, L: int, scale: float) -> torch.Tensor:
    """True causal softmax attention of chunk rows ``rows``: query ``(batch, q_heads, L, dim)``, keys
    ``(batch, kv_heads, n, dim)`` -> ``(batch, q_heads, r, n)`` float32."""
    g = query.shape[1] // keys.shape[1]
    n = keys.shape[2]
    k = keys.float().repeat_interleave(g, 1)
    w = torch.matmul(query[:, :, rows].float(), k.transpose(-1, -2)) * scale
    causal = torch.arange(n, device=rows.device)[None, :] <= (n - L + rows)[:, None]
    return torch.softmax(w.masked_fill(~causal, float("-inf")), -1)


def make_probe(settings: dict, rows: int, tail: int, prompt_len: int, seed: int = 0):
    """A ``KVMethod`` whose prefill hook measures every setting's index and attends densely.
    ``settings``: label -> ``MInference``. Returns ``(method, records)``; each record is one
    (chunk-layer, setting): ``density``, ``recall`` (mean), ``recall_p5``, and ``tail_recall`` when
    the chunk holds the prompt's last ``tail`` rows."""
    from kvsift.kernels.sparse_prefill_attention import selected_mask
    from kvsift.methods.minference import MInference, listed_fraction

    records: list[dict] = []
    gen = torch.Generator().manual_seed(seed)

    @dataclasses.dataclass(frozen=True)
    class Probe(MInference):
        def prefill_attention(self, run, layer, query, keys, values, scale, module, ctx):
            if ctx.rereading:
                return None
            L, n = query.shape[2], keys.shape[2]
            pick = torch.randperm(L, generator=gen)[: min(rows, L)].sort().values.to(query.device)
            end = prompt_len - (n - L)                          # chunk rows before the prompt's end
            last = torch.arange(max(0, end - tail), end, device=query.device) if 0 < end <= L else None
            att = attention_rows(query, keys, pick, L, scale)
            att_t = attention_rows(query, keys, last, L, scale) if last is not None else None
            heads = ("vertical_slash",) * query.shape[1]
            for label, m in settings.items():
                bi, cols = m.index(query, keys, heads, scale)
                rec = (att * selected_mask(bi, cols, L, n, m.block, pick)).sum(-1)      # (b, hq, r)
                out = {"setting": label, "layer": layer.layer_idx, "chunk_keys": n, "chunk_rows": L,
                       "density": float(listed_fraction(bi, cols, L, n, m.block)),
                       "recall": float(rec.mean()), "recall_p5": float(rec.flatten().quantile(0.05))}
                if att_t is not None:
                    out["tail_recall"] = float((att_t * selected_mask(bi, cols, L, n, m.block, last)).sum(-1).mean())
                records.append(out)
            return None

    return Probe(min_len=0, max_density=1.0), records


def summarize(records: list[dict]) -> dict:
    """Per setting: density weighted by each chunk-layer's causal key pairs (the attention work it
    stands for), recall means, and the worst layer's mean recall."""
    out: dict = {}
    for r in records:
        s = out.setdefault(r["setting"], {"w": 0.0, "d": 0.0, "rec": [], "p5": [], "tail": [], "layers": {}})
        L, n = r["chunk_rows"], r["chunk_keys"]
        w = L * (n - L + (L + 1) / 2)
        s["w"] += w
        s["d"] += w * r["density"]
        s["rec"].append(r["recall"])
        s["p5"].append(r["recall_p5"])
        s["layers"].setdefault(r["layer"], []).append(r["recall"])
        if "tail_recall" in r:
            s["tail"].append(r["tail_recall"])
    res = {}
    for label, s in out.items():
        res[label] = {"density": s["d"] / s["w"], "recall": sum(s["rec"]) / len(s["rec"]),
                      "recall_p5": sum(s["p5"]) / len(s["p5"]),
                      "worst_layer_recall": min(sum(v) / len(v) for v in s["layers"].values()),
                      "layer_recall": {i: sum(v) / len(v) for i, v in sorted(s["layers"].items())},
                      "tail_recall": sum(s["tail"]) / len(s["tail"]) if s["tail"] else None}
    return res


def _options(spec: str) -> dict:
    """``'vertical=512,coverage=0.9'`` -> ``{'vertical': 512, 'coverage': 0.9}`` (ints, floats, None)."""
    out = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a setting is 'option=value,...', got {spec!r}")
        val = val.strip()
        out[key.strip()] = None if val.lower() == "none" else int(val) if val.lstrip("-").isdigit() else float(val)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a real model (registered name or path)")
    p.add_argument("--lengths", default="4096", help="comma-separated prompt lengths (tokens)")
    p.add_argument("--tasks", default="niah,qa", help="eval suite tasks whose first sample is prefilled")
    p.add_argument("--coverages", default="none,0.95,0.9",
                   help="comma-separated coverage settings ('none': the fixed sizes)")
    p.add_argument("--settings", default="",
                   help="more settings, ';'-separated, each minference options 'k=v,k=v' over the sizes "
                        "(e.g. 'vertical=512,slash=1024;coverage=0.9,vertical=2000'); the label is the text")
    for opt in ("vertical", "slash", "last_q", "block"):
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=None, help=f"minference {opt}")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--rows", type=int, default=64, help="query rows sampled per chunk-layer for recall")
    p.add_argument("--tail", type=int, default=32, help="the prompt's last rows measured apart (tail_recall)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--out", default="bench/out/minference_coverage.json")
    args = p.parse_args(argv)

    from kvsift import LLM, SamplingParams
    from kvsift.methods.minference import MInference
    from bench.minference_prefill import real_prompts

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
        covs = [None if c.strip().lower() == "none" else float(c) for c in args.coverages.split(",") if c.strip()]
        sizes = {o: getattr(args, o) for o in ("vertical", "slash", "last_q", "block") if getattr(args, o) is not None}
        settings = {("fixed" if c is None else f"coverage={c:g}"): MInference(patterns="default", coverage=c, **sizes)
                    for c in covs}
        for spec in (x.strip() for x in args.settings.split(";")):
            if spec:
                settings[spec] = MInference(patterns="default", **dict(sizes, **_options(spec)))
        if not settings:
            raise ValueError("no setting: give --coverages or --settings")
    except Exception as e:  # noqa: BLE001 - a bad option is a usage error
        print(f"minference_coverage: error: {e}", file=sys.stderr)
        return 2
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM(args.model, device=dev, chunk_size=args.chunk)
    m0 = MInference(patterns="default", **sizes)
    print(f"model {args.model} ({llm.info.name}) on {dev}, chunk {args.chunk}, sizes vertical {m0.vertical} "
          f"slash {m0.slash} last_q {m0.last_q} block {m0.block}")
    w = max(14, *(len(x) for x in settings))
    print(f"{'length':>7} {'task':<8} {'setting':<{w}} {'density':>8} {'recall':>7} {'p5':>6} {'worst layer':>11} "
          f"{'tail':>6}")
    rows = []
    for n, task, ids in real_prompts(llm.tokenizer, lengths, args.tasks):
        probe, records = make_probe(settings, args.rows, args.tail, len(ids))
        t0 = time.perf_counter()
        llm.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True), method=probe, progress=False)
        secs = time.perf_counter() - t0
        for label, s in summarize(records).items():
            rows.append({"length": len(ids), "target_length": n, "task": task, "setting": label, **s,
                         "chunk_layers": sum(r["setting"] == label for r in records), "seconds": secs})
            tr = "-" if s["tail_recall"] is None else f"{s['tail_recall']:.3f}"
            print(f"{len(ids):>7} {task:<8} {label:<{w}} {s['density']:8.3f} {s['recall']:7.3f} "
                  f"{s['recall_p5']:6.3f} {s['worst_layer_recall']:11.3f} {tr:>6}", flush=True)
    meta = {"model": args.model, "model_name": llm.info.name, "device": dev, "chunk": args.chunk,
            "rows": args.rows, "tail": args.tail, "settings": {k: dataclasses.asdict(m) for k, m in settings.items()},
            "sizes": {k: getattr(m0, k) for k in ("vertical", "slash", "last_q", "block")}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
