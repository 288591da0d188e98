"""Load each dummy Olmo 2 model on the GPU in bf16, time it, and check a prefill stays finite.

    PYTHONPATH=. python3 benchmarks/load_dummy.py [--models 1b,7b] [--out DIR]

Prints a table last and writes `load_dummy.json` under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from workers.attention import build_attention_metadata, get_backend
from workers.engine.kv_cache import allocate_kv_slab
from workers.forward_context import ForwardContext, forward_context
from workers.models.olmo2 import stream_after
from workers.weights.loader import load_model


@torch.no_grad()
def prefill_check(loaded, prompt_len: int = 128, batch: int = 4) -> dict:
    """One prefill of `batch` random prompts through the paged slab; per-layer output RMS."""
    model, config = loaded.model, loaded.config
    block_size = 16
    blocks_per_seq = -(-prompt_len // block_size)
    slab = allocate_kv_slab(
        config.num_hidden_layers,
        batch * blocks_per_seq,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
        config.torch_dtype,
        "cuda",
    )
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    meta = build_attention_metadata(tables, [0] * batch, [prompt_len] * batch, block_size, "cuda")
    input_ids = torch.randint(0, config.vocab_size, (batch * prompt_len,), device="cuda")
    positions = torch.arange(prompt_len, device="cuda").repeat(batch)
    rms = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out: rms.append(stream_after(out).float().pow(2).mean().sqrt())
        )
        for layer in model.model.layers
    ]
    with forward_context(ForwardContext(meta, slab, get_backend("torch_ref"))):
        hidden = model(input_ids, positions)
    for hook in hooks:
        hook.remove()
    logits = model.compute_logits(hidden[prompt_len - 1 :: prompt_len])
    rms = torch.stack(rms).cpu()
    return {
        "finite": bool(torch.isfinite(rms).all() and torch.isfinite(logits).all()),
        "layer_rms_first_last_max": [float(rms[0]), float(rms[-1]), float(rms.max())],
        "logits_std": float(logits.std()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="1b,7b,13b,32b")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    context_seconds = time.perf_counter() - start
    rows = []
    for size in args.models.split(","):
        name = f"dummy:olmo2-{size}"
        loaded = load_model(name, dtype="bfloat16", device="cuda")
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        row = {
            "model": name,
            "load_seconds": loaded.load_seconds,
            "weight_bytes": weight_bytes,
            "init_GBps": weight_bytes / loaded.load_seconds / 1e9,
            **prefill_check(loaded),
        }
        rows.append(row)
        del loaded
        torch.cuda.empty_cache()
    result = {
        "command": "PYTHONPATH=. python3 benchmarks/load_dummy.py --models " + args.models,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cuda_context_seconds": context_seconds,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_dummy.json").write_text(json.dumps(result, indent=2))
    print(f"CUDA context: {context_seconds:.2f} s on {result['gpu']}")
    print(f"{'model':<18} {'load s':>7} {'GB':>6} {'finite':>6} {'rms last':>8} {'logit std':>9}")
    for r in rows:
        print(
            f"{r['model']:<18} {r['load_seconds']:7.2f} {r['weight_bytes'] / 1e9:6.1f} "
            f"{str(r['finite']):>6} {r['layer_rms_first_last_max'][1]:8.2f} {r['logits_std']:9.3f}"
        )


if __name__ == "__main__":
    main()
