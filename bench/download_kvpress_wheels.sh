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
# --minimal (first argument) downloads only what the GPU image (torch 2.11, transformers 5.17,
# Python 3.12) lacks for *our* use of kvpress, ~15 MB instead of ~87 MB (pyarrow alone is 55 MB):
#
#     bench/download_kvpress_wheels.sh --minimal .whl/kvpress-min
#     python bench/vs_kvpress.py --wheels .whl/kvpress-min ...      # on the GPU machine
#
# kvpress itself is installed without its dependencies: of its Requires-Dist, `import kvpress`
# needs only cachetools, requests, fire (its ExpectedAttentionStats module) and `datasets.load_dataset`
# (DuoAttention's on-the-fly scoring, which we feed local texts instead); datasets, pandas, pyarrow,
# peft and accelerate are not needed by the presses we run. transformers 5.2.0 needs
# tokenizers<=0.23.0 (transformers 5.17 needs >=0.23.1, so the image's does not do) and
# huggingface-hub>=1.3,<2 (the image's, <2 for transformers 5.17, does; the wheel is here for
# machines with a hub >= 2). The directory gets kvpress-requirements.txt: bench/vs_kvpress.py then
# installs with `pip install --no-deps -r` it (pip skips what the machine already satisfies) and, when
# `datasets` is not importable, writes a stand-in module whose load_dataset raises (offline anyway).
#
# PYVER / PLATFORM select the target interpreter (default: CPython 3.12, manylinux_2_28 x86-64).
set -euo pipefail
MINIMAL=0
if [ "${1:-}" = "--minimal" ]; then MINIMAL=1; shift; fi
DIR=${1:-$([ $MINIMAL = 1 ] && echo .whl/kvpress-min || echo .whl/kvpress)}
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

# the minimal set: what `pip install --no-deps -r kvpress-requirements.txt` may need to install
MIN_REQS=(
  "kvpress==0.5.5"
  "transformers==5.2.0"
  "tokenizers>=0.22.0,<=0.23.0"
  "huggingface-hub>=1.3.0,<2.0"
  "cachetools>=5.5.2,<6"
  "fire>=0.6.0,<0.7"
  "termcolor"
  "six"
  "requests>=2.32.3,<3"
  "urllib3>=1.26,<3"
  "charset-normalizer>=2,<4"
  "idna>=2.5,<4"
  "certifi>=2023.5.7"
)
MIN_WHEELS=(
  kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 huggingface-hub==1.33.0 cachetools==5.5.2
  termcolor==3.3.0 six==1.17.0 requests==2.34.2 urllib3==2.7.0 charset-normalizer==3.4.7 idna==3.20
  certifi==2026.5.20
)
if [ $MINIMAL = 1 ]; then
  $PIP download --only-binary=:all: --python-version "$PYVER" --platform "$PLATFORM" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps -d "$DIR" "${MIN_WHEELS[@]}"
  $PIP wheel --no-deps -w "$DIR" fire==0.6.0
  printf '%s\n' "${MIN_REQS[@]}" > "$DIR/kvpress-requirements.txt"
  echo "wheels in $DIR:"
  ls -l "$DIR"
  total=$(find "$DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s}')
  echo "total: $total bytes ($(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB) in $(ls "$DIR"/*.whl | wc -l) wheels"
  exit 0
fi

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
