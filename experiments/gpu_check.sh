#!/usr/bin/env bash
# All GPU measurements of issue 18 in one run of under 8 minutes (run on a lent GPU machine from
# the repo root). Writes JSON + logs under $OUT (default experiments/results/gpu):
#   versions.txt
#   bench_kernels_gpu_attention.json  numerics vs the reference; B4 T4096 at block sparsity
#       50/75/90% (the earlier headline); the sweep T = 4096..32768 (32768 tokens per call) x
#       sparsity 50/75/90/95% x blocks 128x128 / 64x128, fraction of the ideal 1/(1-s) per point
#       and the best blocks per (T, s); the dense kernel vs jax.nn.dot_product_attention
#       (default and implementation="cudnn") at every T; headline
#       attn_min_fraction_of_ideal_s90_T8192plus (target >= 0.8).
#   bench_kernels_gpu_gmm.json  numerics; grouped matmul (m 8192, k 2048, n 1024, 16 groups, bf16)
#       vs a dense matmul of the same FLOPs and jax.lax.ragged_dot, for the default 64-wide tiles
#       and 128-wide ones; headline gmm_best_fraction_of_dense (target >= 0.6).
# Each section runs in its own process under its own timeout (attention 300 s, gmm 120 s).
#     OUT=/tmp/out bash experiments/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-experiments/results/gpu}"; mkdir -p "$OUT"
start=$(date +%s)
{ nvidia-smi -L; git rev-parse HEAD; } 2>&1 | tee "$OUT/versions.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/versions.txt"

run() {  # run NAME TIMEOUT ARGS...: one bench_kernels.py section in its own process
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s)"
  timeout "$limit" python3 experiments/bench_kernels.py "$@" --json "$OUT/bench_kernels_gpu_$name.json" \
    > "$OUT/bench_kernels_gpu_$name.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start ))s"; tail -n 25 "$OUT/bench_kernels_gpu_$name.log"
}

run attention "${ATTN_TIMEOUT:-300}" --sections attention \
  --attn-sweep-seqs 4096 8192 16384 32768 --attn-sweep-tokens 32768 \
  --attn-sweep-blocks 128x128 64x128 --attn-sweep-sparsities 0.5 0.75 0.9 0.95 --attn-sweep-iters 10
run gmm "${GMM_TIMEOUT:-120}" --sections gmm --gmm-sweep-tilings 128,128,64 128,64,128 128,128,128
echo "total $(( $(date +%s) - start ))s"
