#!/usr/bin/env bash
# What we ran on the H100 (device machine, no network): the nightly
# workflow's steps by hand. tox comes as wheels in .whl/ (carried).
#   HYPOTHESIS_MAX_EXAMPLES  examples per GPU property (the workflow uses the
#                            nightly profile's 400)
#   CAMPAIGN_BUDGET          seconds for the campaign (the workflow uses 1800)
set -u
OUT=${OUT:-/tmp/h100-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHCHECK_GPUS=1
export HYPOTHESIS_MAX_EXAMPLES=${HYPOTHESIS_MAX_EXAMPLES:-25}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
echo "== tox -e gpu (HYPOTHESIS_MAX_EXAMPLES=$HYPOTHESIS_MAX_EXAMPLES)"
timeout "${PROPS_TIMEOUT:-300}" python3 -m tox -e gpu > "$OUT/gpu_props.log" 2>&1
echo "tox -e gpu exit: $?" | tee -a "$OUT/env.txt"
tail -25 "$OUT/gpu_props.log"
echo "== campaign"
rm -rf reports/h100
timeout "${CAMPAIGN_TIMEOUT:-240}" python3 -m verify fuzz --target triton --target sdpa-flash --target sdpa-efficient \
  --target sdpa-cudnn --target sdpa-math --device cuda --budget "${CAMPAIGN_BUDGET:-180}" --max-examples 1000 \
  --seed 1 --no-progress --out reports/h100 > "$OUT/campaign.log" 2>&1
echo "campaign exit: $?" | tee -a "$OUT/env.txt"
tail -3 "$OUT/campaign.log"
tar czf "$OUT/campaign.tgz" reports/h100
echo "== FA3 RMSE"
timeout 150 python3 scripts/fa3_rmse.py --out "$OUT/fa3" --device cuda > "$OUT/fa3.log" 2>&1
echo "fa3 exit: $?" | tee -a "$OUT/env.txt"
tail -20 "$OUT/fa3.log"
