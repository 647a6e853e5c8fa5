#!/usr/bin/env bash
# One device call on an H200 (no model needed): the CUDA/Triton tests, then the kernel benches of
# #11 (Quest/TokenSelect selected step and end to end at 128k), #13 (KIVI decode attention) and
# #14 (MInference sparse prefill). Each step has its own time limit so one slow step cannot cost
# the others; logs and JSON go to $OUT (the device returns at most 8 files: one tarball).
#
#   bash bench/gpu_checks.sh                 # STEPS=tests,kivi,decode,minference by default
#   STEPS=tests,kivi,kivi_e2e TESTS_K="shadowkv and cuda" bash bench/gpu_checks.sh
#   STEPS=batch_fit bash bench/gpu_checks.sh  # #13: the largest decode batch at 128k, full vs kivi (carry .whl)
#   STEPS=serve SERVE_METHODS="full sentencekv" bash bench/gpu_checks.sh   # #16 load figures (carry .stage/tok, .whl)
#   STEPS=serve SERVE_PROMPT=4096 SERVE_NEW=256 bash bench/gpu_checks.sh   # #16: a decode-heavy load (defaults 32768, 64)
#   STEPS=serve SERVE_METHODS=sentencekv SERVE_KV_OPTIONS='{"warm_cache": true}' bash bench/gpu_checks.sh   # kv_options per request
#   STEPS=profile_decode bash bench/gpu_checks.sh   # #13: kernel time per decode step, per method
#   STEPS=profile_decode PROF_CTX=4096 PROF_BATCH=26 PROF_DEC_METHODS="full,sentencekv:205" bash bench/gpu_checks.sh
#                                            # #15: a suite cell's shape (steady steps: kernels as full's; wall, first step, prefill apart)
#   STEPS=long bash bench/gpu_checks.sh      # #14: a 1M-token prompt (sentencekv+kivi, prefill_offload)
#   STEPS=profile_prefill bash bench/gpu_checks.sh   # #14: where the prefill goes at 128k (PROF_ARGS=" ": torch.profiler)
#   STEPS=prefill_attention bash bench/gpu_checks.sh # #14: dense chunk attention, flash vs cuDNN (KVSIFT_PREFILL_CUDNN=0: flash in the engine)
#   STEPS=prefill_tail bash bench/gpu_checks.sh      # #14: torch.profiler over the last chunk at 128k (offload inside)
#   STEPS=join bash bench/gpu_checks.sh      # #16: a join's first gap over KV arenas vs without (random 8B shape)
#   STEPS=serve_sweep SWEEP_CLIENTS="1 8 32 64" bash bench/gpu_checks.sh   # #16: FIFO vs continuous by clients (carry .stage/tok, .whl)
#   STEPS=join_step bash bench/gpu_checks.sh # #16: a narrow joining forward, host vs device time (torch.profiler)
#   STEPS=decode DECODE_PAGE=32 DECODE_E2E=0 DECODE_REFINE= DECODE_TAG=_page32 bash bench/gpu_checks.sh   # #11: kernel rows, pages of 32
#   STEPS=minference MINF_LENGTHS=131072 MINF_ARGS="--no-e2e --coverage 0.95" MINF_TAG=_cov95 bash bench/gpu_checks.sh  # #14
# The tests step runs six pytest processes at once (T_TESTS seconds each, default 420).
set -u
DEST=${OUT:-bench/out}; R=${RES:-/root/checks}; mkdir -p "$R" "$DEST"
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
STEPS=${STEPS:-tests,kivi,decode,minference}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step() { case ",$STEPS," in *",$1,"*) return 0;; esac; return 1; }
t0=$(date +%s)
if step tests; then
  # the CUDA tests in parallel groups (one process each: the KIVI kernel tests compile many
  # variants, serially they outlast a call); TESTS_K runs one group with that -k instead
  if [ -n "${TESTS_K:-}" ]; then
    GROUPS_=("tests::${TESTS_K}")
  else
    GROUPS_=("tests/test_kivi.py::cuda_kernel_matches and 64 and (all or slots)"
             "tests/test_kivi.py::cuda_kernel_matches and 64 and (count or window)"
             "tests/test_kivi.py::cuda_kernel_matches and 128 and (all or slots)"
             "tests/test_kivi.py::cuda_kernel_matches and 128 and (count or window)"
             "tests/test_decode_modes.py tests/test_kivi.py::(cuda or triton or gpu) and not cuda_kernel_matches"
             "tests --ignore=tests/test_kivi.py --ignore=tests/test_decode_modes.py::cuda or triton or gpu or uva")
  fi
  i=0
  for g in "${GROUPS_[@]}"; do
    i=$((i+1)); files=${g%%::*}; k=${g#*::}
    timeout ${T_TESTS:-420} python3 -m pytest -q -p no:cacheprovider -k "$k" $files --continue-on-collection-errors \
      -rfE --tb=short >"$R/tests$i.log" 2>&1 &
  done
  wait
  for f in "$R"/tests*.log; do echo "tests $(basename $f): $(tail -1 "$f")"; grep -E "^(FAILED|ERROR)" "$f" | head -10; done
  echo "tests $(( $(date +%s) - t0 )) s"
fi
if step kivi; then
  timeout ${T_KIVI:-90} python3 bench/gpu_kivi.py ${KIVI_ARGS:---contexts 32768,131072 --batches 1,8} --out "$R/gpu_kivi_h200.json" >"$R/kivi.log" 2>&1
  echo "kivi rc=$? $(( $(date +%s) - t0 )) s"; tail -25 "$R/kivi.log"
fi
if step batch_fit; then   # #13: the largest decode batch at 128k per method (one prefill each, rows copied)
  timeout ${T_BATCH_FIT:-420} python3 bench/batch_fit.py ${BATCH_FIT_ARGS:---ctx 131072 --methods full,kivi,sentencekv+kivi:2048} \
    --out "$R/batch_fit_h200.json" >"$R/batch_fit.log" 2>&1
  echo "batch_fit rc=$? $(( $(date +%s) - t0 )) s"; tail -8 "$R/batch_fit.log"
fi
if step kivi_e2e; then   # #13: dense kivi vs full, sentencekv+kivi vs sentencekv, end to end at 128k
  timeout ${T_KIVI_E2E:-200} python3 bench/gpu_decode.py --skip-kernels --e2e --e2e-no-hf --e2e-contexts 131072 \
    --e2e-batches 1 --e2e-methods ${KIVI_E2E_METHODS:-full,kivi,sentencekv:2048,sentencekv+kivi:2048} --e2e-new-tokens 32 \
    --out "$R/gpu_kivi_e2e_h200.json" >"$R/kivi_e2e.log" 2>&1
  echo "kivi_e2e rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^e2e warm" "$R/kivi_e2e.log" | tail -12
fi
if step profile_decode; then   # #13: where a decode step's time goes (static mode: each kernel shows)
  timeout ${T_PROF_DEC:-200} python3 bench/profile_decode.py --ctx ${PROF_CTX:-131072} --batch ${PROF_BATCH:-1} \
    --methods "${PROF_DEC_METHODS:-full,kivi,sentencekv:2048,sentencekv+kivi:2048}" \
    --out "$R/profile_decode_h200.json" >"$R/profile_decode.log" 2>&1
  echo "profile_decode rc=$? $(( $(date +%s) - t0 )) s"; grep -v "USDT\|profiler_st" "$R/profile_decode.log" | tail -75
fi
if step long; then   # #14: prefill at 128k (full, sentencekv, offloaded as it is prefilled), then a 1M-token prompt
  OFF=prefill_offload=true:prefill_budget=${LONG_PREFILL_BUDGET:-4096}
  timeout ${T_LONG128:-200} python3 bench/gpu_decode.py --skip-kernels --e2e --e2e-no-hf --e2e-contexts 131072 \
    --e2e-batches 1 --e2e-new-tokens 64 --e2e-chunk ${LONG_CHUNK:-4096} \
    --e2e-methods "${LONG128_METHODS:-full,sentencekv:2048,sentencekv:2048:$OFF,sentencekv+kivi:2048:$OFF}" \
    --out "$R/gpu_prefill_offload_128k_h200.json" >"$R/long128.log" 2>&1
  echo "long128 rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^e2e warm" "$R/long128.log" | tail -8
  # 1M tokens: bf16 host chunks would need 128 GiB (the machine has 125): int4 through kivi
  timeout ${T_LONG:-360} python3 bench/gpu_decode.py --skip-kernels --e2e --e2e-no-hf \
    --e2e-contexts ${LONG_CONTEXTS:-1048576} --e2e-batches 1 --e2e-new-tokens 64 --e2e-chunk ${LONG_CHUNK:-4096} \
    --e2e-methods "${LONG_METHODS:-sentencekv+kivi:2048:$OFF}" \
    --out "$R/gpu_long_prompt_h200.json" >"$R/long.log" 2>&1
  echo "long rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^e2e warm" "$R/long.log" | tail -8
fi
if step prefill_attention; then   # #14: one layer's dense chunk attention per backend (flash, cuDNN split, the engine's)
  timeout ${T_PREFILL_ATTN:-200} python3 bench/prefill_attention.py --out "$R/prefill_attention_h200.json" \
    >"$R/prefill_attention.log" 2>&1
  echo "prefill_attention rc=$? $(( $(date +%s) - t0 )) s"; grep -v Warn "$R/prefill_attention.log" | tail -80
fi
if step profile_prefill; then   # #14: where sentencekv's prefill and prefill_offload's chunks spend their time
  # timed runs (no torch.profiler: its post-processing outlasted a call) twice per method, the second
  # over the host pool's blocks, after timing the locking of host memory; PROF_ARGS=" " profiles
  timeout ${T_PROF:-240} python3 bench/profile_prefill.py --ctx ${PROF_CTX:-131072} --chunk ${PROF_CHUNK:-4096} \
    --methods "${PROF_METHODS:-full,sentencekv:2048,sentencekv:2048:prefill_offload=true:prefill_budget=4096}" \
    ${PROF_ARGS:---no-profile --repeat 2 --alloc} --out "$R/profile_prefill" >"$R/profile_prefill.log" 2>&1
  echo "profile_prefill rc=$? $(( $(date +%s) - t0 )) s"; grep -v "USDT" "$R/profile_prefill.log" | tail -60
fi
if step prefill_tail; then   # #14: the last prefill chunk at 128k profiled alone (sentencekv's final offload is in
  # it), run 2 reusing the host pool; @general: the general final offload (A/B of the dense one); splitter=fixed
  # takes the sentence splitter (a worker thread) out of the run
  timeout ${T_TAIL:-420} python3 bench/profile_prefill.py --ctx ${PROF_CTX:-131072} --chunk ${PROF_CHUNK:-4096} \
    --methods "${TAIL_METHODS:-full,sentencekv:2048,sentencekv:2048@general,sentencekv:2048:splitter=fixed}" --repeat 2 --profile-last-chunk \
    --top 30 --out "$R/profile_prefill_tail" >"$R/prefill_tail.log" 2>&1
  echo "prefill_tail rc=$? $(( $(date +%s) - t0 )) s"; grep -v "USDT" "$R/prefill_tail.log" | tail -80
fi
if step join; then   # #16: the first gap after a join, with and without the KV arenas (5 running + 1: bucket 8 kept, in place)
  timeout ${T_JOIN:-200} python3 bench/join_latency.py --random-8b ${JOIN_LAYERS:-16} --decode-mode graph --arena 0,1 \
    --running ${JOIN_RUNNING:-5} --running-prompt ${JOIN_PROMPT:-8192} --join-prompt ${JOIN_PROMPT:-8192} --max-tokens 32 \
    --chunk-size 4096 --join-chunks 1 --out "$R/join_latency_arena_h200.json" >"$R/join.log" 2>&1
  echo "join rc=$? $(( $(date +%s) - t0 )) s"; grep -v "Warning" "$R/join.log" | tail -8
fi
if step decode; then
  # DECODE_E2E=0: the kernel rows only; DECODE_PAGE: Quest's page size in them (the e2e methods name theirs)
  E2E=(--e2e --e2e-contexts 131072 --e2e-batches 1 --e2e-new-tokens 32 --e2e-methods
       ${DECODE_E2E_METHODS:-full,full@kvref,quest:2048,quest:2048:bounds=int8:page=32,quest:2048:refine=8:refine_rank=votes,tokenselect:2048})
  [ "${DECODE_E2E:-1}" = 0 ] && E2E=()
  timeout ${T_DECODE:-340} python3 bench/gpu_decode.py --contexts 131072 --budgets 2048 --batches 1,8 --reps 30 \
    --refine "${DECODE_REFINE-8}" --page ${DECODE_PAGE:-16} ${DECODE_ARGS:-} "${E2E[@]}" \
    --out "$R/gpu_decode${DECODE_TAG:-}_h200.json" >"$R/decode${DECODE_TAG:-}.log" 2>&1
  echo "decode rc=$? $(( $(date +%s) - t0 )) s"; tail -40 "$R/decode${DECODE_TAG:-}.log"
fi
if step minference; then
  # MINF_ARGS: more options, e.g. "--no-e2e --coverage 0.95" (layer rows with a cumulative-attention index)
  timeout ${T_MINF:-150} python3 bench/minference_prefill.py --lengths ${MINF_LENGTHS:-32768,131072} ${MINF_ARGS:-} \
    --out "$R/minference_prefill${MINF_TAG:-}_h200.json" >"$R/minference.log" 2>&1
  echo "minference rc=$? $(( $(date +%s) - t0 )) s"; tail -30 "$R/minference.log"
fi
if step serve; then   # #16: the server under 32 clients of 32k tokens, FIFO vs continuous. Needs .stage/tok, the
  # default model's tokenizer as an HF directory (here: python3 -c "from transformers import AutoTokenizer;
  # from kvsift.models.loader import _convert_gguf, default_model_path as d;
  # AutoTokenizer.from_pretrained(_convert_gguf(d('qwen2.5-coder-0.5b'))).save_pretrained('.stage/tok')"),
  # and .whl with fastapi, uvicorn, starlette, pydantic(-core), annotated-types, typing-inspection and
  # opentelemetry-api (the image lacks the server's packages; not typing_extensions: a carried one
  # shadows the image's and breaks anyio)
  for m in ${SERVE_METHODS:-full sentencekv}; do
    timeout ${T_SERVE:-280} python3 bench/serve_load.py --random-8b ${SERVE_LAYERS:-16} --tokenizer ${TOKENIZER:-.stage/tok} \
      --device cuda --clients ${SERVE_CLIENTS:-32} --requests 1 --prompt-tokens ${SERVE_PROMPT:-32768} --max-tokens ${SERVE_NEW:-64} \
      --max-batch ${SERVE_MB:-32,1} --kv-method $m --kv-budget 2048 --chunk-size 4096 --timeout 270 \
      ${SERVE_ARGS:-} ${SERVE_KV_OPTIONS:+--kv-options "$SERVE_KV_OPTIONS"} --json "$R/serve_load_${m}_h200.json" >"$R/serve_$m.log" 2>&1
    echo "serve $m rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^  File \"\|^    [^0-9 ]" "$R/serve_$m.log" | tail -8
  done
fi
if step serve_sweep; then   # #16: the issue's 1-64 clients table: FIFO (--max-batch 1) and continuous, per method and
  # client count (SWEEP_CLIENTS, default "1 8 32 64"; SWEEP_METHODS, default "full sentencekv"), 32k prompts,
  # 64 tokens, with the step trace; each run T_SWEEP seconds at most (default 240). Same carried files as serve.
  for m in ${SWEEP_METHODS:-full sentencekv}; do
    for c in ${SWEEP_CLIENTS:-1 8 32 64}; do
      timeout ${T_SWEEP:-240} python3 bench/serve_load.py --random-8b ${SERVE_LAYERS:-16} --tokenizer ${TOKENIZER:-.stage/tok} \
        --device cuda --clients $c --requests 1 --prompt-tokens 32768 --max-tokens 64 --max-batch ${SWEEP_MB:-1,32} \
        --kv-method $m --kv-budget 2048 --chunk-size 4096 --join-chunk-size 512 --timeout $(( ${T_SWEEP:-240} - 10 )) \
        --step-trace ${SERVE_ARGS:-} ${SERVE_KV_OPTIONS:+--kv-options "$SERVE_KV_OPTIONS"} \
        --json "$R/serve_sweep_${m}_${c}_h200.json" >"$R/sweep_${m}_${c}.log" 2>&1
      echo "sweep $m $c clients rc=$? $(( $(date +%s) - t0 )) s"; grep -v "^  File \"\|^    [^0-9 ]" "$R/sweep_${m}_${c}.log" | tail -4
    done
  done
fi
if step join_step; then   # #16: what a narrow joining prefill forward costs (host time against device time)
  for m in ${JOIN_STEP_METHODS:-full sentencekv}; do
    timeout ${T_JOIN_STEP:-200} python3 bench/join_step_profile.py --random-8b ${SERVE_LAYERS:-16} --method $m \
      $([ "$m" = full ] || echo "--budget 2048") --rows ${JOIN_STEP_ROWS:-1,7,31} --prompt ${JOIN_STEP_PROMPT:-4096} \
      --width ${JOIN_STEP_WIDTH:-512} --profile --out "$R/join_step_${m}_h200.json" >"$R/join_step_$m.log" 2>&1
    echo "join_step $m rc=$? $(( $(date +%s) - t0 )) s"; tail -30 "$R/join_step_$m.log"
  done
fi
tar czf "$DEST/checks.tgz" -C "$R" .
