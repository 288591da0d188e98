"""Batch-1 latency of the in-process engine: prefill time per prompt length, then decode.

    afs bench latency [--model dummy:olmo2-1b] [--prompt-lens 128,512,2048] [--new-tokens 128]
                      [--peer hf] [--device] [--dtype] ...

For each prompt length, one request of random token ids generates `--new-tokens` greedy tokens
with `ignore_eos`, after a warm-up request of the same length. Prefill is the time to the first
token; decode is (N − 1) tokens over the time after it. Floors come from the ceilings measured at
the start of the run: a decode token reads every weight and the K/V of its whole context. With
`--peer hf`, transformers' `generate()` runs the same prompts on our loaded weights copied into
its own class, whatever the model's format (identical weights, no GGUF reader needed); its decode
rate is (N − 1) / (t(N) − t(1)) with `min_new_tokens` forcing N tokens, each t the least of
three runs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from workers.bench.ceilings import (
    Roofline,
    add_common_arguments,
    free_memory,
    measure_ceilings,
    now,
    ratios,
    resolve_device,
)
from workers.bench.results import write_result
from workers.config import ModelConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.model_info import describe_model
from workers.models.base import FUSED_PROJECTIONS

DEFAULT_MODEL = "dummy:olmo2-1b"
# ModelConfig fields that transformers' Llama and Olmo2 configs take under the same name
_HF_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "bos_token_id", "pad_token_id",
)  # fmt: skip


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the benchmarks that drive the engine (latency, throughput)."""
    add_common_arguments(parser)
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="model name or path")
    add("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 CPU, bf16 GPU)")
    add("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: memory cap incl. slab")
    add("--kv-cache-gib", type=float, default=1.0, help="CPU: KV slab size")
    add("--seed", type=int, default=0, help="seeds the random prompts and the dummy weights")
    add("--peer", choices=("none", "hf"), default="none", help="hf: transformers' generate()")
    add("--attention-backend", default="auto", help="auto, triton or torch_ref")
    add("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    add("--enforce-eager", action="store_true", help="CUDA: no graphs for decode steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--prompt-lens", type=parse_lengths, default=(128, 512, 2048), help="comma-separated"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated, >= 2")


def parse_lengths(text: str) -> tuple[int, ...]:
    """A flag's comma-separated token counts, each >= 1."""
    try:
        lengths = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers") from None
    if min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be >= 1")
    return lengths


def prepare(args: argparse.Namespace, longest: int) -> tuple[torch.device, dict[str, Any]]:
    """The device and its ceilings in the model's dtype, after checking the model's context."""
    device = resolve_device(args.device)
    facts = describe_model(args.model, args.dtype, device.type)
    if longest > (context := facts["context_length"]):
        raise ValueError(f"{longest} prompt + output tokens exceed {args.model}'s {context}")
    ceilings = measure_ceilings(
        device, (facts["dtype"],), args.size_gib, args.repeats, args.matmul_size
    )
    return device, ceilings


def build_engine(args: argparse.Namespace, device: torch.device, **overrides) -> LLMEngine:
    return LLMEngine(
        model=args.model,
        device=str(device),
        dtype=args.dtype,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        detokenize=False,  # token ids only: the benchmark measures the model and the scheduler
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        tp=args.tp,
        **overrides,
    )


def engine_facts(engine: LLMEngine) -> dict[str, Any]:
    """How the engine runs, for a result's config: attention backend, graphs, scheduling, tp."""
    graphs = engine.runner.graphs
    return {
        "attention_backend": type(engine.runner.backend).__name__,
        "cuda_graphs": graphs is not None and bool(graphs.graphs),
        "async_scheduling": engine.async_scheduling,
        "tp": engine.config.tp,
    }


