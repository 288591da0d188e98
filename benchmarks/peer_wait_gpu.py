"""How long a peer collective waits before it gives up, and whether a rank can compile a kernel
while one of its peer calls waits, on one GPU.

    python3 benchmarks/peer_wait_gpu.py [--out DIR]

The other rank of a group of two is simulated in this process (two buffers on this GPU, the
second never written), so every call waits its whole limit and gives up:

    limit    each waiting kernel (the all-reduce of data and flags, pushed and pulled; the tagged
             post-norm, gather, QK-norm sums; rank 1's broadcast) timed with 2^16 to 2^20 polls:
             nanoseconds a poll, and the seconds the default limit (kernels/peer_collectives.py's
             MAX_SPINS) stands for
    compile  a kernel never compiled before (a new constant, so Triton's cache cannot hold it)
             launched while an all-reduce waits for about two seconds, against the same with the
             GPU idle: the host's seconds to compile, load and queue it, and whether that waited
             for the all-reduce to give up

Prints a table last; writes peer_wait_gpu.json under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels.peer_collectives import (
    MAX_SPINS,
    PeerBuffers,
    all_gather_last_dim,
    all_reduce_,
    all_reduce_qk_squares,
    all_reduce_rms_norm_add,
    broadcast_,
    gave_up,
)

CAPACITY = 1 << 20
HIDDEN = 4096


def lonely(rank: int, push: bool = False, tagged: bool = False) -> PeerBuffers:
    """Rank `rank` of a group of two whose other member never calls."""
    size = PeerBuffers.buffer_bytes(CAPACITY, 2)
    buffers = [torch.zeros(size, dtype=torch.uint8, device="cuda") for _ in range(2)]
    peers = PeerBuffers.from_addresses(
        rank, [b.data_ptr() for b in buffers], CAPACITY, torch.device("cuda")
    )
    peers.push, peers.tagged = push, tagged
    peers._keep = buffers  # the buffers live as long as the view
    return peers


def kinds() -> dict:
    """name -> (rank, push, tagged, call(peers))."""
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, HIDDEN, **bf16)
    weight = torch.ones(HIDDEN, **bf16)
    qkv = torch.randn(1, 3 * HIDDEN // 2, **bf16)  # 16 heads of 128, 16 kv heads: one rank's
    return {
        "all-reduce, pulled": (0, False, False, lambda p: all_reduce_(x.clone(), p)),
        "all-reduce, pushed": (0, True, False, lambda p: all_reduce_(x.clone(), p)),
        "post-norm, tagged": (
            0, True, True, lambda p: all_reduce_rms_norm_add(x, x, weight, 1e-6, p)
        ),
        "all-gather, tagged": (0, True, True, lambda p: all_gather_last_dim(x, p)),
        "QK-norm sums, tagged": (
            0, True, True, lambda p: all_reduce_qk_squares(qkv, 16, 16, 128, 1.0, p)
        ),
        "broadcast, rank 1": (
            1, True, True, lambda p: broadcast_(torch.zeros(1, dtype=torch.int64, device="cuda"), p)
        ),
    }  # fmt: skip


def timed_call(peers: PeerBuffers, call, spins: int) -> float:
    """Seconds one call takes with `spins` polls allowed; checks that it gave up."""
    peers.max_spins = spins
    peers.status.zero_()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(peers)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not int(peers.status[0]):
        raise RuntimeError("the call did not give up: the other rank was not simulated as absent")
    return seconds


def measure_limits() -> list[dict]:
    rows = []
    for name, (rank, push, tagged, call) in kinds().items():
        peers = lonely(rank, push, tagged)
        timed_call(peers, call, 1 << 10)  # compile
        times = {spins: timed_call(peers, call, spins) for spins in (1 << 16, 1 << 18, 1 << 20)}
        # the slope between the largest two: launch and compile costs cancel
        ns = (times[1 << 20] - times[1 << 18]) / ((1 << 20) - (1 << 18)) * 1e9
        rows.append(
            {
                "kind": name,
                "gave_up_as": gave_up(int(peers.status[0])),
                "seconds": {str(k): round(v, 4) for k, v in times.items()},
                "ns_per_poll": round(ns, 1),
                "default_limit_s": round(ns * MAX_SPINS / 1e9, 2),
            }
        )
    return rows


@triton.jit
def _fresh_kernel(out_ptr, VALUE: tl.constexpr):
    tl.store(out_ptr, VALUE)


def compile_while_waiting(rate_ns: float) -> dict:
    """A kernel compiled fresh on the host while an all-reduce spins on the GPU, and with the
    GPU idle."""
    peers = lonely(0)
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    base = random.randrange(1 << 20, 1 << 30)
    spins = int(2.0e9 / rate_ns)
    result = {"wait_spins": spins}
    # idle: compile, load and queue a new specialisation
    torch.cuda.synchronize()
    start = time.perf_counter()
    _fresh_kernel[(1,)](out, VALUE=base)
    result["idle_launch_s"] = round(time.perf_counter() - start, 3)
    torch.cuda.synchronize()
    # busy: the all-reduce queued first, waiting about 2 s for a rank that never comes
    peers.max_spins = spins
    done = torch.cuda.Event()
    start = time.perf_counter()
    all_reduce_(x, peers)
    done.record()
    queued = time.perf_counter()
    _fresh_kernel[(1,)](out, VALUE=base + 1)
    launched = time.perf_counter()
    finished_first = done.query()
    torch.cuda.synchronize()
    ended = time.perf_counter()
    result.update(
        busy_launch_s=round(launched - queued, 3),
        wait_over_when_launched=finished_first,
        wait_s=round(ended - start, 3),
        value_ok=int(out[0]) == base + 1,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    limits = measure_limits()
    rate = next(row["ns_per_poll"] for row in limits if row["kind"] == "all-reduce, pushed")
    compiling = compile_while_waiting(rate)
    report = {
        "device": torch.cuda.get_device_name(),
        "max_spins": MAX_SPINS,
        "limits": limits,
        "compile_while_waiting": compiling,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_wait_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['device']}: polls before a call gives up = {MAX_SPINS}")
    print(f"{'kind':<24} {'ns/poll':>8} {'default limit s':>16}")
    for row in limits:
        print(f"{row['kind']:<24} {row['ns_per_poll']:>8} {row['default_limit_s']:>16}")
    print(
        f"fresh kernel: host {compiling['idle_launch_s']} s idle, "
        f"{compiling['busy_launch_s']} s while an all-reduce waited "
        f"{compiling['wait_s']} s (wait over at launch: {compiling['wait_over_when_launched']})"
    )


if __name__ == "__main__":
    main()
