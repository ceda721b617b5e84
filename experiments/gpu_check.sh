#!/usr/bin/env bash
# One short accelerator check (run on a lent GPU machine from the repo root; writes under $OUT):
# versions, then each kernel section of bench_kernels.py in its own process (numerics vs the
# reference, then timings at block sparsity 50/75/90% and the grouped matmul vs ragged_dot/dense).
#     OUT=/tmp/out bash experiments/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/versions.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/versions.txt"
for section in attention gmm; do
  echo "== $section"
  timeout "${SECTION_TIMEOUT:-200}" python3 experiments/bench_kernels.py --sections "$section" \
    --json "$OUT/bench_kernels_gpu_$section.json" > "$OUT/bench_kernels_gpu_$section.log" 2>&1
  echo "exit $?"; tail -n 40 "$OUT/bench_kernels_gpu_$section.log"
done
