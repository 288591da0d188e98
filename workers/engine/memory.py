"""How much device memory the KV slab may take on CUDA.

Run one forward at the largest step the scheduler can build (the token budget, in prompts no
longer than the model's context) over a temporary slab, note the peak, and give the slab what is
left under the utilization cap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.attention import build_attention_metadata, get_backend
from workers.engine.kv_cache import allocate_kv_slab
from workers.forward_context import ForwardContext, forward_context

if TYPE_CHECKING:
    from workers.worker import ShardWorker


def largest_step(budget: int, max_model_len: int, max_num_seqs: int) -> list[int]:
    """The prompt lengths of the largest step the scheduler can build: the whole token budget, in
    prompts no longer than the model's context and no more of them than `max_num_seqs`."""
    tokens = min(budget, max_model_len * max_num_seqs)
    lengths = [max_model_len] * (tokens // max_model_len)
    if tokens % max_model_len:
        lengths.append(tokens % max_model_len)
    return lengths


@torch.inference_mode()
def profile_free_kv_bytes(engine: ShardWorker, utilization: float) -> int:
    config, model_config, device = engine.config, engine.model_config, engine.device
    lengths = largest_step(config.token_budget(device), engine.max_model_len, config.max_num_seqs)
    tokens = sum(lengths)
    tables, blocks = [], 0
    for length in lengths:
        count = -(-length // config.block_size)
        tables.append(list(range(blocks, blocks + count)))
        blocks += count
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    slab = allocate_kv_slab(
        model_config.num_hidden_layers,
        blocks,
        config.block_size,
        engine.num_kv_heads,
        model_config.head_dim,
        model_config.torch_dtype,
        device,
    )
    slab_bytes = sum(t.numel() * t.element_size() for t in slab)
    meta = build_attention_metadata(tables, [0] * len(lengths), lengths, config.block_size, device)
    input_ids = torch.randint(0, model_config.vocab_size, (tokens,), device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    backend = get_backend(config.attention_backend, device.type)
    with forward_context(ForwardContext(meta, slab, backend)):
        hidden = engine.model(input_ids, positions)
    engine.model.compute_logits(hidden[-min(tokens, config.max_num_seqs) :])
    torch.cuda.synchronize(device)
    peak_without_slab = torch.cuda.max_memory_allocated(device) - slab_bytes
    del slab, hidden
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)  # context, other processes
    return int(total * utilization - outside_torch - peak_without_slab)
