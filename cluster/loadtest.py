"""`afs loadtest`: drive a running server over gRPC and measure what its clients would see.

Each request is a prompt of random token ids (no tokenizer needed; the vocabulary size comes from
`ListModels`) with `ignore_eos` and `max_tokens` = its drawn output length, so it generates exactly
that many tokens. Closed loop (`--concurrency C`): C workers each send their next request when the
previous one ends. Open loop (`--request-rate R`): requests start at Poisson arrival times, however
many are already in flight. Prompts are built before the clock starts.

Rules, all on the client's `time.perf_counter` clock:

- TTFT: the first message that carries tokens, minus the send time.
- E2E: the stream's last message, minus the send time.
- TPOT, per request: (E2E - TTFT) / (tokens - 1); undefined for one-token requests.
- Inter-token latency: one value per token after the first. A message of k tokens arriving g after
  the previous message with tokens counts g, then k - 1 zeros (its tokens arrived together); the
  first message's extra tokens count zeros. A request's values sum to its last minus first token
  time, so their mean is its TPOT when the last message carries tokens.
- Throughputs and goodput are over the run's duration (first send to last stream end); goodput
  counts the successful requests that meet every SLO given (a one-token request meets any TPOT SLO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from protos.afs.v1 import inference_pb2, inference_pb2_grpc

LEN_DISTS = ("fixed", "uniform", "normal")
PERCENTILES = (50, 90, 99)
STAT_NAMES = ("mean", "p50", "p90", "p99")
CONTROL_TIMEOUT_S = 30.0  # for ListModels, before the measured run
# the flags copied into the report, so that a result says how it was made (the API key is not)
CONFIG_KEYS = (
    "server concurrency request_rate num_requests input_len output_len len_dist len_spread "
    "shared_prefix_len seed temperature slo_ttft_ms slo_tpot_ms timeout"
).split()


@dataclass
class RequestRecord:
    """What the client saw of one request; times are `time.perf_counter()` seconds."""

    prompt_len: int
    output_len: int  # asked for through max_tokens with ignore_eos
    send_time: float = 0.0
    arrival_times: list[float] = field(default_factory=list)  # one per streamed message
    token_counts: list[int] = field(default_factory=list)  # new tokens in each message
    error: str | None = None  # gRPC status code name, or why an OK stream is still a failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--server", default="127.0.0.1:50051", help="gateway HOST:PORT")
    add("--api-key", default=os.environ.get("AFS_API_KEY"), help="Bearer key ($AFS_API_KEY)")
    add("--model", default=None, help="served model name (default: the first listed)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    mode.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals, req/s")
    add("--num-requests", type=int, default=100)
    add("--input-len", type=int, default=128, help="mean random prompt tokens after the prefix")
    add("--output-len", type=int, default=128, help="mean generated tokens")
    add("--len-dist", choices=LEN_DISTS, default="fixed")
    add("--len-spread", type=float, default=0.5, help="s: uniform on L(1±s); normal: sd s*L")
    add("--shared-prefix-len", type=int, default=0, help="tokens every prompt starts with")
    add("--seed", type=int, default=0)
    add("--temperature", type=float, default=0.0)
    add("--slo-ttft-ms", type=float, default=None)
    add("--slo-tpot-ms", type=float, default=None)
    add("--timeout", type=float, default=600.0, help="per-request deadline in seconds")
    add("--out", default=None, help="also write the JSON report to this path")
    add("--out-dir", default=None, help="also write a benchmark result (kind serving) here")
    add("--report", default="benchmarks/BENCHMARKS.md", help="with --out-dir: the runs table")


def _require(ok: bool, flag: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{flag} must be {rule}, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag outside its range."""
    for flag in ("num_requests", "input_len", "output_len"):
        value = getattr(args, flag)
        _require(value >= 1, f"--{flag.replace('_', '-')}", ">= 1", value)
    if args.concurrency is not None:
        _require(args.concurrency >= 1, "--concurrency", ">= 1", args.concurrency)
    if args.request_rate is not None:
        rate = args.request_rate
        _require(0 < rate < math.inf, "--request-rate", "positive and finite", rate)
    _require(0 <= args.len_spread < 1, "--len-spread", "in [0, 1)", args.len_spread)
    _require(args.shared_prefix_len >= 0, "--shared-prefix-len", ">= 0", args.shared_prefix_len)
    _require(0 <= args.temperature <= 100, "--temperature", "in [0, 100]", args.temperature)
    for flag in ("slo_ttft_ms", "slo_tpot_ms", "timeout"):
        value = getattr(args, flag)
        if value is not None:
            _require(value > 0, f"--{flag.replace('_', '-')}", "> 0", value)


