"""Bytes of a persisted reusable context on disk (the server's `/v1/contexts` format: safetensors +
JSON), with and without KIVI quantization, and whether the reloaded context answers with the same
tokens (issue #13: a persisted context must be about 4x smaller at int4).

The default model (Qwen2.5-Coder-0.5B), one ``--tokens``-token document of the eval's filler text,
prefilled once per method (``prefill_context``), saved with ``save_context``, loaded back with
``load_context``, then asked one question greedily, before and after the reload. Prints a table
and writes JSON.

    PYTHONPATH=. python3 bench/context_disk.py --tokens 8192 --dtype bfloat16 --methods full,kivi,kivi:2 \\
        --out bench/results/context_disk_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="auto", help="the model's dtype (bfloat16: the KV a GPU would keep)")
    p.add_argument("--methods", default="full,kivi,kivi:2", help="comma list; kivi:2 = kivi with bits=2")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default="bench/out/context_disk.json")
    args = p.parse_args(argv)
    from kvsift import LLM, SamplingParams
    from kvsift.eval.data import load_text
    from kvsift.server.contexts import dir_bytes, load_context, model_fingerprint, save_context

    llm = LLM(args.model, dtype=args.dtype)
    tok = llm.tokenizer
    doc = tok.encode(load_text(), add_special_tokens=False)
    while len(doc) < args.tokens:
        doc = doc + doc
    doc = doc[:args.tokens]
    question = tok.encode("\n\nQuestion: in one sentence, what is the text above about?\nAnswer:",
                          add_special_tokens=False)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    fp = model_fingerprint(llm)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvsift-ctx-") as tmp:
        for spec in args.methods.split(","):
            name, _, bits = spec.partition(":")
            kw = {"bits": int(bits)} if bits else None
            t0 = time.perf_counter()
            ctx = llm.prefill_context(doc, method=name, method_kwargs=kw, progress=False)
            prefill_s = time.perf_counter() - t0
            ans = llm.generate(question, params, context=ctx)[0].token_ids
            d = Path(tmp) / spec.replace(":", "_")
            save_context(ctx, d, {"fingerprint": fp, "kv_method": name, "kv_budget": None, "kv_options": kw or {}})
            on_disk = dir_bytes(d)
            back, _ = load_context(d, llm, fp)
            again = llm.generate(question, params, context=back)[0].token_ids
            rows.append({"method": spec, "tokens": len(doc), "disk_bytes": on_disk,
                         "bytes_per_token": round(on_disk / len(doc), 1), "prefill_s": round(prefill_s, 2),
                         "same_tokens_after_reload": ans == again, "answer": tok.decode(ans)})
            del ctx, back
    full = next((r["disk_bytes"] for r in rows if r["method"] == "full"), None)
    print(f"model {llm.info.name} ({str(llm.info.dtype).replace('torch.', '')}), a {args.tokens}-token context, "
          f"persisted and reloaded")
    print(f"{'method':<10} {'on disk MB':>10} {'per token':>10} {'vs full':>8} {'prefill s':>9} {'same answer':>11}")
    for r in rows:
        ratio = f"{r['disk_bytes'] / full:.3f}" if full else "-"
        r["vs_full"] = float(ratio) if full else None
        print(f"{r['method']:<10} {r['disk_bytes'] / 1e6:>10.1f} {r['bytes_per_token']:>10} {ratio:>8} "
              f"{r['prefill_s']:>9} {str(r['same_tokens_after_reload']):>11}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0 if all(r["same_tokens_after_reload"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
