"""GGUF reading: our dequantizers against gguf's reference; files written with GGUFWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from workers.weights.gguf import dequantize, iter_gguf_weights, load_gguf_config

QUANTIZED = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]
FLOATS = [GGMLQuantizationType.F16, GGMLQuantizationType.BF16]


def _random_rows(seed: int, rows: int = 6, cols: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Rows of different scales, and an offset, so block scales and minimums both vary.
    scale = np.exp(rng.uniform(-4.0, 3.0, size=(rows, 1)))
    return (rng.standard_normal((rows, cols)) * scale + rng.uniform(-1, 1)).astype(np.float32)


@pytest.mark.parametrize("tensor_type", QUANTIZED + FLOATS, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(tensor_type: GGMLQuantizationType) -> None:
    values = _random_rows(seed=int(tensor_type))
    packed = quants.quantize(values, tensor_type)
    ours = dequantize(packed, tensor_type)
    assert ours.dtype == np.float32 and ours.shape == values.shape
    np.testing.assert_array_equal(ours, quants.dequantize(packed, tensor_type))
    # The round trip lands near the input: a wrong block layout would not.
    block_max = np.abs(values).reshape(values.shape[0], -1, 32).max(axis=2, keepdims=True)
    error = np.abs(ours - values).reshape(block_max.shape[0], -1, 32)
    assert (error <= block_max * 0.15 + 1e-6).all()


def test_q4_nibble_order_follows_ggml_layout() -> None:
    # One Q4_0 block, d = 1: byte j holds element j (low nibble) and element j + 16 (high).
    low, high = np.arange(16, dtype=np.uint8), 15 - np.arange(16, dtype=np.uint8)
    block = np.concatenate([np.array([1.0], np.float16).view(np.uint8), low | (high << 4)])
    expected = np.concatenate([low, high]).astype(np.float32) - 8
    np.testing.assert_array_equal(dequantize(block[None], GGMLQuantizationType.Q4_0)[0], expected)
    # Q4_1 with d = 0.5 and m = -2: value = q * d + m.
    halves = np.array([0.5, -2.0], np.float16).view(np.uint8)
    block = np.concatenate([halves, low | (high << 4)])
    expected = np.concatenate([low, high]).astype(np.float32) * 0.5 - 2
    np.testing.assert_array_equal(dequantize(block[None], GGMLQuantizationType.Q4_1)[0], expected)


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 40


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (interleaved rotary halves)."""
    out_features, in_features = weight.shape
    split = weight.reshape(num_heads, 2, out_features // num_heads // 2, in_features)
    return split.swapaxes(1, 2).reshape(out_features, in_features)


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    """A GGUF with Llama-like metadata; each tensor is (array, raw GGML type or None for F32)."""
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_llama_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.norm.weight": (HIDDEN,),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


LLAMA_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.norm.weight": "output_norm.weight",
}


def test_llama_file_gives_hf_names_shapes_and_unpermuted_qk(tmp_path: Path) -> None:
    hf = _hf_llama_weights(seed=0)
    tensors = {}
    for hf_name, gguf_name in LLAMA_GGUF_NAMES.items():
        array = hf[hf_name]
        if "q_proj" in hf_name or "k_proj" in hf_name:
            array = _llama_cpp_permute(array, HEADS if "q_proj" in hf_name else KV_HEADS)
        tensors[gguf_name] = (array, None)
    # One F16 tensor, stored as float16 and widened back exactly.
    gate = tensors["blk.0.ffn_gate.weight"][0].astype(np.float16)
    tensors["blk.0.ffn_gate.weight"] = (gate, None)
    hf["model.layers.0.mlp.gate_proj.weight"] = gate.astype(np.float32)
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", tensors)

    config = load_gguf_config(path, dtype="bfloat16")
    assert (config.architecture, config.hidden_size, config.head_dim) == (
        "LlamaForCausalLM",
        64,
        16,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert (config.vocab_size, config.intermediate_size, config.rope_theta) == (VOCAB, FFN, 5e4)
    assert config.tie_word_embeddings  # no output.weight in the file
    assert (config.bos_token_id, config.eos_token_ids, config.dtype) == (1, (2,), "bfloat16")
    assert config.extra == {"format": "gguf", "tensor_types": {"F32": 10, "F16": 1}}

    lazy = dict(iter_gguf_weights(path, config))
    loaded = {name: tensor.materialize() for name, tensor in lazy.items()}
    assert loaded.keys() == hf.keys()
    for name, expected in hf.items():
        torch.testing.assert_close(loaded[name], torch.from_numpy(expected), rtol=0, atol=0)
    # a tensor-parallel rank reads whole heads of q (still unpermuted) and some input columns
    q = lazy["model.layers.0.self_attn.q_proj.weight"]
    part = q.narrow(0, HEAD_DIM, HEAD_DIM).narrow(1, 2, 5).materialize()
    torch.testing.assert_close(
        part,
        loaded["model.layers.0.self_attn.q_proj.weight"][HEAD_DIM : 2 * HEAD_DIM, 2:7],
        rtol=0,
        atol=0,
    )


def test_olmo2_names_and_no_permutation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    q_proj = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    q_norm = rng.standard_normal(HEADS * HEAD_DIM).astype(np.float32)
    tensors = {
        "blk.0.attn_q.weight": (q_proj, None),
        "blk.0.attn_q_norm.weight": (q_norm, None),
        "blk.0.post_attention_norm.weight": (np.ones(HIDDEN, np.float32), None),
        "blk.0.post_ffw_norm.weight": (np.ones(HIDDEN, np.float32), None),
        "output.weight": (rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), None),
    }
    path = _write_gguf(tmp_path / "olmo2.gguf", "olmo2", tensors)
    config = load_gguf_config(path)
    assert config.architecture == "Olmo2ForCausalLM" and not config.tie_word_embeddings
    loaded = {name: tensor.materialize() for name, tensor in iter_gguf_weights(path, config)}
    assert sorted(loaded) == [
        "lm_head.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.post_feedforward_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q_proj))


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    # Q6_K: 256 values in 210 bytes a block; the bytes need not be meaningful.
    raw = np.random.default_rng(2).integers(0, 255, size=(HIDDEN, 210), dtype=np.uint8)
    tensors = {
        "blk.0.attn_norm.weight": (np.ones(HIDDEN, np.float32), None),
        "blk.0.ffn_up.weight": (raw, GGMLQuantizationType.Q6_K),
    }
    path = _write_gguf(tmp_path / "q6k.gguf", "llama", tensors)
    config = load_gguf_config(path)
    assert config.extra["tensor_types"] == {"F32": 1, "Q6_K": 1}
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' has type Q6_K.*Q4_1"):
        next(iter_gguf_weights(path, config))


def test_unknown_tensor_name_is_named(tmp_path: Path) -> None:
    tensors = {"rope_freqs.weight": (np.ones(HEAD_DIM // 2, np.float32), None)}
    path = _write_gguf(tmp_path / "extra.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        next(iter_gguf_weights(path, load_gguf_config(path)))


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {})
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, olmo2"):
        load_gguf_config(path)


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf_config(missing)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(ValueError, match="garbage.gguf: not a readable GGUF file"):
        load_gguf_config(garbage)
    with pytest.raises(ValueError, match="is not a file"):
        load_gguf_config(tmp_path)
