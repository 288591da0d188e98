"""Weight-only int4 linears against their dense weights."""

from __future__ import annotations

import pytest
import torch
from paged import PagedSequences

from workers.layers.quantization import Int4WeightOnly, quantize_linears_
from workers.weights.loader import load_model


def q4_1_like(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """q * d + m per group of 32 with q spanning 0..15, as a GGUF Q4_1 tensor dequantizes."""
    groups = cols // 32
    q = torch.randint(0, 16, (rows, groups, 32), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # the group's min and max are attained
    d = torch.rand(rows, groups, 1, generator=generator) * 0.05 + 0.001
    m = torch.randn(rows, groups, 1, generator=generator) * 0.1
    return (q * d + m).reshape(rows, cols)


def test_requantized_q4_1_weights_come_back():
    generator = torch.Generator().manual_seed(0)
    weight = q4_1_like(96, 128, generator)
    packed = Int4WeightOnly(weight)
    dequantized = packed(torch.eye(128)).T  # [N, K]: each basis vector reads one column
    torch.testing.assert_close(dequantized, weight, atol=2e-3, rtol=1e-2)


def test_matmul_matches_dense_within_bf16():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 256, generator=generator) * 0.05
    x = torch.randn(5, 256, generator=generator)
    out = Int4WeightOnly(weight)(x)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    relative = (out - x @ weight.T).norm() / (x @ weight.T).norm()
    assert relative < 0.1  # 4-bit weights: a few percent


def test_bad_shapes_and_methods_are_refused():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Int4WeightOnly(torch.randn(8, 40))
    with pytest.raises(ValueError, match="quantization: 'int3'"):
        quantize_linears_(torch.nn.Linear(4, 4), "int3")


def test_int4_smollm2_stays_close_to_fp32():
    exact = load_model("smollm2-135m-instruct", dtype="float32")
    quantized = load_model("smollm2-135m-instruct", dtype="float32", quantization="int4")
    tokenizer = exact.tokenizer
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}]
        )
    )
    exact_logits, _ = PagedSequences(exact.model).greedy([prompt], 1)
    quantized_logits, _ = PagedSequences(quantized.model).greedy([prompt], 1)
    # teacher-forced next-token choices over the prompt: 4-bit weights rarely change them
    agreement = (exact_logits.argmax(-1) == quantized_logits.argmax(-1)).float().mean()
    assert agreement > 0.9
    relative = (quantized_logits - exact_logits).norm() / exact_logits.norm()
    assert relative < 0.1
