#!/usr/bin/env bash
# Issue #14: campaign throughput on one GPU, profiled phase by phase.
# The nightly mix: the project's Triton kernel and torch's SDPA backends,
# every dtype, every size stratum the device has, forward only unless
# EXTRA says --grad.
#   BUDGET    campaign seconds (default 600)
#   REPORT    report directory (default reports/examples/h100-throughput)
#   TARGETS   targets (default: triton and the four SDPA backends)
#   PER_GPU   campaigns sharing the GPU (default 1: one plain campaign;
#             K > 1: python -m flashcheck.verify.scaleout run --per-gpu K)
#   GPUS      GPUs to shard over with scaleout (default 1)
#   EXTRA     more fuzz options
set -u
REPORT=${REPORT:-reports/examples/h100-throughput}
TARGETS=${TARGETS:-"triton sdpa-flash sdpa-efficient sdpa-cudnn sdpa-math"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
rm -rf "$REPORT"; mkdir -p "$REPORT"
args=()
for t in $TARGETS; do args+=(--target "$t"); done
start=$(date +%s)
common=(--device cuda --budget "${BUDGET:-600}" --max-examples 1000000 --seed "${SEED:-0}"
        --minimize "${MINIMIZE:-0}" --no-progress --profile --out "$REPORT")
if [ "${PER_GPU:-1}" = 1 ] && [ "${GPUS:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  python3 -m flashcheck fuzz "${args[@]}" "${common[@]}" ${KNOWN:+--known "$KNOWN"} ${EXTRA:-} \
    > "$REPORT/campaign.log" 2>&1
else
  # shellcheck disable=SC2086
  python3 -m flashcheck.verify.scaleout run --gpus "${GPUS:-1}" --per-gpu "${PER_GPU:-1}" -- "${args[@]}" \
    "${common[@]}" ${KNOWN:+--known "$KNOWN"} ${EXTRA:-} > "$REPORT/campaign.log" 2>&1
fi
echo "campaign exit status $? after $(( $(date +%s) - start )) s" >> "$REPORT/campaign.log"
rm -rf "$REPORT"/repro "$REPORT"/shard-*/repro
