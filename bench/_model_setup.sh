# Sourced by the GPU scripts (suite_h200.sh, share_prefix_check.sh): installs the carried wheels
# (.stage/whl: gguf, .whl: pysbd and the server's) into /tmp/site, puts them and the checkout on
# PYTHONPATH, and joins the model NAME's pieces under /root/m into $M once, checking its pinned
# sha256 (the pieces come over one device call each, see bench/suite_h200.sh).
NAME=${NAME:-qwen2.5-coder-1.5b}
M=/root/m/$NAME.gguf
pip install -q --no-index --no-deps --target /tmp/site .stage/whl/*.whl .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
SHA=$(python3 -c "from kvsift.models.registry import get_model; print(get_model('$NAME').sha256)") || exit 1
if [ ! -f $M ]; then
  (cd /root/m && cat $NAME.part[0-9][0-9] > $NAME.gguf && echo "$SHA  $NAME.gguf" | sha256sum -c -) || exit 1
fi
