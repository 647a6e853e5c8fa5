#!/usr/bin/env bash
# Issue #15's standard suite on one H200, in parts, as several processes sharing the GPU (one group
# of methods each: a 1.5B model leaves the GPU idle between a process's launches, so groups running
# at once cut the wall time), every process resuming from the rows already measured.
#
#   NAME=qwen2.5-coder-1.5b LENGTHS=16384 BUDGETS=0.05 TASKS=niah,mk_niah,vt,qa bash bench/suite_h200.sh
#
# Rows so far: bench/results/standard_${NAME}_h200.jsonl.gz (committed gzip-compressed, a twelfth of
# the JSONL: the whole suite's rows must travel with every device call's tree; ROWS= names another
# file, plain or .gz). It is copied into every process's own output file, so a process skips every
# cell already measured (by any process of any earlier call); at the end all rows are merged (last
# row of a key wins) into $OUT/standard.jsonl.gz (kvpress's, with KVP_GROUPS, into
# kvpress.jsonl.gz), returned in a tarball with the logs: copy them over the committed files. The
# merged rows are also kept on the machine (see KEEP below), so parts can run back to back: start
# the next call as soon as one returns, and copy the last one's rows into the tree at the end.
# Narrowing (LENGTHS, BUDGETS, TASKS, METHOD_GROUPS or PROCESSES) only picks which cells of the suite run first; the
# rows are the suite's own cells (30 samples, its depths, its ppl tokens), so later calls with other
# narrowings fill in the rest of the same grid.
# METHODS: only these method labels (balanced into PROCESSES groups); METHOD_GROUPS: the groups as given.
# GROUP_BY (default task with sharing, else method): what bench/suite_groups.py balances over the
# processes; by task, each process runs every method over its tasks, so each prompt set is prefilled
# (and its prefixes stored) by one process only.
# KVP_LENGTHS, KVP_BUDGETS, KVP_TASKS: kvpress's own narrowing (default: kvsift's; set empty: none).
# EXTRA: more `kvsift bench run` options for every kvsift process (e.g. a smoke run: --samples 1).
# SHARE_GIB (default 25): each process's prefix store (--share-prefix-gib; 0: off): a 30k prompt set of
# the 1.5B is 24 GiB, so the defaults run 3 processes (PROCESSES) at --mem-fraction 0.15 (MEM) each.
# GROUP_BUDGETS (default 1): --group-budgets, each method's budgets over a prompt set as one continuous
# batch of up to MAX_BATCH (default 128) sequences; 0: one batch per cell.
# MPS (default 1): the processes share the GPU through an MPS control daemon this script starts (its
# own pipe and log folders under /tmp, seen only by the suite's processes) and stops at the end; without
# it the GPU time-slices between processes (bench/gpu_share.py: 1.2-1.4x more work done with it). 0: off.
# Run nothing else on the GPU beside it: CUDA tests started next to the daemon (their context outside
# it) left suite cells out of memory and with 'CUDA error: unknown error' (parts 45-46 in docs/eval.md).
# Needs the model's pieces under /root/m (../shared/tools/stage_model.py NAME, cut to pieces that fit
# beside the tree, one device call each) and carries .stage/whl (gguf) and .whl (pysbd).
set -u
T_START=$(date +%s)   # KILL_AFTER counts from here: joining and converting the GGUF (~75 s on a fresh machine) included
DEST=${OUT:-bench/out}; RES=${RES:-/root/suite}; rm -rf "$RES"; mkdir -p "$RES" "$DEST"   # nothing left from an earlier call
source bench/_model_setup.sh   # wheels, PYTHONPATH, the model joined and checked at $M
t0=$(date +%s)
# de-quantize once here, not in six processes at once
python3 -c "from pathlib import Path; from kvsift.models.loader import _convert_gguf; print(_convert_gguf(Path('$M')))" 2>&1 | tail -1
echo "convert $(( $(date +%s) - t0 )) s"
ROWS=${ROWS:-bench/results/standard_${NAME}_h200.jsonl.gz}
# The merged rows of every call are also kept on the machine (KEEP, default /root/m, which lives as
# long as the machine stays warm): a next call seeds from them too, so it may start right after this
# one returns, before its rows are copied into the tree (the 30 s idle window is short).
KEEP=${KEEP:-/root/m}
seed_rows() {   # $1 rows so far (plain or .gz, may be missing), $3 the machine's kept copy -> $2 a process's file
  python3 - "$2" "$1" "${3:-}" <<'EOF'
import json, sys
from pathlib import Path
from kvsift.eval.runner import load_rows
srcs = [p for p in sys.argv[2:] if p and Path(p).is_file()]   # the kept copy last: its rows win
Path(sys.argv[1]).write_text("".join(json.dumps(r) + "\n" for r in (load_rows(srcs) if srcs else [])))
EOF
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MPS_DIR=""
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  MPS_DIR=$(mktemp -d /tmp/kvsift_mps.XXXXXX); mkdir -p "$MPS_DIR/pipe" "$MPS_DIR/log"
  export CUDA_MPS_PIPE_DIRECTORY=$MPS_DIR/pipe CUDA_MPS_LOG_DIRECTORY=$MPS_DIR/log
  nvidia-cuda-mps-control -d && echo "MPS daemon started ($MPS_DIR)" || { echo "MPS did not start: time-slicing"; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; MPS_DIR=""; }
fi
stop_mps() { [ -n "$MPS_DIR" ] && { echo quit | timeout 20 nvidia-cuda-mps-control; sleep 1; rm -rf "$MPS_DIR"; MPS_DIR=""; echo "MPS daemon stopped"; }; return 0; }
GB=()
[ "${GROUP_BUDGETS:-1}" = 1 ] && GB=(--group-budgets --max-batch ${MAX_BATCH:-128})
MINUTES=${MINUTES:-8}
sel_args() {   # $1 lengths, $2 budgets, $3 tasks (each may be empty: all) -> the narrowing options, a line each
  [ -n "$1" ] && printf '%s\n' --lengths "$1"
  [ -n "$2" ] && printf '%s\n' --budgets "$2"
  [ -n "$3" ] && printf '%s\n' --tasks "$3"
  return 0
}
mapfile -t SEL < <(sel_args "${LENGTHS:-}" "${BUDGETS:-}" "${TASKS:-}")
# kvpress's processes narrow by KVP_LENGTHS, KVP_BUDGETS and KVP_TASKS where set (empty: all), else as
# kvsift's, so one call can run, say, kvsift's error cells anywhere beside kvpress's 2% cells at 16k-30k
mapfile -t KSEL < <(sel_args "${KVP_LENGTHS-${LENGTHS:-}}" "${KVP_BUDGETS-${BUDGETS:-}}" "${KVP_TASKS-${TASKS:-}}")
# groups of methods, one process each: METHOD_GROUPS, or balanced by bench/suite_groups.py from the
# rows' measured cell times (a group is "m1,m2" and/or "method@task" units joined by ";", run one
# after the other in its process)
# METHODS (comma-separated labels, e.g. full,quest,kivi[bits=2]) narrows the balanced groups to those
BY=${GROUP_BY:-$([ "${SHARE_GIB:-25}" != 0 ] && echo task || echo method)}
KEPT=$KEEP/kept_$(basename "$ROWS" .gz).gz   # this rows file's kept copy (per file: another ROWS, another copy)
seed_rows "$ROWS" "$RES/seed.jsonl" "$KEPT"   # every row measured so far
GROUPS_=${METHOD_GROUPS:-$(python3 bench/suite_groups.py --rows "$RES/seed.jsonl" --processes ${PROCESSES:-3} "${SEL[@]}" \
  ${METHODS:+--methods "$METHODS"} --by $BY --verbose)}
echo "groups: $GROUPS_"
# kvpress's venv and converted model first (a minute on a fresh machine): the kill budget below
# must count it, or its processes outlive the device call and nothing comes back
[ -n "${KVP_GROUPS:-}" ] && python3 bench/vs_kvpress.py --model $M --wheels .whl/kvpress-min --setup-only 2>&1 | tail -1
# a cell that starts just before --max-minutes can run minutes past it: every process is stopped
# KILL_AFTER seconds after this script started (its finished cells are already in its file); keep
# KILL_AFTER + ~40 s (stopping, merging, the tarball) under the device call's timeout
KILL=$(( ${KILL_AFTER:-540} - ( $(date +%s) - T_START ) ))
[ $KILL -lt 60 ] && { echo "KILL_AFTER leaves $KILL s for the cells after the setup"; KILL=60; }
STOP="timeout -s INT -k 20 $KILL"   # -k: a process that ignores the INT is killed 20 s later
run_group() {   # $1: the process's number, $2: its units ("methods[@task]" joined by ";")
  local i=$1 u m t el left
  local start=$(date +%s)
  IFS=';' read -ra units <<< "$2"
  for u in "${units[@]}"; do
    m=${u%%@*}; t=""; [[ "$u" == *@* ]] && t=${u#*@}
    el=$(( $(date +%s) - start ))
    [ $(( KILL - el )) -lt 60 ] && break
    left=$(python3 -c "print(round(max(0.5, $MINUTES - $el / 60), 2))")
    timeout -s INT $(( KILL - el )) python3 -m kvsift.cli bench run --suite standard --model $M --methods "$m" \
      "${SEL[@]}" ${t:+--tasks $t} --max-minutes $left --no-progress --mem-fraction ${MEM:-0.15} \
      --share-prefix-gib ${SHARE_GIB:-25} "${GB[@]}" ${EXTRA:-} \
      --out "$RES/g$i.jsonl" >> "$RES/g$i.log" 2>&1
  done
}
# stopped from outside (the device call's timeout): stop the processes, keep what they finished
trap 'trap - TERM INT; pkill -INT -f "kvsift.cli bench run"; pkill -INT -f vs_kvpress.py; sleep 3; echo "stopped: returning the rows so far"; finish; exit 124' TERM INT
# the GPU's load while the processes run (is it the bottleneck, or are they?)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 5 > "$RES/smi.log" 2>/dev/null &
SMI=$!
pids=()
i=0
for g in $GROUPS_; do
  i=$((i+1))
  cp "$RES/seed.jsonl" "$RES/g$i.jsonl"
  run_group $i "$g" &
  pids+=($!)
done
# kvpress beside kvsift on the same prompts (KVP_GROUPS: groups of presses; carry .whl/kvpress-min,
# made here by bench/download_kvpress_wheels.sh --minimal .whl/kvpress-min): its own rows file
KVP_ROWS=${KVP_ROWS:-bench/results/standard_kvpress_${NAME}_h200.jsonl.gz}
KVP_KEPT=$KEEP/kept_$(basename "$KVP_ROWS" .gz).gz
if [ -n "${KVP_GROUPS:-}" ]; then
  # no new cell once the kill is under a minute away (a 30k cell of kvpress takes ~40 s)
  KVP_MINUTES=$(python3 -c "print(round(max(0.5, min($MINUTES, ($KILL - 60) / 60)), 2))")
  i=0
  for g in $KVP_GROUPS; do
    i=$((i+1))
    seed_rows "$KVP_ROWS" "$RES/k$i.jsonl" "$KVP_KEPT"
    $STOP python3 bench/vs_kvpress.py --suite standard --model $M --wheels .whl/kvpress-min --presses "$g" \
      "${KSEL[@]}" --max-minutes $KVP_MINUTES --no-progress --mem-fraction ${MEM:-0.12} --out "$RES/k$i.jsonl" \
      > "$RES/k$i.log" 2>&1 &
    pids+=($!)
  done
fi
finish() {   # the logs' summary, every process's rows merged, the tarball for $OUT
kill $SMI 2>/dev/null
stop_mps
nvidia-smi --query-gpu=memory.used,memory.total --format=csv 2>/dev/null | tail -1
[ -s "$RES/smi.log" ] && awk -F'[ ,%]+' '{u+=$1; n++} END {if (n) printf "GPU utilization: mean %.0f%% over %d samples\n", u/n, n}' "$RES/smi.log"
for f in "$RES"/[gk]*.log; do echo "== $f"; grep "^\[bench\] [0-9]\|stopped\|Error\|error" "$f" | tail -30; done
python3 - "$RES" "$T_START" <<'EOF'
import datetime, gzip, json, pathlib, statistics, sys
from kvsift.eval.runner import load_rows
res, since = pathlib.Path(sys.argv[1]), datetime.datetime.fromtimestamp(int(sys.argv[2]), datetime.timezone.utc)
for prefix, name in (("g", "standard.jsonl.gz"), ("k", "kvpress.jsonl.gz")):
    files = sorted(res.glob(f"{prefix}[0-9]*.jsonl"))
    rows = load_rows(files) if files else []          # the last row of a key wins
    if rows:
        with gzip.open(res / name, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} cells in {res / name}")
    # this call's cells by prompt length: how many, their wall time, the steady decode step
    new = [r for r in rows if not r.get("error") and r.get("time")
           and datetime.datetime.fromisoformat(r["time"]) >= since]
    for n in sorted({r["length"] for r in new}):
        at = [r for r in new if r["length"] == n]
        med = lambda k: statistics.median(x for x in (r.get(k) for r in at) if x) if any(r.get(k) for r in at) else 0  # noqa: E731
        print(f"  {prefix} {n:>6} tokens: {len(at):>3} cells, wall median {med('wall_s'):.1f} s, "
              f"steady decode median {med('steady_ms_per_token'):.1f} ms/token, batch median {med('batch_size'):.0f}")
EOF
[ -f "$RES/standard.jsonl.gz" ] && cp "$RES/standard.jsonl.gz" "$KEPT"
[ -f "$RES/kvpress.jsonl.gz" ] && cp "$RES/kvpress.jsonl.gz" "$KVP_KEPT"
tar czf "$DEST/suite.tgz" -C "$RES" .
}
for p in "${pids[@]}"; do wait $p; done
trap - TERM INT
echo "suite $(( $(date +%s) - t0 )) s"
finish
