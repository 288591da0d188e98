"""A tensor-parallel engine's first requests on a host whose kernels are not compiled yet.

    python3 benchmarks/tp_cold_start.py [--model dummy:olmo2-7b] [--tp 2] [--device cuda]
        [--levels 1x8x4,1x128x128,8x128x128] [--timeout 150] [--out DIR] \
        base= broadcast_nccl=AFS_PEER_BROADCAST=0 untagged=AFS_PEER_TAGGED=0

Each variant (NAME=VAR=VALUE[,VAR=VALUE...], as benchmarks/ab_latency.py takes them) runs in a
process of its own with an empty Triton cache (TRITON_CACHE_DIR, a fresh folder), so every
kernel compiles while the ranks serve: the in-process engine (0.5 GiB of KV cache, 32 sequences
at most, as benchmarks/cluster_overhead.py builds it) takes the --levels in turn, each
CONCURRENCYxPROMPTxNEW: closed-loop batches of random prompts of PROMPT tokens, greedy, NEW
tokens each, 2 x CONCURRENCY requests (at least 2). The first level is the warm-up the cluster
benchmark gives its engine. A variant's process is stopped after --timeout seconds. The engine
runs its own warm-up before serving (workers/engine/warm_up.py) unless the variant sets
COLD_WARM_UP=0.

Reports, per variant: the seconds until the engine was up (and its warm-up's), each level's
seconds, the Triton kernels each level compiled (none, where the warm-up reached everything it
serves), every engine step slower than 0.3 s (when it ended), and how the run ended (done, the
error a step raised, or stopped at the timeout, with the level it was in). Prints a table last;
writes tp_cold_start.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLOW_STEP_S = 0.3


def parse_levels(text: str) -> list[tuple[int, int, int]]:
    """'1x8x4,8x128x128' -> [(1, 8, 4), (8, 128, 128)]."""
    levels = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"level {item!r}: expected CONCURRENCYxPROMPTxNEW, positive integers")
        levels.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return levels


def emit(**record) -> None:
    """One line of the child's report, read by the parent."""
    print("@@ " + json.dumps(record), flush=True)


def run_level(engine, concurrency: int, prompt: int, new: int, seed: int, clock) -> None:
    import numpy as np

    from workers.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, prompt).tolist() for _ in range(max(2, 2 * concurrency))]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    pending, inflight, steps = prompts[::-1], set(), 0
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            inflight.add(engine.add_request(pending.pop(), params))
        start = time.perf_counter()
        outputs = engine.step()
        steps += 1
        took = time.perf_counter() - start
        if took > SLOW_STEP_S:
            emit(kind="slow_step", step=steps, seconds=round(took, 2), at=round(clock(), 2))
        for output in outputs:
            if output.finished:
                inflight.discard(output.request_id)


def child(args: argparse.Namespace) -> None:
    from workers.bench.compiles import watch_compiles
    from workers.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    engine = LLMEngine(
        model=args.model, device=args.device, tp=args.tp, kv_cache_gib=0.5, max_num_seqs=32,
        warm_up=os.environ.get("COLD_WARM_UP", "1") != "0",
    )  # fmt: skip
    emit(kind="engine_up", at=round(clock(), 2), warm_up=engine.warm_up_report)
    try:
        for index, (concurrency, prompt, new) in enumerate(parse_levels(args.levels)):
            emit(kind="level_start", level=index, at=round(clock(), 2))
            start = time.perf_counter()
            with watch_compiles() as compiled:
                run_level(engine, concurrency, prompt, new, index, clock)
            emit(kind="level_done", level=index, seconds=round(time.perf_counter() - start, 2))
            emit(kind="compiled", level=index, kernels=compiled)
    except Exception as error:  # noqa: BLE001 - reported to the parent
        emit(kind="error", error=f"{type(error).__name__}: {error}", at=round(clock(), 2))
    finally:
        engine.shutdown()


