#!/usr/bin/env bash
# Download the wheels that bench/vs_kvpress.py's kvpress venv needs beyond torch, for a GPU machine
# without network:
#
#     bench/download_kvpress_wheels.sh .whl/kvpress            # here, with network
#     python bench/vs_kvpress.py --wheels .whl/kvpress ...      # there, offline (pip --no-index)
#
# The venv is made with --system-site-packages (it reuses the machine's torch and whatever else is
# installed) and pins kvpress==0.5.5 with transformers==5.2.0 (kvpress needs transformers<5.3). The
# list is what `pip install kvpress==0.5.5 transformers==5.2.0` adds to a torch + transformers 5.x
# image: kvpress's Requires-Dist (accelerate, cachetools, datasets, fire, numpy, pandas, peft,
# requests, torch, transformers) less what such an image has, the versions transformers 5.2.0
# accepts of huggingface-hub (<2) and tokenizers (<=0.23.0), and what `import kvpress` pulls in
# (datasets -> pyarrow, dill, multiprocess, xxhash, pandas -> pytz, tzdata; fire -> termcolor).
# A pure-Python package the image may lack is cheap to add here; pip says which when it fails.
#
# PYVER / PLATFORM select the target interpreter (default: CPython 3.12, manylinux_2_28 x86-64).
set -euo pipefail
DIR=${1:-.whl/kvpress}
PYVER=${PYVER:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DIR"

WHEELS=(
  kvpress==0.5.5
  transformers==5.2.0
  huggingface-hub==1.33.0   # transformers 5.2.0: huggingface-hub>=1.3.0,<2.0
  tokenizers==0.22.2        # transformers 5.2.0: tokenizers>=0.22.0,<=0.23.0
  typer-slim==0.24.0        # transformers 5.2.0
  cachetools==5.5.2         # kvpress: cachetools>=5.5.2,<6
  datasets==5.2.0           # kvpress (imported by `import kvpress`)
  pyarrow==26.0.1           # datasets
  dill==0.4.1               # datasets
  multiprocess==0.70.19     # datasets
  xxhash==4.1.0             # datasets
  pandas==2.3.3             # kvpress: pandas>=2.2.2,<3; datasets
  pytz==2026.6              # pandas
  tzdata==2026.6            # pandas
  peft==0.21.2              # kvpress: peft>=0.20.0
  termcolor==3.3.0          # fire
)
# the versions a torch + transformers image usually has already; kept here in case it does not
COMMON=(
  accelerate==1.15.0        # kvpress: accelerate>=1.0.0,<2; peft
  psutil==7.2.2             # accelerate, peft
  requests==2.34.2          # kvpress: requests>=2.32.3,<3
  python-dateutil==2.9.0.post0  # pandas
  six==1.17.0               # python-dateutil
  setuptools==84.2.1        # torch: setuptools>=77.0.3 (a Python 3.11 venv seeds its own older copy)
)

# older manylinux tags run on a manylinux_2_28 system too; pip does not always infer them
$PIP download --only-binary=:all: --python-version "$PYVER" --platform "$PLATFORM" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps -d "$DIR" \
  "${WHEELS[@]}" "${COMMON[@]}"
# fire 0.6.0 (kvpress: fire>=0.6.0,<0.7) is published as a source archive only: build its
# pure-Python wheel here (py3-none-any, fine for any target)
$PIP wheel --no-deps -w "$DIR" fire==0.6.0

echo "wheels in $DIR:"
ls -1 "$DIR"
du -sh "$DIR"
