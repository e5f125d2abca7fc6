#!/usr/bin/env bash
# Issue #12 on a GPU: a default campaign (no narrowing) over torch's SDPA
# backends, each finding minimized into repro/<signature>/ with a standalone
# torch script; then every script is run with plain torch (python -I, from
# its own directory, no flashcheck on the path) and its output kept beside it.
#   BUDGET    campaign seconds (default 240)
#   MINIMIZE  seconds to shrink each finding (default 25)
#   REPORT    report directory (default reports/examples/h100-findings)
#   TARGETS   targets (default: the four SDPA backends)
set -u
REPORT=${REPORT:-reports/examples/h100-findings}
TARGETS=${TARGETS:-"sdpa-math sdpa-flash sdpa-efficient sdpa-cudnn"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
rm -rf "$REPORT"; mkdir -p "$REPORT"
args=()
for t in $TARGETS; do args+=(--target "$t"); done
start=$(date +%s)
python3 -m flashcheck fuzz "${args[@]}" --device cuda --budget "${BUDGET:-240}" --seed "${SEED:-0}" \
  --minimize "${MINIMIZE:-25}" --max-findings "${MAX_FINDINGS:-12}" --no-progress --out "$REPORT" \
  ${KNOWN:+--known "$KNOWN"} > "$REPORT/campaign.log" 2>&1
echo "campaign exit status $? after $(( $(date +%s) - start )) s" >> "$REPORT/campaign.log"
for d in "$REPORT"/repro/*/; do
  [ -f "$d/repro.py" ] || continue
  (cd "$d" && timeout 300 python3 -I repro.py > run.txt 2>&1; echo "exit status $?" >> run.txt)
done
# Per-case .npz files of every failing run stay behind: the minimized ones are what a person needs.
rm -f "$REPORT"/repro/*.npz
