"""The row argmax (kernels/argmax.py) against torch.argmax: the same index, ties and NaN too."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import _BLOCK, argmax, fits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _check(x: torch.Tensor) -> None:
    got = argmax(x)
    want = x.cpu().float().argmax(dim=-1)  # the reference on CPU, in fp32 (exact for all three)
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(1, 1), (1, 2 * _BLOCK + 5), (3, 5000), (7, _BLOCK)])
def test_matches_torch(dtype, rows, n):
    gen = torch.Generator().manual_seed(rows * 7919 + n)
    _check(torch.randn(rows, n, generator=gen).to(DEVICE, dtype))


def test_ties_take_the_first_index_across_chunks():
    x = torch.zeros(4, 3 * _BLOCK, device=DEVICE)
    x[0, [5, _BLOCK + 1, 2 * _BLOCK + 9]] = 3.0  # tied in three chunks
    x[1, [2 * _BLOCK + 9, _BLOCK + 1]] = 3.0  # the first tie in the middle chunk
    x[2] = float("-inf")  # every value -inf: index 0
    # row 3: all zero, index 0
    _check(x)


def test_nan_wins_as_in_torch():
    x = torch.randn(3, 3 * _BLOCK, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x[0, 2 * _BLOCK + 3] = float("nan")
    x[0, 7] = float("inf")
    x[1, [_BLOCK + 4, 2 * _BLOCK]] = float("nan")  # the first NaN
    _check(x)


def test_a_column_slice_and_repeated_calls():
    """The sampler passes logits[:, :sampleable]: rows strided wider than n. Each call leaves its
    counters at zero, so calls in a row (different row counts) each get their own answer."""
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(5, 3000, generator=gen).to(DEVICE)
    for rows, n in [(5, 2900), (2, 2100), (5, 3000)]:
        _check(wide[:rows, :n])


def test_refuses_what_it_cannot_take():
    assert not fits(torch.zeros(3, device=DEVICE))
    assert not fits(torch.zeros(4, 2, device=DEVICE).T)
    assert not fits(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="argmax takes"):
        argmax(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
