#!/usr/bin/env bash
# What we ran on the H100 (device machine, no network): the nightly
# workflow's steps by hand, shortened to fit one call. tox comes as wheels in
# .whl/ (carried).
#   HYPOTHESIS_MAX_EXAMPLES  examples per GPU property (nightly profile: 400)
#   CAMPAIGN_BUDGET          seconds per campaign (the workflow: 1800)
set -u
OUT=${OUT:-/tmp/h100-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
GPU_SITE_PACKAGES=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export GPU_SITE_PACKAGES PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHCHECK_GPUS=1
export HYPOTHESIS_MAX_EXAMPLES=${HYPOTHESIS_MAX_EXAMPLES:-25}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1

echo "== tox -e gpu (HYPOTHESIS_MAX_EXAMPLES=$HYPOTHESIS_MAX_EXAMPLES), one property file at a time"
for spec in ${GPU_TESTS:-properties/test_kernel_backward.py:150 properties/test_sdpa.py:90 properties/test_triton.py:200}; do
  file=${spec%%:*}; limit=${spec##*:}
  timeout "$limit" python3 -m tox -e gpu -- "$file" -p no:cacheprovider > "$OUT/props-$(basename "$file" .py).log" 2>&1
  echo "tox -e gpu -- $file: exit $?" | tee -a "$OUT/env.txt"
  grep -E "passed|failed|exceeds|Error:" "$OUT/props-$(basename "$file" .py).log" | tail -4
done
[ -d reports/failures ] && tar czf "$OUT/failures.tgz" reports/failures

campaign() {  # name, extra fuzz options...
  local name=$1; shift
  rm -rf "reports/$name"
  timeout "${CAMPAIGN_TIMEOUT:-200}" python3 -m flashcheck fuzz --target triton --target sdpa-flash \
    --target sdpa-efficient --target sdpa-cudnn --target sdpa-math --device cuda \
    --budget "${CAMPAIGN_BUDGET:-150}" --max-examples 1000 --no-progress --out "reports/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "campaign $name exit: $?" | tee -a "$OUT/env.txt"
  tail -1 "$OUT/$name.log"
  tar czf "$OUT/$name.tgz" "reports/$name"
}
if [ -z "${SKIP_CAMPAIGNS:-}" ]; then
  echo "== campaign over every class"
  campaign h100 --seed 1
  echo "== campaign over the fused backends' feature set (no explicit masks, fp16/bf16)"
  campaign h100-fused --seed 2 --dtype fp16,bf16 --masks none,causal
fi

echo "== causal alignment check (Nq != Nk) per backend, and the cuDNN NaN case"
{ timeout 60 python3 scripts/causal_alignment.py 2>&1 | grep -v Warning | grep -v "return sdpa"
  for f in reports/h100/repro/*sdpa-cudnn.npz; do [ -e "$f" ] && PYTHONPATH=".:$PYTHONPATH" timeout 60 python3 scripts/cudnn_nan.py "$f"; done
} > "$OUT/checks.txt" 2>&1
cat "$OUT/checks.txt"