def run_variant(name: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    """One variant in a child process with an empty Triton cache: its report."""
    with tempfile.TemporaryDirectory(prefix=f"triton-cache-{name}-") as cache:
        command = [
            sys.executable, __file__, "--child", "--model", args.model, "--tp", str(args.tp),
            "--device", args.device, "--levels", args.levels,
        ]  # fmt: skip
        child_env = {**os.environ, **env, "TRITON_CACHE_DIR": cache}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, env=child_env, capture_output=True, text=True, timeout=args.timeout
            )
            stdout, stderr, ended = done.stdout, done.stderr, f"exit {done.returncode}"
        except subprocess.TimeoutExpired as expired:
            stdout, stderr = (
                (out.decode() if isinstance(out, bytes) else out) or ""
                for out in (expired.stdout, expired.stderr)
            )
            ended = f"stopped at the {args.timeout} s timeout"
        seconds = time.perf_counter() - start
    records = [json.loads(line[3:]) for line in stdout.splitlines() if line.startswith("@@ ")]
    report: dict = {"env": env, "seconds": round(seconds, 1), "process": ended, "levels": {}}
    report["stderr_tail"] = stderr[-2000:]
    report["slow_steps"] = [r for r in records if r["kind"] == "slow_step"]
    for record in records:
        if record["kind"] == "engine_up":
            report["engine_up_s"] = record["at"]
            report["warm_up"] = record["warm_up"]
        elif record["kind"] == "compiled":
            report.setdefault("compiled", {})[record["level"]] = record["kernels"]
        elif record["kind"] == "level_start":
            report["last_level_started"] = record["level"]
        elif record["kind"] == "level_done":
            report["levels"][record["level"]] = record["seconds"]
        elif record["kind"] == "error":
            report["error"] = record["error"]
    levels = len(parse_levels(args.levels))
    if len(report["levels"]) == levels:
        report["ended"] = "done"
    elif "error" in report:
        report["ended"] = f"error in level {report.get('last_level_started')}"
    else:
        report["ended"] = f"{ended}, in level {report.get('last_level_started')}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["base="])
    parser.add_argument("--model", default="dummy:olmo2-7b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--levels", default="1x8x4,1x128x128,8x128x128")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    parse_levels(args.levels)  # bad levels fail here, before any process starts
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from ab_latency import parse_variant

    from workers.bench.results import git_commit

    variants = dict(parse_variant(v) for v in args.variants)
    result = {
        "command": " ".join(["python3", *sys.argv]),
        "git_commit": git_commit(),
        "model": args.model,
        "tp": args.tp,
        "levels": args.levels,
        "variants": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, env in variants.items():
        report = run_variant(name, env, args)
        result["variants"][name] = report
        (args.out / "tp_cold_start.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: {report['ended']}; levels {report['levels']}", flush=True)
        for step in report["slow_steps"]:
            print(f"    step {step['step']} took {step['seconds']} s (at {step['at']} s)")
        for level, kernels in report.get("compiled", {}).items():
            for kernel in kernels:
                seconds = kernel["seconds"]
                took = f"{seconds:.2f} s" if seconds is not None else "?"
                print(f"    level {level} compiled {kernel['kernel']} ({took})")
        if "error" in report:
            print(f"    {report['error']}")
        if report["ended"] != "done":  # the other ranks' errors land here
            print("    " + report["stderr_tail"][-1200:].replace("\n", "\n    "))
    print(
        f"\n{'variant':>16} | {'engine up':>9} | {'warm-up s':>9} | {'levels done (s)':<30} | "
        f"{'compiles':<14} | ended"
    )
    for name, report in result["variants"].items():
        done = ", ".join(f"{s}" for s in report["levels"].values()) or "-"
        up = report.get("engine_up_s", "-")
        warm = (report.get("warm_up") or {}).get("seconds", "-")
        compiles = ", ".join(str(len(k)) for k in report.get("compiled", {}).values()) or "-"
        print(f"{name:>16} | {up:>9} | {warm:>9} | {done:<30} | {compiles:<14} | {report['ended']}")


if __name__ == "__main__":
    main()
