#!/usr/bin/env bash
# The nightly workflow's steps (.github/workflows/nightly.yml), the same
# commands, run by hand on a GPU box without GitHub Actions: the example
# database and the previous report come from local paths instead of the
# cache and the artifact store. tox comes as wheels in .whl/ (carried).
#   HYPOTHESIS_MAX_EXAMPLES  shortens the nightly profile's 400 examples
#   BUDGET                   campaign seconds (the workflow: 1800)
#   PREVIOUS                 a previous summary.json to diff against
set -u
OUT=${OUT:-/tmp/h100-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export HYPOTHESIS_DATABASE_DIR=$PWD/.hypothesis/examples REPORT_DIR=reports/nightly TOX_GPU="-e gpu"
# step "Check the runner's CUDA torch and count the GPUs"
NGPU=$(nvidia-smi -L | grep -c '^GPU ')
FLASHCHECK_GPUS=$NGPU
GPU_SITE_PACKAGES=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export NGPU FLASHCHECK_GPUS GPU_SITE_PACKAGES SEED=${SEED:-5}
rm -rf "$REPORT_DIR" previous
# step "GPU properties"
# shellcheck disable=SC2086
timeout "${PROPS_TIMEOUT:-300}" python3 -m tox $TOX_GPU -- -n "$NGPU" > "$OUT/props.log" 2>&1
echo "props exit: $?" | tee "$OUT/steps.txt"
grep -E "passed|failed" "$OUT/props.log" | tail -2
# step "Fuzz campaign"
# shellcheck disable=SC2086
timeout "${FUZZ_TIMEOUT:-200}" python3 -m tox exec $TOX_GPU -- python -m flashcheck.verify.scaleout run --gpus "$NGPU" -- \
  --target triton --target sdpa-flash --target sdpa-efficient --target sdpa-cudnn --target sdpa-math \
  --device cuda --budget "${BUDGET:-1800}" --seed "$SEED" --no-progress --out "$REPORT_DIR" > "$OUT/fuzz.log" 2>&1
echo "fuzz exit: $?" | tee -a "$OUT/steps.txt"
tail -3 "$OUT/fuzz.log"
# step "Compare with last night"
mkdir -p previous && cp "${PREVIOUS:?}" previous/summary.json
# shellcheck disable=SC2086
python3 -m tox exec $TOX_GPU -- python -m flashcheck diff previous/summary.json "$REPORT_DIR/summary.json" \
  | tee "$REPORT_DIR/diff.txt"
echo "diff exit: ${PIPESTATUS[0]}" | tee -a "$OUT/steps.txt"
cp "$REPORT_DIR/summary.json" "$REPORT_DIR/index.html" "$REPORT_DIR/diff.txt" "$OUT/" 2>/dev/null
