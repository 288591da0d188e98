#!/usr/bin/env bash
# The GPU benchmark suite, in parts that each fit one call on the device. Installs nothing.
#   bash benchmarks/gpu_suite.sh kernels      ceilings; attention kernels vs SDPA; the kernels'
#                                             launch sweep and compiler report
#   bash benchmarks/gpu_suite.sh decode       batch-1 decode of dummy:olmo2-1b and -7b (128-token
#                                             prompt, 256 new) and 7B at batch 64, transformers
#                                             beside
#   bash benchmarks/gpu_suite.sh throughput   the default offline workload on dummy:olmo2-1b
#                                             and -7b, transformers beside
#   bash benchmarks/gpu_suite.sh tp           (2 GPUs) batch-1 latency and the default workload
#                                             of dummy:olmo2-7b and -13b at tp = 1 and 2
#   bash benchmarks/gpu_suite.sh tpcheck      (2 GPUs) benchmarks/tp_gpu.py: tp = 2 against
#                                             tp = 1 and 7B batch-1 scaling (TP_PARTS=check,rates,
#                                             the default), then 13B scaling and the collectives'
#                                             time per step (TP_PARTS=rates,collectives TP_MODELS=
#                                             dummy:olmo2-13b); one call each
#   bash benchmarks/gpu_suite.sh skinny       every GPU test of kernels/, the engine and the
#                                             sampler; the engine's again with the attention
#                                             prologue apart from the decode kernel; the decode
#                                             matmul's and graphs on against off with it on
#                                             everywhere; then
#                                             benchmarks/skinny_gpu.py: the sweep of its cuts
#                                             against cuBLAS, which writes the measured table
#                                             (kernels/skinny_matmul_configs.json, a copy under
#                                             $OUT), at one row (SKINNY_ROWS=1, the default;
#                                             64 for batches of 17 to 64), then a step's chain
#                                             (SKINNY_PARTS=sweep,chain, the default;
#                                             STEP_TIMEOUT=560); in the next
#                                             call SKINNY_PARTS=check,rates (SKINNY_MODELS=1b,7b)
#                                             with that table in place: batch-1 decode with
#                                             cuBLAS, the table, the kernel everywhere
#   bash benchmarks/gpu_suite.sh postnorm     the post-norm inside every listed one-row
#                                             projection (AFS_FUSED_POST_NORM=all, the tl.dot
#                                             cuts staging the stream): the kernel's and the
#                                             engine's GPU tests with it, each call alone against
#                                             the norm then the matmul (post_norm_gpu.py), and
#                                             batch-1 decode of 1B and 7B with it against the
#                                             default (ab_latency.py, two rounds)
#   bash benchmarks/gpu_suite.sh cluster      (2 GPUs) dummy:olmo2-7b served by one tp = 1 and
#                                             one tp = 2 replica under the load test, the
#                                             in-process engine beside; needs ray, jsonschema
#                                             and the gRPC extras on PYTHONPATH
#   bash benchmarks/gpu_suite.sh coldstart    (2 GPUs) benchmarks/tp_cold_start.py: the tp = 2
#                                             engine's first requests with an empty Triton
#                                             cache: as it is (warm-up in lockstep); without
#                                             its warm-up; without it and with 16 times the
#                                             peer calls' polls; without it and without tagged
#                                             words (COLD_TIMEOUT seconds each, default 110)
#   bash benchmarks/gpu_suite.sh coldstart1   (1 GPU) benchmarks/peer_wait_gpu.py (how long a
#                                             peer call waits before it gives up; a compile
#                                             while one waits), then the tp = 1 engine's first
#                                             requests with an empty Triton cache, with and
#                                             without its warm-up: the kernels each level
#                                             compiled (COLD_TIMEOUT seconds each, default 220)
# Results (JSON) and their rows go to $OUT when set (a device call), else benchmarks/results.
# Each run is stopped after STEP_TIMEOUT seconds (default 300) and the part goes on with the next,
# so a hang costs one run, not the part; the runs that failed are listed at the end.
set -uo pipefail
part=${1:?kernels, decode, throughput, tp, tpcheck, skinny, postnorm, cluster, coldstart or coldstart1}
out=${OUT:-benchmarks/results}
runs=${OUT:+$OUT/runs.md}
runs=${runs:-benchmarks/BENCHMARKS.md}
step_timeout=${STEP_TIMEOUT:-300}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
export PYTHONUNBUFFERED=1
failed=()
guard() {
  timeout -k 10 "$step_timeout" "$@"
  local status=$?
  if ((status)); then failed+=("$* (exit $status)"); fi
}
bench() { guard python3 -m cluster.cli bench "$@" --out-dir "$out" --report "$runs"; }
# a cold start's levels: the cluster benchmark's warm-up and load, then prompts of other lengths
cold_levels=1x8x4,1x128x128,8x128x128,4x37x16,3x300x8,16x23x24

