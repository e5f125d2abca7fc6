#!/usr/bin/env bash
# One H100 call (device machine, no network, source checkout on PYTHONPATH):
# the refactored Triton kernel's GPU properties and the package-judged kernel
# check, its speed against the copy from before the refactor
# (.gpu/triton_flash_old.py, carried; skip with SKIP_BENCH=1), and the CPU
# test suite on the device host's CPU (a second x86-64 CPU and libm).
# The host's Triton 3.6 interpreter hands program ids over as shape-(1,)
# arrays, which NumPy 2.5 no longer turns into Python ints, so the CPU suite
# runs with NumPy 2.4 from .whl/ (carried), the version CI uses.
set -u
OUT=${OUT:-/tmp/h100-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} > "$OUT/env.txt" 2>&1
TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=nightly HYPOTHESIS_MAX_EXAMPLES=${GPU_EXAMPLES:-8} timeout 240 \
  python3 -m pytest -q -m gpu properties/test_triton.py properties/test_kernel_backward.py -p no:cacheprovider \
  > "$OUT/gpu-props.log" 2>&1
echo "gpu properties exit $?" >> "$OUT/env.txt"
TRITON_INTERPRET=0 timeout 120 python3 scripts/gpu_kernel_check.py "$OUT/kernel-check" > "$OUT/kernel-check.log" 2>&1
echo "kernel check exit $?" >> "$OUT/env.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout 200 python3 scripts/kernel_refactor_bench.py --old .gpu/triton_flash_old.py > "$OUT/bench.md" 2>&1
  echo "bench exit $?" >> "$OUT/env.txt"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/numpy-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
python3 -c "import numpy; print('CPU suite numpy', numpy.__version__)" >> "$OUT/env.txt"
timeout 330 python3 -m pytest -q -n 14 -m "not fuzz and not gpu" tests -p no:cacheprovider > "$OUT/cpu-tests.log" 2>&1
echo "cpu tests exit $?" >> "$OUT/env.txt"
timeout 150 python3 -m pytest -q -n 14 -m "fuzz and not gpu" --hypothesis-profile=ci properties -p no:cacheprovider \
  > "$OUT/cpu-fuzz.log" 2>&1
echo "cpu fuzz exit $?" >> "$OUT/env.txt"
for f in gpu-props kernel-check cpu-tests cpu-fuzz; do echo "== $f"; grep -E "passed|failed|error|FAIL" "$OUT/$f.log" | tail -4; done
cat "$OUT/env.txt"
