#!/usr/bin/env bash
# Prefix sharing on a real model (kvsift/engine/prefix.py): the same suite cells run twice on the GPU,
# row by row without a store and with --share-prefix-gib, then every sample's answer is compared and
# the wall times set side by side. Also (REAL_EQ=1) bench/real_equality.py, issue #15 item 5.
#
#   NAME=qwen2.5-coder-1.5b TASKS=niah,vt LENGTH=16384 METHODS=snapkv,quest,sentencekv BUDGET=0.05 \
#     bash bench/share_prefix_check.sh
#
# Needs the model's pieces under /root/m (see bench/suite_h200.sh) and carries .stage/whl and .whl.
set -u
DEST=${OUT:-bench/out}; mkdir -p "$DEST"
source bench/_model_setup.sh   # wheels, PYTHONPATH, the model joined and checked at $M
if [ "${REAL_EQ:-1}" = 1 ]; then
  python3 bench/real_equality.py --model $M --length 8192 --new-tokens 256 --out "$DEST/real_equality.json" 2>&1 | tail -8
fi
TASKS=${TASKS:-niah,vt}; LENGTH=${LENGTH:-16384}; METHODS=${METHODS:-snapkv,quest,sentencekv}; BUDGET=${BUDGET:-0.05}
COMMON=(bench run --suite standard --model $M --tasks $TASKS --lengths $LENGTH --budgets $BUDGET
        --batch-size ${BATCH:-10} --no-progress)
t0=$(date +%s)
python3 -m kvsift.cli "${COMMON[@]}" --methods $METHODS --prefill-mode rows --out "$DEST/plain.jsonl" 2> "$DEST/plain.log"
t1=$(date +%s)
# full first: its cells store the prefixes the others start from
python3 -m kvsift.cli "${COMMON[@]}" --methods full,$METHODS --share-prefix-gib ${GIB:-20} --out "$DEST/shared.jsonl" \
  2> "$DEST/shared.log"
t2=$(date +%s)
grep "^\[bench\] [0-9]" "$DEST/plain.log" "$DEST/shared.log"
echo "plain $((t1 - t0)) s, shared (full included) $((t2 - t1)) s"
python3 - "$DEST" <<'EOF'
import json, pathlib, sys
from kvsift.eval.runner import load_rows
d = pathlib.Path(sys.argv[1])
a = {r["key"]: r for r in load_rows(d / "plain.jsonl")}
b = {r["key"]: r for r in load_rows(d / "shared.jsonl")}
out = []
for k in sorted(a):
    pa = [e["prediction"] for e in a[k]["samples"]]
    pb = [e["prediction"] for e in b[k]["samples"]]
    same = sum(x == y for x, y in zip(pa, pb))
    out.append({"key": k, "samples": len(pa), "same_answers": same, "score_plain": a[k]["score"],
                "score_shared": b[k]["score"], "wall_plain_s": round(a[k]["wall_s"], 1),
                "wall_shared_s": round(b[k]["wall_s"], 1)})
    print(f"{k}: {same}/{len(pa)} same answers, score {a[k]['score']:.3f} / {b[k]['score']:.3f}, "
          f"wall {a[k]['wall_s']:.1f} / {b[k]['wall_s']:.1f} s")
full = [r for r in b.values() if r["method"] == "full"]
print("shared run's full cells (they store the prefixes):", [(r["key"], round(r["wall_s"], 1)) for r in full])
(d / "share_prefix_check.json").write_text(json.dumps({"cells": out, "full_cells": [
    {"key": r["key"], "wall_s": r["wall_s"]} for r in full]}, indent=1))
EOF
