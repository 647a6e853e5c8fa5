#!/usr/bin/env python3
"""Engine correctness on a real model: kvsift ``full`` against HF ``generate``, and the decode modes
against each other, greedy, token for token (issue #15 item 5).

    python bench/real_equality.py --model /root/m/qwen2.5-coder-1.5b.gguf --length 8192 --new-tokens 256
    python bench/real_equality.py --model smollm2 --length 512 --new-tokens 16 --device cpu   # a quick check

One prompt of ``--length`` tokens (a NIAH haystack of the eval's filler text with a request for a
long answer, in the model's chat template). HF ``model.generate`` (its SDPA attention, dynamic
cache, greedy, ``min_new_tokens`` = ``max_new_tokens`` so EOS cannot end it early) is the
reference; kvsift ``full`` runs in every decode mode the device allows (``eager``, ``static``,
``graph`` on CUDA) with ``min_tokens`` = ``max_tokens`` (EOS masked, as ``min_new_tokens`` does).
For each pair it reports the number of equal leading
tokens and, at the first difference, the reference's logit margin there (top-1 minus top-2 of
the reference's logits at that step, recomputed by one teacher-forced forward pass): a margin
within bf16 rounding (about 0.1 of a logit) is a near-tie that a different but correct
summation order may flip, a large one is a bug. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="named model, HF directory or .gguf (default: the default model)")
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--modes", default="auto", help="comma list of eager, static, graph (auto: what the device allows)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/real_equality_<model>.json)")
    args = ap.parse_args(argv)
    if args.length < 64 or args.new_tokens < 1:
        ap.error("--length must be >= 64 and --new-tokens >= 1")
    return args


def build_prompt(llm, length: int) -> list[int]:
    """A ``length``-token chat prompt: a haystack with one needle and a request for a long answer."""
    from kvsift.eval.tasks import TaskBuilder, TaskConfig

    sample = TaskBuilder(llm.tokenizer, TaskConfig(depths=(0.5,), samples=1)).build("niah", length, 0)[0]
    request = ("Retell the document above in your own words, in detail and at length, then state the "
               "special magic number it mentions.")
    return llm.encode(sample.context + "\n\n" + request)


def margins(model, ids: list[int], new: list[int], eos_ids=()) -> tuple[list[float], list[int]]:
    """The reference's top-1 minus top-2 logit at each generated step among the tokens both sides
    may choose (``eos_ids`` masked, as ``min_new_tokens``/``min_tokens`` mask them), and its raw
    top-1 token there, EOS included (one teacher-forced pass)."""
    x = torch.tensor([ids + new[:-1]], device=model.device)
    with torch.inference_mode():
        logits = model(x, logits_to_keep=len(new)).logits[0].float()     # (new, vocab)
    logits = logits.clone()   # out of inference mode, so the EOS columns can be masked
    raw_top = logits.argmax(dim=-1).tolist()
    logits[:, list(eos_ids)] = float("-inf")
    top = logits.topk(2, dim=-1)
    return (top.values[:, 0] - top.values[:, 1]).tolist(), raw_top


def first_diff(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kvsift import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, decode_mode="eager")
    cuda = llm.device.type == "cuda"
    modes = (["eager", "static"] + (["graph"] if cuda else [])) if args.modes == "auto" else args.modes.split(",")
    ids = build_prompt(llm, args.length)
    n = args.new_tokens
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t = time.perf_counter()
    with torch.inference_mode():
        # HF masks, under min_new_tokens, only the EOS ids of the model's generation config (for
        # Qwen2.5-Coder-1.5B-Instruct that is <|im_end|> alone, so it emitted <|endoftext|> at step
        # 54 on the 2026-12-01 run, where kvsift, masking both, went on): give it kvsift's EOS set
        eos = list(llm.eos_ids)
        ref = llm.model.generate(torch.tensor([ids], device=llm.device), max_new_tokens=n, min_new_tokens=n,
                                 eos_token_id=eos, pad_token_id=eos[0], do_sample=False)[0, len(ids):].tolist()
    sync()
    ref_s = time.perf_counter() - t
    marg, raw_top = margins(llm.model, ids, ref, llm.eos_ids)
    rows = [dict(system="hf_generate", tokens=len(ref), equal_to_hf=len(ref), seconds=round(ref_s, 2))]
    outs = {}
    for mode in modes:
        llm.decode_mode = mode
        t = time.perf_counter()
        # the same semantics as HF's min_new_tokens: end-of-sequence is never sampled (not sampled
        # and then ignored, which ignore_eos alone would do)
        out = llm.generate(ids, SamplingParams(max_tokens=n, min_tokens=n), method="full")[0].token_ids
        sync()
        outs[mode] = out
        d = first_diff(out, ref)
        rows.append(dict(system=f"kvsift full ({mode})", tokens=len(out), equal_to_hf=d,
                         seconds=round(time.perf_counter() - t, 2),
                         hf_margin_at_diff=None if d >= min(len(out), len(ref)) else round(marg[d], 4)))
        if d < min(len(out), len(ref)):  # what each side chose there, and the reference's raw top-1
            rows[-1].update(token_at_diff=out[d], hf_token_at_diff=ref[d], hf_raw_top1_at_diff=raw_top[d],
                            hf_raw_top1_is_eos=raw_top[d] in llm.eos_ids)
    pairs = {f"{a}=={b}": first_diff(outs[a], outs[b]) for i, a in enumerate(modes) for b in modes[i + 1:]}

    print(f"model {llm.info.name}, {len(ids)} prompt tokens, {n} new tokens, {llm.device}, {llm.model.dtype}")
    print(f"{'system':<24} {'tokens':>6} {'= HF':>6} {'s':>7}  HF margin at the first difference")
    for r in rows:
        m = r.get("hf_margin_at_diff")
        print(f"{r['system']:<24} {r['tokens']:>6} {r['equal_to_hf']:>6} {r['seconds']:>7}  {'' if m is None else m}")
    for k, v in pairs.items():
        print(f"modes {k}: {v} equal leading tokens of {n}")
    result = dict(model=llm.info.name, device=str(llm.device), dtype=str(llm.model.dtype), prompt_tokens=len(ids),
                  new_tokens=n, rows=rows, eos_ids=list(llm.eos_ids), hf_tokens=ref,
                  kvsift_tokens={m: o for m, o in outs.items()}, mode_pairs=pairs, min_hf_margin=round(min(marg), 4),
                  all_equal=all(r["equal_to_hf"] == n for r in rows) and all(v == n for v in pairs.values()))
    out = args.out or ROOT / "bench" / "results" / f"real_equality_{llm.info.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
