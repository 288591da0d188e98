"""The `afs` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence

from workers.config import EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.model_info import describe_model
from workers.weights.loader import DEFAULT_MODEL, load_model

# `afs bench NAME` -> the module that serves it: `add_arguments(parser)` and `run(args) -> Path`
BENCH_COMMANDS = {
    "ceilings": "workers.bench.ceilings",
    "latency": "workers.bench.latency",
    "throughput": "workers.bench.throughput",
    "kernels": "workers.bench.kernels",
    "report": "workers.bench.report",
}


class _Parser(argparse.ArgumentParser):
    """Bad flags: exit 2 with one line on stderr, not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="afs", description="Attention From Scratch: LLM serving from scratch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="describe a model: shapes, parameters, bytes")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name or path")
    info.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument(
        "--load", action="store_true", help="also load the weights and report the time it took"
    )
    info.add_argument("--device", default="cpu", help="device for --load: cpu, cuda, cuda:N")
    gen = commands.add_parser("generate", help="generate text in-process, streamed to stdout")
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model name or path")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 disables")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--server", default=None, help="HOST:PORT of a running afs serve")
    gen.add_argument("--api-key", default=None, help="with --server: the server's API key")
    _engine_flags(gen)

    serve = commands.add_parser("serve", help="serve a model over gRPC from a Ray cluster")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="model name or path")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--address", default="local", help="local, auto, or HOST:PORT of Ray")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--metrics-port", type=int, default=9400)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--max-queue", type=int, default=1024)
    serve.add_argument("--cpus-per-worker", type=float, default=1.0)
    serve.add_argument("--gpus-per-worker", type=float, default=None)
    serve.add_argument("--sample", action="store_true", help="stream a sample chat answer first")
    serve.add_argument("--demo", action="store_true", help="stream a sample answer, then exit")
    _engine_flags(serve)

    # listed here for --help; `main` hands it to cluster/loadtest.py before this parser runs (its
    # flags need the generated gRPC modules, so the rest of the CLI works where those are absent)
    commands.add_parser(
        "loadtest", help="load-test a running server over gRPC (afs loadtest --help)"
    )

    bench = commands.add_parser("bench", help="benchmarks: a JSON result and a report row each")
    benches = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    for name, module_name in BENCH_COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(benches.add_parser(name, help=module.__doc__.splitlines()[0]))
    return parser


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto EngineConfig fields (model excepted)."""
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV slab size on CPU")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of one step (default: 8192 on CUDA, 2048 on CPU)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--quantization", default="none", help="none, or int4 (weight-only, CPU)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: no graphs for decode steps"
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="CUDA: serve without first running made-up requests that compile every kernel",
    )
    parser.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="CUDA: wait for each step's sampled ids before queueing the next step",
    )


def engine_config_from_args(args: argparse.Namespace, detokenize: bool = True) -> EngineConfig:
    return EngineConfig(
        detokenize=detokenize,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        quantization=args.quantization,
        tp=args.tp,
        enforce_eager=args.enforce_eager,
        async_scheduling=False if args.no_async_scheduling else None,
        warm_up=False if args.no_warm_up else None,
    )


def _serve(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig
    from cluster.serve import serve_main

    config = ClusterConfig(
        engine=engine_config_from_args(args, detokenize=False),
        replicas=args.replicas,
        address=args.address,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        api_key=args.api_key,
        max_queue=args.max_queue,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
    )
    return serve_main(config, sample=args.sample, demo=args.demo)


def _loadtest(argv: Sequence[str]) -> int:
    from cluster import loadtest

    return loadtest.main(argv)


def _sampling_from_args(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _generate_remote(args: argparse.Namespace) -> int:
    from cluster.client import AfsClient

    client = AfsClient(args.server, api_key=args.api_key)
    sampling = {k: v for k, v in _sampling_from_args(args).items() if v is not None}
    if args.chat:
        stream = client.chat_stream(_chat_messages(args), **sampling)
    else:
        stream = client.generate_stream(args.prompt, **sampling)
    start, first, last = time.perf_counter(), None, None
    for last in stream:
        if first is None and last.token_ids:
            first = time.perf_counter()
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    end = time.perf_counter()
    if last is not None and last.finished:
        usage = last.usage
        print(
            f"[{usage.prompt_tokens} prompt tokens, "
            f"first token after {(first or end) - start:.2f} s; "
            f"{usage.completion_tokens} generated in {end - start:.2f} s; "
            f"finish: {last.finish_reason}; server {args.server}]",
            file=sys.stderr,
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.server:
        return _generate_remote(args)
    params = SamplingParams(**_sampling_from_args(args))
    config = engine_config_from_args(args)
    from workers.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    try:
        return _stream_in_process(engine, args, params)
    finally:
        engine.shutdown()


def _chat_messages(args: argparse.Namespace) -> list[dict]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return [*messages, {"role": "user", "content": args.prompt}]


def _stream_in_process(engine, args: argparse.Namespace, params: SamplingParams) -> int:
    prompt = args.prompt
    if args.chat:
        if engine.tokenizer is None:
            raise ValueError("--chat: this model has no tokenizer or chat template")
        prompt = engine.tokenizer.apply_chat_template(_chat_messages(args))
    start = time.perf_counter()
    engine.add_request(prompt, params)
    first_token_at = None
    output = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if first_token_at is None and output.new_token_ids:
                first_token_at = time.perf_counter()
            sys.stdout.write(output.text_delta)
            sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    if output is not None and output.error:
        raise ValueError(output.error)
    usage = output.usage
    prefill = (first_token_at or end) - start
    decode_tokens = max(usage.completion_tokens - 1, 0)
    decode_rate = decode_tokens / (end - first_token_at) if first_token_at and decode_tokens else 0
    print(
        f"[{usage.prompt_tokens} prompt tokens in {prefill:.2f} s "
        f"({usage.prompt_tokens / prefill:.1f} tok/s); {usage.completion_tokens} generated, "
        f"decode {decode_rate:.1f} tok/s; finish: {output.finish_reason}; "
        f"load {engine.load_seconds:.2f} s on {engine.device}]",
        file=sys.stderr,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    path = importlib.import_module(BENCH_COMMANDS[args.bench_command]).run(args)
    print(f"result: {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    facts = describe_model(args.model, dtype=args.dtype, device=args.device)
    if args.load:
        loaded = load_model(args.model, dtype=facts["dtype"], device=args.device)
        facts["load_seconds"] = round(loaded.load_seconds, 3)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        return _loadtest(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        commands = {
            "info": _info,
            "generate": _generate,
            "serve": _serve,
            "bench": _bench,
        }
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"afs {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
