#!/usr/bin/env bash
# Issue #12's accuracy grid on one H200, kvsift and kvpress side by side on the same prompts, as
# several processes sharing the GPU (a 0.5B model leaves it mostly idle: each process is bound by
# its own kernel launches, so running groups of methods at once cuts the wall time ~3-4x).
#
#   LENGTHS=4096,8192 MINUTES=8.5 bash bench/headwise_grid_h200.sh      # one device call
#   LENGTHS=16384 MINUTES=8.5 bash bench/headwise_grid_h200.sh          # the next one
#
# Every process appends to its own resumable JSONL under $OUT (prompt mode: the whole prompt,
# question included, is compressed; COMPRESS=context for the query-agnostic setting); a rerun with
# the same files (RESUME=dir holding an earlier call's files) goes on where the cut left off.
# Then: kvsift bench report $OUT/*.jsonl --out report
# PREFILL=batch prefills a cell's batch at once instead of row by row (the eviction methods' default,
# which bounds GPU memory to one prompt's full KV): on the 2026-12-01 run the rows took 3.5x
# longer to prefill than `full` at 8k (0.54 vs 0.15 s per sample), while a 0.5B model's batch fits.
# Needs the model pieces under /root/m (../shared/tools/stage_model.py qwen2.5-coder-0.5b, then one
# device call per piece) and carries .stage/whl (gguf) and .whl (pysbd, kvpress-min). A call sends
# the tracked tree too (about 9 MiB now), so 60 MiB pieces no longer fit the 64 MiB limit: cut them
# to 50 MiB first (cat .stage/NAME.part* | split -b 50M -d -a 2 - .stage/s/NAME.part), 10 pieces.
set -u
DEST=${OUT:-bench/out}; OUT=${RES:-/root/res}; mkdir -p "$OUT" "$DEST"   # rows kept where they survive a cut call; a tarball to $DEST at the end
M=${MODEL:-/root/m/qwen2.5-coder-0.5b.gguf}
if [ ! -f $M ]; then
  (cd /root/m && cat qwen2.5-coder-0.5b.part[0-9][0-9] > qwen2.5-coder-0.5b.gguf && \
   echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  qwen2.5-coder-0.5b.gguf" | sha256sum -c -) || exit 1
fi
pip install -q --no-index --no-deps --target /tmp/site .stage/whl/*.whl .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
[ -n "${RESUME:-}" ] && cp -n "$RESUME"/*.jsonl "$OUT"/ 2>/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LENGTHS=${LENGTHS:-4096,8192}; MINUTES=${MINUTES:-8.5}; COMPRESS=${COMPRESS:-prompt}
TASKS=${TASKS:-niah,mk_niah,vt,qa}; BUDGETS=${BUDGETS:-0.1,0.25,0.5}; SAMPLES=${SAMPLES:-20}
# method groups, balanced by cost (kvzip re-reads the context; h2o and tova evict during decode)
KV_GROUPS=${KV_GROUPS:-"full,snapkv,adakv duo,tova h2o expected_attention kvzip"}
KVP_GROUPS=${KVP_GROUPS-"full,snapkv,adakv,duo tova,expected_attention kvzip h2o"}   # empty: no kvpress
[ -n "$KVP_GROUPS" ] && python3 bench/vs_kvpress.py --model $M --wheels .whl/kvpress-min --setup-only 2>&1 | tail -1
# a cell that starts just before --max-minutes can run minutes past it: KILL_AFTER seconds after the
# start every process is stopped (its finished cells are already in its JSONL), so the rows still
# come back within the device call's limit
STOP="timeout -s INT ${KILL_AFTER:-530}"
pids=()
i=0
# a group is methods[@lengths[@budgets[@samples[@tasks]]]] (comma lists; empty or missing: the
# defaults), so one process can take a single cell: h2o@@0.1@@qa
spec() { IFS=@ read -r g L B S T <<< "$1"; L=${L:-$LENGTHS}; B=${B:-$BUDGETS}; S=${S:-$SAMPLES}; T=${T:-$TASKS}; }
for gl in $KV_GROUPS; do
  i=$((i+1)); spec "$gl"
  $STOP python3 -m kvsift.cli bench run --model $M --tasks $T --methods $g --budgets $B \
    --lengths $L --samples $S --max-minutes $MINUTES --no-progress --compress $COMPRESS \
    --mem-fraction ${MEM:-0.05} --prefill-mode ${PREFILL:-auto} --out $OUT/kvsift_$COMPRESS.g$i.jsonl > $OUT/kvsift_$COMPRESS.g$i.log 2>&1 &
  pids+=($!)
done
i=0
for gl in $KVP_GROUPS; do
  i=$((i+1)); spec "$gl"
  $STOP python3 bench/vs_kvpress.py --model $M --wheels .whl/kvpress-min --tasks $T --presses $g \
    --budgets $B --lengths $L --samples $S --max-minutes $MINUTES --no-progress \
    --compress $COMPRESS --mem-fraction 0.05 --out $OUT/kvpress_$COMPRESS.g$i.jsonl > $OUT/kvpress_$COMPRESS.g$i.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
nvidia-smi --query-gpu=memory.used,memory.total --format=csv 2>/dev/null | tail -1
for f in $OUT/*.log; do echo "== $f"; grep -v "GGUF tensors\|^\[bench\] [0-9]" $f | tail -3; done
wc -l $OUT/*.jsonl
tar czf $DEST/${TAR:-grid}.tgz -C $OUT .   # the device returns at most 8 files: one tarball
