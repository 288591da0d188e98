"""The in-process engine against transformers' generate() on the same model, prompts and dtype.

    python benchmarks/engine_vs_hf.py [--model smollm2-135m-instruct] [--new-tokens 128]
                                      [--batch 16] [--dtype float32] [--device cpu]

Batch-1 decode tokens/s (time after the first token) and the throughput of `--batch` concurrent
prompts (all generated tokens over wall time, prefill included), each with `ignore_eos` so both
sides generate exactly `--new-tokens`. Prints a table last; writes JSON under benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from workers.bench.latency import hf_first_and_total, hf_generate
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "How do airplanes stay in the air?",
    "Describe a cat in five sentences.",
    "What is the difference between weather and climate?",
    "Give me a recipe for pancakes.",
    "What causes earthquakes?",
    "Summarise the plot of Cinderella.",
    "How does a computer store numbers?",
    "What are the planets of the solar system?",
    "Tell me a fun fact about octopuses.",
    "How do vaccines work?",
    "What is a prime number?",
]


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` chat prompts, the questions in turn, as token ids."""
    questions = (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]
    return [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
        for q in questions
    ]


def engine_figures(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    engine.add_request(prompts[0], params)
    first = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first is None and any(o.new_token_ids for o in outputs):
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (new_tokens - 1) / (end - first)

    start = time.perf_counter()
    results = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    generated = sum(len(r.completions[0].token_ids) for r in results)
    return {
        "batch1_decode_tok_s": decode,
        "batch_throughput_tok_s": generated / wall,
        "batch_wall_s": wall,
        "batch_generated_tokens": generated,
    }


def hf_figures(model, prompts: list[list[int]], new_tokens: int) -> dict:
    hf_generate(model, prompts[:1], 4)  # warm-up
    one, full = hf_first_and_total(model, prompts[0], new_tokens, repeats=1)  # one run each
    wall = hf_generate(model, prompts, new_tokens)
    return {
        "batch1_decode_tok_s": (new_tokens - 1) / (full - one),
        "batch_throughput_tok_s": len(prompts) * new_tokens / wall,
        "batch_wall_s": wall,
        "batch_generated_tokens": len(prompts) * new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quantization", default="none,int4", help="ours, comma-separated: none and/or int4"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    ours = {}
    for quantization in args.quantization.split(","):
        engine = LLMEngine(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            kv_cache_gib=0.5,
            quantization=quantization,
        )
        prompts = chat_prompts(engine.tokenizer, args.batch)
        ours[f"afs {args.dtype} quantization={quantization}"] = engine_figures(
            engine, prompts, args.new_tokens
        )

    import transformers

    source, dtype = engine.source, engine.model_config.torch_dtype
    if source.kind == "gguf":
        path = Path(source.path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        )
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    hf = hf.to(engine.device).eval()
    peer = hf_figures(hf, prompts, args.new_tokens)

    command = "python benchmarks/engine_vs_hf.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )
    result = {
        "command": command,
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "engine": ours,
        f"transformers generate {args.dtype}": peer,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_vs_hf_{args.device}_{args.dtype}.json"
    path.write_text(json.dumps(result, indent=2))
    figures = ("batch1_decode_tok_s", "batch_throughput_tok_s")
    header = f"b{args.batch} tok/s"
    print(f"{'run':<36} {'b1 decode tok/s':>16} {header:>10}  ratio to transformers")
    peer_name = f"transformers generate {args.dtype}"
    print(f"{peer_name:<36} {peer[figures[0]]:16.1f} {peer[figures[1]]:10.1f}")
    for name, row in ours.items():
        ratios = " / ".join(f"{row[f] / peer[f]:.2f}" for f in figures)
        print(f"{name:<36} {row[figures[0]]:16.1f} {row[figures[1]]:10.1f}  {ratios}")


if __name__ == "__main__":
    main()
