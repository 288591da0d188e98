"""Model configuration: one frozen dataclass, built from an HF `config.json` or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("Olmo2ForCausalLM", "LlamaForCausalLM")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn 'bf16', 'bfloat16', 'torch.bfloat16' or a torch.dtype into a torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(
                f"dtype: {name} is not supported; use one of float32, bfloat16, float16"
            )
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and constants a model needs, whatever file format they came from."""

    architecture: str
    """HF `architectures[0]`: selects the model class in `workers/models/registry.py`."""
    vocab_size: int
    """Rows of the embedding and the LM head (Olmo 2 pads its vocabulary to 100352)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP's gate and up projections."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """K/V heads; fewer than the query heads means grouped-query attention."""
    head_dim: int
    """Width of one head: hidden_size // num_attention_heads unless the checkpoint says."""
    max_position_embeddings: int
    """Longest context the model was trained for; prompts plus outputs may not exceed it."""
    rms_norm_eps: float
    """Epsilon inside every RMSNorm."""
    rope_theta: float
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling as HF writes it (Llama 3's `rope_type: llama3`), or None."""
    tie_word_embeddings: bool = False
    """The LM head shares the embedding matrix."""
    attention_bias: bool = False
    """The Q, K, V and output projections carry biases (some Llama variants)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if the model has one."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation."""
    pad_token_id: int | None = None
    """Padding token, if any (never used by the engine, kept for tokenizers)."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Facts about the source that models do not need (file format, quantization types)."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture: {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        parse_dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V that one token occupies in the KV slab, over all layers."""
        element = torch.empty((), dtype=dtype or self.torch_dtype).element_size()
        return 2 * self.num_hidden_layers * self.kv_size * element

    def with_dtype(self, dtype: str | torch.dtype) -> ModelConfig:
        return dataclasses.replace(self, dtype=dtype_name(parse_dtype(dtype)))

    @classmethod
    def from_hf_dict(
        cls, cfg: dict[str, Any], dtype: str | torch.dtype | None = None
    ) -> ModelConfig:
        """Build from the contents of an HF `config.json`."""
        architectures = cfg.get("architectures") or []
        if not architectures:
            raise ValueError("config.json: 'architectures' is missing or empty")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            if dtype is None:
                dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            return cls(
                architecture=architectures[0],
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(cfg)),
                rope_scaling=_rope_scaling(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=cfg.get("pad_token_id"),
                dtype=dtype_name(parse_dtype(dtype)),
            )
        except KeyError as missing:
            raise ValueError(f"config.json: required field {missing} is missing") from None


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta under rope_parameters; older configs keep it at the top.
    params = cfg.get("rope_parameters") or {}
    return cfg.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; supported: llama3")
    return dict(scaling)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (one replica's step loop) is built from; `afs` flags map onto it."""

    model: str = "smollm2-135m-instruct"
    """Model name: the embedded default, a directory, a .gguf file, dummy:olmo2-*, or a hub id."""
    dtype: str | None = None
    """Parameter and KV dtype; None picks fp32 on CPU and the checkpoint's half type on CUDA."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    seed: int = 0
    """Seeds the per-request seeds assigned to requests that bring none."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_gib: float = 1.0
    """KV slab size on CPU, in GiB."""
    gpu_memory_utilization: float = 0.9
    """On CUDA, the fraction of device memory the weights, activations and KV slab may use."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks, overriding both budgets (tests use tiny slabs)."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step: new tokens over all scheduled requests. None: 8192 on CUDA (a
    whole batch of prompts in one or two steps, as vLLM's server takes on large GPUs), 2048 on
    CPU (see `token_budget`)."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; None means the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse the K/V of full blocks shared with earlier requests."""
    attention_backend: str = "auto"
    """torch_ref, or auto (the fastest available on the device)."""
    quantization: str = "none"
    """Linear weights: none (as loaded), or int4 (weight-only, groups of 32; CPU)."""
    tp: int = 1
    """Tensor-parallel ranks: the model's heads and MLP split over this many processes."""
    async_scheduling: bool | None = None
    """Queue the next decode step before this step's sampled ids reach the host (None: on
    CUDA). Outputs are the same either way."""
    enforce_eager: bool = False
    """On CUDA, run decode steps eagerly instead of replaying captured CUDA graphs (at tp > 1 the
    graphs need the ranks' GPUs to reach each other's memory; where they cannot, decode runs
    eagerly)."""
    warm_up: bool | None = None
    """Before serving, run made-up requests that reach every kind of step (workers/engine/
    warm_up.py), so that no real request waits for a kernel to compile (None: on CUDA)."""
    detokenize: bool = True
    """Produce text deltas and match stop strings here; a cluster's workers leave both to the
    gateway, which sees the whole stream even across a failover."""

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "tp": self.tp,
        }
        if self.max_num_batched_tokens is not None:
            positive["max_num_batched_tokens"] = self.max_num_batched_tokens
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib: must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.dtype is not None:
            parse_dtype(self.dtype)

    def token_budget(self, device: torch.device) -> int:
        """The step's token budget on `device`: `max_num_batched_tokens`, or its default there.

        On a GPU, prompts of 8192 tokens in one step measured 1.9% more end-to-end throughput than
        2048 (7B, 64 prompts of 128 tokens, 256 new each, on an H200); the decode steps that follow
        are the same. On a CPU a step of 2048 tokens already takes seconds.
        """
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if device.type == "cuda" else 2048

    def resolved_warm_up(self, device: torch.device) -> bool:
        """Whether the engine warms up on `device` (`warm_up`, or by default on CUDA only: on a
        CPU nothing is compiled at the first step)."""
        return self.warm_up if self.warm_up is not None else device.type == "cuda"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"device: {self.device!r} is not a device; use cpu, cuda or auto"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} asked for, but no CUDA device is present")
        return device