def sample_lengths(
    rng: np.random.Generator, num: int, mean: int, dist: str, spread: float
) -> np.ndarray:
    """`num` lengths around `mean`; the normal one is clipped symmetrically to keep its mean."""
    if dist == "fixed":
        return np.full(num, mean, dtype=np.int64)
    if dist == "uniform":
        # rounded first so that 100 * 0.9 = 90.00000000000001 does not ceil to 91
        low = math.ceil(round(mean * (1 - spread), 6))
        high = math.floor(round(mean * (1 + spread), 6))
        return rng.integers(low, high + 1, size=num, dtype=np.int64)
    if dist == "normal":
        drawn = np.rint(rng.normal(mean, spread * mean, size=num))
        return np.clip(drawn, 1, 2 * mean - 1).astype(np.int64)
    raise ValueError(f"--len-dist must be one of {', '.join(LEN_DISTS)}, got {dist!r}")


def poisson_arrival_times(rng: np.random.Generator, num: int, rate: float) -> np.ndarray:
    """Start offsets in seconds: the first at 0, then exponential gaps of mean 1/rate."""
    gaps = rng.exponential(1.0 / rate, size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def build_workload(
    args: argparse.Namespace, rng: np.random.Generator, card: inference_pb2.ModelCard
) -> list[tuple[inference_pb2.GenerateRequest, RequestRecord]]:
    """Requests whose prompts are the shared prefix followed by `input_len` random token ids."""
    n = args.num_requests
    input_lens = sample_lengths(rng, n, args.input_len, args.len_dist, args.len_spread)
    output_lens = sample_lengths(rng, n, args.output_len, args.len_dist, args.len_spread)
    longest = args.shared_prefix_len + int((input_lens + output_lens).max())
    if card.max_model_len and longest > card.max_model_len:
        raise ValueError(
            f"--shared-prefix-len + --input-len + --output-len reach {longest} tokens, "
            f"past the model's max_model_len {card.max_model_len}"
        )
    prefix = rng.integers(0, card.vocab_size, size=args.shared_prefix_len)
    work = []
    for input_len, output_len in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        ids = np.concatenate([prefix, rng.integers(0, card.vocab_size, size=input_len)])
        sampling = inference_pb2.SamplingParameters(
            temperature=args.temperature, max_tokens=output_len, ignore_eos=True
        )
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=ids.tolist()), sampling=sampling, model=card.name
        )
        work.append((request, RequestRecord(prompt_len=len(ids), output_len=output_len)))
    return work


async def _send(stub, request, record: RequestRecord, metadata, timeout: float) -> None:
    # Two appends per message and nothing per token: the loop body is all that runs between reads.
    arrivals, counts, clock = record.arrival_times, record.token_counts, time.perf_counter
    last = None
    record.send_time = clock()
    try:
        async for last in stub.Generate(request, metadata=metadata, timeout=timeout):
            arrivals.append(clock())
            counts.append(len(last.token_ids))
    except grpc.aio.AioRpcError as error:
        record.error = error.code().name
        return
    if not any(counts):
        record.error = "EMPTY_STREAM"
    elif last.finish_reason in ("error", "abort"):
        record.error = f"FINISHED_{last.finish_reason.upper()}"


async def _closed_loop(stub, work, concurrency: int, metadata, timeout: float) -> None:
    pending = iter(work)  # shared: next() has no await, so each item goes to exactly one worker

    async def worker() -> None:
        for request, record in pending:
            await _send(stub, request, record, metadata, timeout)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(work)))))


async def _open_loop(stub, work, offsets: np.ndarray, metadata, timeout: float) -> None:
    start = time.perf_counter()
    tasks = []
    for (request, record), offset in zip(work, offsets.tolist(), strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_send(stub, request, record, metadata, timeout)))
    await asyncio.gather(*tasks)


def _pick_model(models, name: str | None) -> inference_pb2.ModelCard:
    for card in models:
        if name is None or card.name == name:
            if card.vocab_size < 1:
                raise ValueError(f"ListModels gives no vocab_size for {card.name!r}")
            return card
    served = ", ".join(card.name for card in models) or "none"
    raise ValueError(f"--model {name!r}: not among the served models ({served})")


async def _measure(args: argparse.Namespace) -> dict:
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    async with grpc.aio.insecure_channel(args.server) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        listed = await stub.ListModels(
            inference_pb2.ListModelsRequest(), metadata=metadata, timeout=CONTROL_TIMEOUT_S
        )
        card = _pick_model(listed.models, args.model)
        rng = np.random.default_rng(args.seed)
        work = build_workload(args, rng, card)
        start = time.perf_counter()
        if args.request_rate is None:
            await _closed_loop(stub, work, args.concurrency, metadata, args.timeout)
        else:
            offsets = poisson_arrival_times(rng, len(work), args.request_rate)
            await _open_loop(stub, work, offsets, metadata, args.timeout)
        duration = time.perf_counter() - start
    config = {key: getattr(args, key) for key in CONFIG_KEYS}
    config.update(model=card.name, vocab_size=card.vocab_size)
    records = [record for _, record in work]
    return {"config": config, **summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)}


