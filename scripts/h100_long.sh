#!/usr/bin/env bash
# Issue #14: the long-context strata on one GPU: decode (1-8 queries over up
# to 2**17+1 keys), past-64k (keys on both sides of 2**16) and huge (Nq, Nk
# around 2**16), against the project's kernel and the SDPA backends that do
# not materialise the score matrix (sdpa-math would need 16 GB per head).
#   BUDGET    campaign seconds (default 330)
#   REPORT    report directory (default reports/examples/h100-long)
#   PER_GPU   campaigns sharing the GPU (default 2)
set -u
REPORT=${REPORT:-reports/examples/h100-long}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
rm -rf "$REPORT"; mkdir -p "$REPORT"
start=$(date +%s)
python3 -m flashcheck.verify.scaleout run --gpus 1 --per-gpu "${PER_GPU:-2}" -- \
  --target triton --target sdpa-flash --target sdpa-efficient --target sdpa-cudnn \
  --device cuda --sizes decode,past-64k,huge --budget "${BUDGET:-330}" --max-examples 1000000 --seed "${SEED:-0}" \
  --minimize "${MINIMIZE:-15}" --max-findings "${MAX_FINDINGS:-6}" --no-progress --profile --out "$REPORT" \
  > "$REPORT/campaign.log" 2>&1
echo "campaign exit status $? after $(( $(date +%s) - start )) s" >> "$REPORT/campaign.log"
for d in "$REPORT"/shard-*/repro/*/; do
  [ -f "$d/repro.py" ] || continue
  (cd "$d" && timeout 120 python3 -I repro.py > run.txt 2>&1; echo "exit status $?" >> run.txt)
done
rm -f "$REPORT"/repro/*.npz "$REPORT"/shard-*/repro/*.npz "$REPORT"/shard-*/index.html
