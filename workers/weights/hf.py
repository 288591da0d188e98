"""HF checkpoint directories: `config.json` and safetensors, single or sharded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from workers.config import ModelConfig
from workers.weights.lazy import LazyTensor

INDEX_FILE = "model.safetensors.index.json"


def load_hf_config(path: str | Path, dtype: str | torch.dtype | None = None) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; an HF model directory needs one")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None
    return ModelConfig.from_hf_dict(raw, dtype=dtype)


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's files: those the shard index names, else every *.safetensors."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index}: not a valid shard index ({error})") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{root}: shards named in {INDEX_FILE} are missing: {absent}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{root}: no *.safetensors files (PyTorch .bin checkpoints are not supported)"
        )
    return files


class SafetensorsSlice(LazyTensor):
    """A tensor of a safetensors file, read through the library's slice API."""

    def __init__(self, file: Path, name: str, source) -> None:
        super().__init__(name, source.get_shape())
        self.file, self.source = file, source

    def materialize(self) -> torch.Tensor:
        try:
            return self.source[tuple(slice(start, stop) for start, stop in self.bounds)]
        except Exception as error:
            raise ValueError(
                f"{self.file}: tensor {self.name!r} cannot be read ({error})"
            ) from None


def iter_safetensors_weights(path: str | Path) -> Iterator[tuple[str, SafetensorsSlice]]:
    """Yield (HF name, lazy tensor) for every tensor of the checkpoint, one file open at a time."""
    for file in safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except Exception as error:  # the library raises its own error types for corrupt headers
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
        for name in names:
            try:
                source = handle.get_slice(name)
            except Exception as error:
                raise ValueError(f"{file}: tensor {name!r} cannot be read ({error})") from None
            yield name, SafetensorsSlice(file, name, source)
