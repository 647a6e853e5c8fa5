#!/usr/bin/env bash
# Issue #12's GPU measurements on one H200 with the default real model, in one call (about 9.5
# minutes; COMPRESS=context for the query-agnostic setting, LENGTHS=4096,16384, ACC_FILE= to resume): the accuracy grid of the head-wise and score-based methods, the memory table kvsift vs
# kvpress, and kvpress's versions of the same methods on the same prompts.
# Needs the model pieces under /root/m (../shared/tools/stage_model.py qwen2.5-coder-0.5b, then one
# device call per piece) and carries .stage/whl (gguf) and .whl (pysbd, kvpress-min).
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
cd /root/m && cat qwen2.5-coder-0.5b.part0* > qwen2.5-coder-0.5b.gguf && \
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  qwen2.5-coder-0.5b.gguf" | sha256sum -c - || exit 1
cd - >/dev/null
pip install -q --no-index --no-deps --target /tmp/site .stage/whl/*.whl .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
M=/root/m/qwen2.5-coder-0.5b.gguf
ACC_MIN=${ACC_MIN:-5.0}
python3 -m kvsift.cli bench run --model $M --tasks niah,mk_niah,vt,qa \
  --methods full,snapkv,adakv,duo,h2o,tova,expected_attention,kvzip --budgets 0.1,0.25,0.5 \
  --lengths ${LENGTHS:-8192} --samples 20 --max-minutes $ACC_MIN --no-progress --compress ${COMPRESS:-prompt} --out ${ACC_FILE:=$OUT/acc_headwise.jsonl} \
  2>&1 | grep -v "^\[bench\] [0-9]" | grep -v "GGUF tensors" | tail -5   # resumable: ACC_FILE=an earlier run's rows
[ "$ACC_FILE" = "$OUT/acc_headwise.jsonl" ] || cp "$ACC_FILE" $OUT/acc_headwise.jsonl
timeout ${MEM_S:-170} python3 bench/headwise_memory.py --model $M --lengths 8192 --budgets 0.25 \
  --methods ${MEM_METHODS-full,snapkv,adakv,duo,h2o,tova,expected_attention,kvzip} \
  --presses full,snapkv,adakv,duo,h2o,tova,expected_attention,kvzip --kvpress --wheels .whl/kvpress-min \
  --out $OUT/headwise_memory_h200.json 2>&1 | tail -25
timeout ${KVP_S:-100} python3 bench/vs_kvpress.py --model $M --wheels .whl/kvpress-min --tasks niah,mk_niah --lengths 8192 \
  --budgets 0.25 --samples 20 --presses full,snapkv,adakv,tova,expected_attention,kvzip --out $OUT/kvpress_headwise.jsonl \
  --compress ${COMPRESS:-prompt} \
  --max-minutes 1.3 2>&1 | tail -4
ls -la $OUT