def request_latencies(record: RequestRecord) -> tuple[float, float, float, int]:
    """(TTFT, TPOT, E2E) in seconds and the token count of one stream with at least one token."""
    tokens = sum(record.token_counts)
    first = next(i for i, count in enumerate(record.token_counts) if count > 0)
    ttft = record.arrival_times[first] - record.send_time
    e2e = record.arrival_times[-1] - record.send_time
    tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else math.nan
    return ttft, tpot, e2e, tokens


def inter_token_latencies(
    arrival_times: Sequence[float], token_counts: Sequence[int]
) -> np.ndarray:
    """One gap per token after the first, by the rule in the module docstring."""
    times = np.asarray(arrival_times, dtype=np.float64)
    counts = np.asarray(token_counts, dtype=np.int64)
    with_tokens = counts > 0
    times, counts = times[with_tokens], counts[with_tokens]
    gaps = np.zeros(max(int(counts.sum()) - 1, 0))
    # message i >= 1 begins at token cumsum[i-1], whose gap is slot cumsum[i-1] - 1
    gaps[np.cumsum(counts)[:-1] - 1] = np.diff(times)
    return gaps


def latency_summary(seconds: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds, NaNs (undefined values) left out."""
    values = np.asarray(seconds, dtype=np.float64)
    values = values[~np.isnan(values)] * 1e3
    if values.size == 0:
        return dict.fromkeys(STAT_NAMES)
    stats = [values.mean(), *np.percentile(values, PERCENTILES)]
    return {name: float(value) for name, value in zip(STAT_NAMES, stats, strict=True)}


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    ok = [record for record in records if record.error is None]
    latencies = np.array([request_latencies(record) for record in ok], dtype=np.float64)
    ttft, tpot, e2e, tokens = latencies.reshape(-1, 4).T
    itl = [inter_token_latencies(r.arrival_times, r.token_counts) for r in ok]
    good = np.ones(len(ok), dtype=bool)
    if slo_ttft_ms is not None:
        good &= ttft * 1e3 <= slo_ttft_ms
    if slo_tpot_ms is not None:
        good &= np.isnan(tpot) | (tpot * 1e3 <= slo_tpot_ms)
    input_tokens = sum(record.prompt_len for record in ok)
    output_tokens = int(tokens.sum())
    with_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    return {
        "duration_s": duration_s,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(Counter(r.error for r in records if r.error).items())),
        # with ignore_eos every stream should end at exactly max_tokens
        "output_len_mismatches": sum(
            int(n) != r.output_len for n, r in zip(tokens, ok, strict=True)
        ),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "goodput": int(good.sum()) / duration_s if with_slo else None,
        "ttft_ms": latency_summary(ttft),
        "tpot_ms": latency_summary(tpot),
        "itl_ms": latency_summary(np.concatenate(itl) if itl else []),
        "e2e_ms": latency_summary(e2e),
    }


def format_report(report: dict) -> str:
    r = report
    errors = ", ".join(f"{code} {n}" for code, n in r["errors"].items()) or "none"
    lines = [
        f"{r['completed']}/{r['num_requests']} requests ok in {r['duration_s']:.2f} s; "
        f"errors: {errors}",
        f"{r['request_throughput']:.2f} req/s, {r['output_token_throughput']:.1f} output tok/s, "
        f"{r['total_token_throughput']:.1f} total tok/s, goodput "
        + (f"{r['goodput']:.2f} req/s" if r["goodput"] is not None else "- (no SLO given)"),
        "ms    " + "".join(f"{name:>9}" for name in STAT_NAMES),
    ]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        cells = (f"{v:9.2f}" if v is not None else f"{'-':>9}" for v in r[f"{metric}_ms"].values())
        lines.append(f"{metric.upper():<6}" + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    report = asyncio.run(_measure(args))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.out_dir:
        from workers.bench.results import write_result

        config = {k: v for k, v in vars(args).items() if k not in ("api_key", "out", "report")}
        summary = f"{report['completed']}/{report['num_requests']} ok"
        if report["completed"]:
            summary += (
                f", {report['output_token_throughput']:.1f} output tok/s, TTFT p50 "
                f"{report['ttft_ms']['p50']:.1f} ms, ITL p50 {report['itl_ms']['p50']:.1f} ms"
            )
        write_result(
            "serving", config, report, summary=summary, out_dir=args.out_dir, report=args.report
        )
    print(format_report(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afs loadtest", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        print(f"afs loadtest: error: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"afs loadtest: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