def random_tokens(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    # ids below 10000 as nano-vllm's benchmark draws them (every id of a small vocabulary)
    return [rng.randrange(min(vocab_size, 10000)) for _ in range(length)]


def hf_peer_model(model: nn.Module, config: ModelConfig) -> nn.Module:
    """transformers' class for the architecture on our device, holding a copy of our weights."""
    import transformers

    family = config.architecture.removesuffix("ForCausalLM")
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf_config = getattr(transformers, f"{family}Config")(
        **{name: getattr(config, name) for name in _HF_CONFIG_FIELDS},
        rope_parameters=rope,
        eos_token_id=list(config.eos_token_ids) or None,
    )
    with torch.device(next(model.parameters()).device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=config.torch_dtype)
    hf.load_state_dict(_unfused_state_dict(model, config), strict=True)
    return hf.eval()


def _unfused_state_dict(model: nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters under checkpoint names: fused qkv / gate_up split back into projections."""
    projections: dict[str, list[str]] = {}  # fused -> checkpoint projections in row order
    for projection, (fused, _) in FUSED_PROJECTIONS.items():
        projections.setdefault(fused, []).append(projection)
    rows = {
        "q_proj": config.q_size,
        "k_proj": config.kv_size,
        "v_proj": config.kv_size,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
    }
    state = {}
    for name, tensor in model.state_dict().items():
        prefix, _, tail = name.rpartition(".")  # tail: weight or bias
        module_path, _, owner = prefix.rpartition(".")
        if owner not in projections:
            state[name] = tensor
            continue
        parts = torch.split(tensor, [rows[p] for p in projections[owner]])  # along output rows
        for projection, part in zip(projections[owner], parts, strict=True):
            state[f"{module_path}.{projection}.{tail}"] = part
    return state


@torch.inference_mode()
def hf_generate(hf: nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for greedy `generate()` of exactly `new_tokens` per prompt, left-padded."""
    device = next(hf.parameters()).device
    pad = hf.config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # [B, S]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = now(device)
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )  # [B, S + new_tokens]
    seconds = now(device) - start
    if out.shape != (len(prompts), width + new_tokens):
        raise RuntimeError(f"generate() returned {tuple(out.shape)} tokens, not {new_tokens} new")
    return seconds


def hf_first_and_total(
    hf: nn.Module, prompt: list[int], new_tokens: int, repeats: int = 3
) -> tuple[float, float]:
    """Seconds of `generate()` for 1 token and for `new_tokens`, each the least of `repeats` runs.

    Noise only adds time, so the least of a few runs is the closest to the true time; one run of
    each could, for a small model on a busy CPU, put t(1) above t(N) and give a negative decode.
    The runs alternate, so that a busy spell falls on both.
    """
    runs = [
        (hf_generate(hf, [prompt], 1), hf_generate(hf, [prompt], new_tokens))
        for _ in range(repeats)
    ]
    first, total = min(r[0] for r in runs), min(r[1] for r in runs)
    if total <= first:
        raise RuntimeError(
            f"generate() of {new_tokens} tokens took {total * 1e3:.2f} ms, no longer than "
            f"{first * 1e3:.2f} ms for 1: too few new tokens to time its decode"
        )
    return first, total


def _latency(
    prompt_len: int, new_tokens: int, prefill_s: float, decode_s: float, roofline: Roofline
) -> tuple[dict[str, float], dict[str, float]]:
    """Figures and floors of one prompt length; decode token j reads a context of P + j."""
    prefill_floor = roofline.step_seconds([(0, prompt_len)], 1)
    steps = range(1, new_tokens)
    decode_floor = sum(roofline.step_seconds([(prompt_len + j - 1, 1)], 1) for j in steps)
    figures = {
        "prefill_ms": prefill_s * 1e3,
        "prefill_tok_s": prompt_len / prefill_s,
        "prefill_roofline_fraction": prefill_floor / prefill_s,
        "decode_tok_s": len(steps) / decode_s,
        "decode_ms_per_token": decode_s * 1e3 / len(steps),
        "decode_roofline_fraction": decode_floor / decode_s,
    }
    floors = {
        "prefill_ms": prefill_floor * 1e3,
        "decode_tok_s": len(steps) / decode_floor,
        "decode_ms_per_token": decode_floor * 1e3 / len(steps),
    }
    return figures, floors


def afs_times(
    engine: LLMEngine, prompt: list[int], new_tokens: int, bar: tqdm | None
) -> tuple[float, float]:
    """(time to the first token, time of the rest) of one greedy request."""
    engine.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    )
    start, first, generated = now(engine.device), None, 0
    while engine.has_unfinished_requests():
        new = sum(len(output.new_token_ids) for output in engine.step())
        if first is None and new:
            first = now(engine.device)
        generated += new
        if bar is not None:
            bar.update(new)  # cheap: tqdm redraws at most every 0.1 s
    end = now(engine.device)
    if generated != new_tokens:
        raise RuntimeError(f"the engine generated {generated} tokens, not {new_tokens}")
    return first - start, end - first


