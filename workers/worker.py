"""One tensor-parallel rank's part of an engine: its model shard, its KV slab and the runner.

Rank 0 (inside `LLMEngine`) schedules, broadcasts each step's `SchedulerOutput` and samples; the
other ranks run `follow`: receive the step, run the same forward over their shard (joining every
collective), and wait for the next. All ranks size their slab the same way and agree on the
smallest count, so a block id means the same slots everywhere.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import torch

from workers.attention import get_backend
from workers.config import EngineConfig
from workers.decode_graphs import DecodeGraphs
from workers.distributed import (
    Lockstep,
    check_peer_collectives,
    destroy_tensor_parallel,
    divide,
    get_tp_size,
    init_peer_collectives,
    init_tensor_parallel,
    set_lockstep,
    tp_broadcast_object,
    tp_broadcast_tensor,
    tp_min,
    warm_peer_broadcast,
    warm_peer_post_norm,
)
from workers.engine.kv_cache import allocate_kv_slab, kv_block_bytes
from workers.layers.sampler import Sampler
from workers.model_runner import ModelRunner
from workers.weights.loader import load_config, load_model, resolve_model

_GIB = 1 << 30


def check_tensor_parallel(config: EngineConfig) -> None:
    """A tp that does not divide what it must: a clear error before anything loads."""
    if config.tp == 1:
        return
    model = load_config(resolve_model(config.model))
    divide(model.num_attention_heads, config.tp, "num_attention_heads")
    if model.num_key_value_heads >= config.tp:
        divide(model.num_key_value_heads, config.tp, "num_key_value_heads")
    else:
        divide(config.tp, model.num_key_value_heads, "tp over num_key_value_heads")
    divide(model.intermediate_size, config.tp, "intermediate_size")


def free_rendezvous() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class ShardWorker:
    def __init__(self, config: EngineConfig, device: torch.device, sampler: bool) -> None:
        self.config, self.device = config, device
        loaded = load_model(
            config.model,
            dtype=config.dtype,
            device=device,
            seed=config.seed,
            quantization=config.quantization,
        )
        self.loaded = loaded
        self.model, self.model_config = loaded.model, loaded.config
        model_config = self.model_config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len: {self.max_model_len} exceeds the model's context length "
                f"{model_config.max_position_embeddings}"
            )
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.sampler = None
        if sampler:
            tokenizer = loaded.tokenizer
            self.eos_token_ids = set(model_config.eos_token_ids)
            if tokenizer is not None:
                self.eos_token_ids |= set(tokenizer.eos_token_ids)
            sampleable = tokenizer.vocab_size if tokenizer is not None else None
            self.sampler = Sampler(model_config.vocab_size, sampleable, tuple(self.eos_token_ids))
        self.num_kv_blocks = tp_min(self._kv_blocks())
        kv_caches = allocate_kv_slab(
            model_config.num_hidden_layers,
            self.num_kv_blocks,
            config.block_size,
            self.num_kv_heads,
            model_config.head_dim,
            model_config.torch_dtype,
            device,
        )
        backend = get_backend(config.attention_backend, device.type)
        graphs = None
        if device.type == "cuda" and getattr(backend, "supports_padded_decode", False):
            eager = config.enforce_eager
            if config.tp > 1 and not eager:
                # graphs at tp > 1 hold the peer kernels, not NCCL: without them, run eagerly
                eager = not init_peer_collectives(self._peer_capacity(), device)
                if not eager:  # compiled now, not at the first step that needs them
                    norm = self.model.reducing_post_norm()
                    if norm is not None:
                        warm_peer_post_norm(norm.weight, norm.eps, model_config.torch_dtype)
                    warm_peer_broadcast(device)
            graphs = DecodeGraphs(
                self.model,
                kv_caches,
                backend,
                config.block_size,
                config.max_num_seqs,
                self.max_model_len,
                device,
                eager,
            )
        self.runner = ModelRunner(
            self.model, kv_caches, backend, self.sampler, config.block_size, device, graphs
        )

    def _peer_capacity(self) -> int:
        """Bytes the largest collective of a decode step moves: the hidden states of a full
        batch, or its slice of the logits (the LM head's gather)."""
        model_config = self.model_config
        vocab_slice = -(-model_config.vocab_size // self.config.tp)
        width = max(model_config.hidden_size, vocab_slice)
        return -(-self.config.max_num_seqs * width * model_config.torch_dtype.itemsize // 16) * 16

    def _kv_blocks(self) -> int:
        config, model_config = self.config, self.model_config
        block_bytes = kv_block_bytes(
            model_config.num_hidden_layers,
            config.block_size,
            self.num_kv_heads,
            model_config.head_dim,
            model_config.torch_dtype,
        )
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if self.device.type == "cuda":
            from workers.engine.memory import profile_free_kv_bytes

            budget = profile_free_kv_bytes(self, config.gpu_memory_utilization)
        else:
            budget = int(config.kv_cache_gib * _GIB)
        blocks = budget // block_bytes
        if blocks < 1:
            raise ValueError(
                f"the KV budget ({budget} bytes) holds no block of {block_bytes} bytes; "
                "raise kv_cache_gib or gpu_memory_utilization"
            )
        return blocks


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """CUDA ranks take one GPU each, rank r the r-th visible one: in one process tree all GPUs
    are visible; under Ray a replica's ranks see its GPUs in rank order (`share_replica_gpus`),
    or each only its own, as cuda:0."""
    device = config.resolved_device()
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return torch.device("cuda", rank)
    return device


def follow(config: EngineConfig, rank: int, rendezvous: str) -> None:
    """A rank other than 0: run every step rank 0 broadcasts until it broadcasts None."""
    device = rank_device(config, rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tp))
    init_tensor_parallel(rank, config.tp, rendezvous, device)
    try:
        worker = ShardWorker(config, device, sampler=False)
        while (schedule := tp_broadcast_object()) is not None:
            if isinstance(schedule, Lockstep):  # rank 0 is done compiling (see set_lockstep)
                set_lockstep(schedule.on)
                continue
            ids = None
            if schedule.ids_on_device:  # rank 0's draw of the step before, sent on the device
                ids = torch.empty(len(schedule.requests), dtype=torch.long, device=device)
                tp_broadcast_tensor(ids)
            worker.runner.execute(schedule, ids)
            check_peer_collectives()
    finally:
        destroy_tensor_parallel()


def follow_child(config: EngineConfig, rank: int, rendezvous: str) -> None:
    """`follow` in a process the engine spawned: it dies with the engine's process, however
    that ends (a rank left behind would hold its GPU, perhaps inside a collective)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    follow(config, rank, rendezvous)


def shutdown_followers() -> None:
    """Rank 0: tell the followers to stop."""
    if get_tp_size() > 1:
        tp_broadcast_object(None)
