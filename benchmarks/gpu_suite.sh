#!/usr/bin/env bash
# The GPU benchmark suite, in parts that each fit one call on the device. Installs nothing.
#   bash benchmarks/gpu_suite.sh latency      ceilings; batch-1 latency of dummy:olmo2-1b and -7b
#                                             with transformers beside; attention kernels vs SDPA
#   bash benchmarks/gpu_suite.sh throughput   the default offline workload on dummy:olmo2-1b,
#                                             transformers beside
# Results (JSON) and their rows go to $OUT when set (a device call), else benchmarks/results.
set -euo pipefail
part=${1:?latency or throughput}
out=${OUT:-benchmarks/results}
runs=${OUT:+$OUT/runs.md}
runs=${runs:-benchmarks/BENCHMARKS.md}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
export PYTHONUNBUFFERED=1
bench() { python3 -m cluster.cli bench "$@" --out-dir "$out" --report "$runs"; }

case "$part" in
  latency)
    bench ceilings
    bench latency --model dummy:olmo2-1b --prompt-lens 128,2048 --new-tokens 128 --peer hf
    bench latency --model dummy:olmo2-7b --prompt-lens 128,2048 --new-tokens 128 --peer hf
    bench kernels
    ;;
  throughput)
    bench throughput --model dummy:olmo2-1b --workload default --num-requests 256 --peer hf
    ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
cat "$runs"
