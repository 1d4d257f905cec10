#!/usr/bin/env bash
# The one command for a lent GPU (issue 15, item 6): the GPU tests, then the benches, in one device call.
#
#   device run:  bash bench/gpu_check.sh            (timeout_s 540 leaves a rerun inside 15 device minutes)
#
# The lent image has torch (2.11+cu130 when last seen), triton, transformers, pytest, setuptools and no
# internet: actc is installed from this checkout without its dependencies or a build environment (sympy and
# networkx come with torch), which also registers backend="actc". Each step has its own time limit and the
# script goes on after a failure, so one hang cannot eat the lease. Everything it prints also goes to $OUT/gpu.log, and the benches' CSVs and PNGs to $OUT/
# (at most 8 files come back: the log, and the bench outputs of the cuda device tag).
set -u
OUT=${OUT:-results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu.log") 2>&1

step() {  # step SECONDS NAME COMMAND...: run with a time limit, report the exit status, never stop the script
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@"; echo "=== $name: exit $?"
}

step 120 "install" python3 -m pip install -q --no-deps --no-build-isolation -e .
step 30 "versions" python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# the kernel and fusion tests that run on CUDA when it is there (Triton kernels, fused kernel counts, fp32/bf16)
step 180 "GPU tests" pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_fusion.py \
  tests/test_recompute.py -k "cuda or fusion or same_kernels or recompute"
# quantize / dequantize bandwidth against a copy, every width (bench/bench_kernels.py)
step 90 "kernels" python3 bench/bench_kernels.py --out "$OUT" --quick
# step time, saved and peak memory: inductor, its recompute budget, actc default, 2bit and 2bit + recompute
step 210 "train" python3 bench/bench_train.py --out "$OUT" --steps 10 \
  --modes "inductor,inductor recompute 0.3,actc default,actc 2bit,actc 2bit + recompute 0.3"
# keep only what comes back (8 files): the log first, then the CSVs and PNGs of the cuda tag
find "$OUT" -mindepth 2 -type f \( -name "*.csv" -o -name "*.png" \) | head -7 | while read -r f; do
  cp "$f" "$OUT/$(basename "$f")"; done
find "$OUT" -mindepth 1 -type d -exec rm -rf {} + 2>/dev/null
echo "=== done $(date +%T)"