case "$part" in
  kernels)
    bench ceilings
    bench kernels
    guard python3 benchmarks/kernel_profile.py "$out/kernel_profile"
    ;;
  decode)
    bench latency --model dummy:olmo2-1b --prompt-lens 128 --new-tokens 256 --peer hf
    bench latency --model dummy:olmo2-7b --prompt-lens 128 --new-tokens 256 --peer hf
    bench throughput --model dummy:olmo2-7b --workload fixed --num-requests 64 \
      --input-len-range 128 --output-len-range 256 --max-num-seqs 64 --peer hf
    ;;
  throughput)
    bench throughput --model dummy:olmo2-1b --workload default --num-requests 256 --peer hf
    bench throughput --model dummy:olmo2-7b --workload default --num-requests 256 --peer hf
    ;;
  tp)
    for model in dummy:olmo2-7b dummy:olmo2-13b; do
      for tp in 1 2; do
        bench latency --model "$model" --tp "$tp" --prompt-lens 128 --new-tokens 256
        bench throughput --model "$model" --tp "$tp" --workload default --num-requests 256
      done
    done
    ;;
  tpcheck)
    guard python3 benchmarks/tp_gpu.py --out "$out" --deadline $((step_timeout - 20)) \
      --parts "${TP_PARTS:-check,rates}" --models "${TP_MODELS:-dummy:olmo2-7b}"
    ;;
  skinny)
    # every GPU test as the engine runs by default, then the kernel's own and graphs on against
    # off with the kernel on everywhere
    guard python3 -m pytest -q -m gpu tests/kernels tests/engine tests/unit/test_sampler.py
    guard env AFS_DECODE_PROLOGUE_MAX_BATCH=0 python3 -m pytest -q -m gpu tests/engine
    guard env AFS_SKINNY_MATMUL=1 python3 -m pytest -q -m gpu \
      tests/kernels/test_skinny_matmul.py tests/engine/test_decode_graphs.py
    guard python3 benchmarks/skinny_gpu.py --out "$out" --deadline $((step_timeout - 20)) \
      --parts "${SKINNY_PARTS:-sweep,chain}" --models "${SKINNY_MODELS:-1b,7b}" \
      --sweep-rows "${SKINNY_ROWS:-1}"
    ;;
  postnorm)
    guard env AFS_FUSED_POST_NORM=all python3 -m pytest -q -m gpu \
      tests/kernels/test_skinny_matmul.py tests/engine
    guard env AFS_FUSED_POST_NORM=all python3 benchmarks/post_norm_gpu.py --out "$out"
    guard python3 benchmarks/ab_latency.py --models 1b,7b --rounds 2 --out "$out/ab" \
      base= all=AFS_FUSED_POST_NORM=all
    ;;
  cluster)
    python3 -m protos.build || exit 1 # the gRPC stubs the load test's client imports
    for tp in 1 2; do
      guard python3 benchmarks/cluster_overhead.py --model dummy:olmo2-7b --device cuda \
        --tp "$tp" --concurrency 1,8,32 --input-len 128 --output-len 128 --out "$out"
    done
    ;;
  coldstart)
    cold=${COLD_TIMEOUT:-110}
    step_timeout=$((4 * cold + 30)) # four variants, each stopped at its own limit
    guard python3 benchmarks/tp_cold_start.py --model dummy:olmo2-7b --tp 2 \
      --levels "$cold_levels" --timeout "$cold" --out "$out" base= nowarm=COLD_WARM_UP=0 \
      nowarm_patient=COLD_WARM_UP=0,AFS_PEER_MAX_SPINS=1073741824 \
      nowarm_untagged=COLD_WARM_UP=0,AFS_PEER_TAGGED=0
    ;;
  coldstart1)
    cold=${COLD_TIMEOUT:-220}
    step_timeout=60
    guard python3 benchmarks/peer_wait_gpu.py --out "$out"
    step_timeout=$((2 * cold + 30))
    guard python3 benchmarks/tp_cold_start.py --model dummy:olmo2-7b --tp 1 \
      --levels "$cold_levels" --timeout "$cold" --out "$out" base= nowarm=COLD_WARM_UP=0
    ;;
  *)
    echo "unknown part: $part" >&2
    exit 2
    ;;
esac
if [[ -f "$runs" && -n "${OUT:-}" ]]; then cat "$runs"; fi
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