def run(args: argparse.Namespace) -> Path:
    prompt_lens = list(args.prompt_lens)
    if args.new_tokens < 2:
        raise ValueError(
            f"--new-tokens must be >= 2 (decode follows the first), got {args.new_tokens}"
        )
    device, ceilings = prepare(args, max(prompt_lens) + args.new_tokens)
    engine = build_engine(
        args,
        device,
        max_num_batched_tokens=max(2048, *prompt_lens),  # one prefill step per prompt
        enable_prefix_caching=False,  # every prompt is computed, never found in the cache
    )
    model, model_config = engine.model, engine.model_config
    roofline = Roofline.for_model(model, model_config, ceilings)
    rng = random.Random(args.seed)
    prompts = {n: random_tokens(rng, n, model_config.vocab_size) for n in prompt_lens}
    warmups = {n: random_tokens(rng, n, model_config.vocab_size) for n in prompt_lens}

    figures, floors = {}, {}
    for n, prompt in prompts.items():
        afs_times(engine, warmups[n], min(args.new_tokens, 8), None)
        with tqdm(total=args.new_tokens, desc=f"afs latency, prompt {n}", unit="tok") as bar:
            prefill_s, decode_s = afs_times(engine, prompt, args.new_tokens, bar)
        key = f"prompt_len_{n}"
        figures[key], floors[key] = _latency(n, args.new_tokens, prefill_s, decode_s, roofline)
    config = {
        "model": args.model,
        "dtype": model_config.dtype,
        "device": str(device),
        "prompt_lens": prompt_lens,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "weight_bytes": roofline.weight_bytes,
        "kv_bytes_per_token": roofline.kv_bytes_per_token,
        **engine_facts(engine),
    }
    engine.shutdown()  # the other ranks' processes, when tp > 1

    peers = {}
    if args.peer == "hf":
        del engine
        free_memory(device)  # the slab goes; the weights stay until copied
        hf = hf_peer_model(model, model_config)
        del model
        free_memory(device)
        peer = {}
        for n, prompt in tqdm(prompts.items(), desc="hf latency", unit="prompt"):
            hf_generate(hf, [warmups[n]], 2)
            first, total = hf_first_and_total(hf, prompt, args.new_tokens)
            peer_row, _ = _latency(n, args.new_tokens, first, total - first, roofline)
            peer[f"prompt_len_{n}"] = peer_row
        peers["hf"] = {
            "figures": peer,
            "afs_over_peer": ratios(figures, peer),
            "attn_implementation": hf.config._attn_implementation,
        }

    summary = _summary(figures, peers, prompt_lens)
    print(summary)
    return write_result(
        "latency", config, figures, {"ceilings": ceilings, **floors}, peers, summary,
        args.out_dir, args.report,
    )  # fmt: skip


def _summary(figures: dict[str, Any], peers: dict[str, Any], prompt_lens: list[int]) -> str:
    parts = []
    for n in prompt_lens:
        row = figures[f"prompt_len_{n}"]
        text = (
            f"P={n}: decode {row['decode_tok_s']:,.1f} tok/s "
            f"({row['decode_roofline_fraction']:.2f} of roofline), "
            f"prefill {row['prefill_ms']:,.1f} ms ({row['prefill_roofline_fraction']:.2f})"
        )
        if "hf" in peers:
            ratio = peers["hf"]["afs_over_peer"][f"prompt_len_{n}"]["decode_tok_s"]
            text += f", decode {ratio:.2f}× HF"
        parts.append(text)
    return "; ".join(parts)
