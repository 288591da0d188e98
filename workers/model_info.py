"""Facts about a model without loading its weights: shapes, parameter count, bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.config import dtype_name
from workers.weights.loader import build_model, load_config, resolve_dtype, resolve_model


def describe_model(name: str, dtype: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """The model built on the meta device (no memory), measured parameter by parameter."""
    source = resolve_model(name)
    config = load_config(source)
    config = config.with_dtype(resolve_dtype(config, dtype, device))
    model = build_model(config, "meta")
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    facts: dict[str, Any] = {
        "model": name,
        "format": source.kind,
        "path": source.path,
        "architecture": config.architecture,
        "parameters": parameters,
        "dtype": dtype_name(config.torch_dtype),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_word_embeddings,
        "kv_bytes_per_token": config.kv_bytes_per_token(),
        "weight_bytes": weight_bytes,
    }
    if source.kind != "dummy":
        files = [Path(source.path)] if source.kind == "gguf" else Path(source.path).iterdir()
        facts["checkpoint_bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    if "tensor_types" in config.extra:
        facts["checkpoint_tensor_types"] = config.extra["tensor_types"]
    return facts
