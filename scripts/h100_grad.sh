#!/usr/bin/env bash
# Issue #13 on a GPU: a --grad campaign (forward and dQ, dK, dV judged) over
# torch's SDPA backends and the project's Triton kernel, findings minimized;
# each standalone script is then run with plain torch (python -I, from its
# own directory) and its output kept beside it.
#   BUDGET    campaign seconds (default 420)
#   MINIMIZE  seconds to shrink each finding (default 20)
#   REPORT    report directory (default reports/examples/h100-grad)
#   TARGETS   targets (default: the four SDPA backends and triton)
#   EXTRA     more fuzz options (e.g. "--sizes long --masks causal")
set -u
REPORT=${REPORT:-reports/examples/h100-grad}
TARGETS=${TARGETS:-"sdpa-math sdpa-flash sdpa-efficient sdpa-cudnn triton"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
rm -rf "$REPORT"; mkdir -p "$REPORT"
args=()
for t in $TARGETS; do args+=(--target "$t"); done
start=$(date +%s)
# shellcheck disable=SC2086
python3 -m flashcheck fuzz "${args[@]}" --grad --device cuda --budget "${BUDGET:-420}" --seed "${SEED:-0}" \
  --minimize "${MINIMIZE:-20}" --max-findings "${MAX_FINDINGS:-12}" --no-progress --out "$REPORT" \
  ${KNOWN:+--known "$KNOWN"} ${EXTRA:-} > "$REPORT/campaign.log" 2>&1
echo "campaign exit status $? after $(( $(date +%s) - start )) s" >> "$REPORT/campaign.log"
for d in "$REPORT"/repro/*/; do
  [ -f "$d/repro.py" ] || continue
  (cd "$d" && timeout 120 python3 -I repro.py > run.txt 2>&1; echo "exit status $?" >> run.txt)
done
rm -f "$REPORT"/repro/*.npz
