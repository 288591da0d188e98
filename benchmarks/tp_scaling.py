"""Tensor parallelism on one machine: the same engine figures at several tp sizes.

    python benchmarks/tp_scaling.py [--model smollm2-135m-instruct] [--tp 1,3] [--device cpu]

Batch-1 decode tokens/s and the throughput of 16 chat prompts x 128 tokens (as in
engine_vs_hf.py), at each tp; on CPU the ranks are processes talking over gloo and share the
machine's cores. Prints a table last; writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from engine_vs_hf import chat_prompts, engine_figures

from workers.bench.results import git_commit
from workers.engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tp", default="1,3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = {}
    for tp in [int(t) for t in args.tp.split(",")]:
        engine = LLMEngine(model=args.model, device=args.device, tp=tp, kv_cache_gib=0.5)
        try:
            prompts = chat_prompts(engine.tokenizer, args.batch)
            rows[tp] = engine_figures(engine, prompts, args.new_tokens)
        finally:
            engine.shutdown()
    result = {
        "command": "python benchmarks/tp_scaling.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "git_commit": git_commit(),
        "model": args.model,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tp_scaling_{args.device}.json").write_text(json.dumps(result, indent=2))
    base = rows[min(rows)]
    print(f"{'tp':>3} {'b1 decode tok/s':>16} {f'b{args.batch} tok/s':>10} {'vs first':>9}")
    for tp, row in rows.items():
        ratio = row["batch1_decode_tok_s"] / base["batch1_decode_tok_s"]
        print(
            f"{tp:>3} {row['batch1_decode_tok_s']:16.1f} {row['batch_throughput_tok_s']:10.1f} "
            f"{ratio:9.2f}"
        )


if __name__ == "__main__":
    main()
