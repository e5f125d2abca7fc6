#!/usr/bin/env bash
# Reproduce what the GPU Triton property finds: run it briefly, then replay
# the smallest saved failing cases with the CLI and keep them.
set -u
OUT=${OUT:-/tmp/h100-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
GPU_SITE_PACKAGES=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export GPU_SITE_PACKAGES PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HYPOTHESIS_MAX_EXAMPLES=${HYPOTHESIS_MAX_EXAMPLES:-8}
rm -rf reports/failures
timeout "${PROPS_TIMEOUT:-150}" python3 -m tox -e gpu -- properties/test_triton.py -k "${K:-bound_gpu}" -x \
  -p no:cacheprovider > "$OUT/props-triton.log" 2>&1
echo "property exit: $?"
mkdir -p "$OUT/smallest"
for f in $(ls -S -r reports/failures/*.npz 2>/dev/null | head -3); do
  cp "$f" "$OUT/smallest/"
  PYTHONPATH=".:$PYTHONPATH" timeout 60 python3 -m flashcheck replay "$f" --target triton --device cuda 2>&1 \
    | grep -v Warning | head -12
done
