"""Linear layers, dense or split over the tensor-parallel ranks.

Each weight carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies this rank's
slice of a full checkpoint tensor into it, so loaders never need to know how a layer is split.
Column-parallel layers split the output features (no communication); row-parallel layers split the
input features and sum the partial products with an all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from workers.distributed import (
    divide,
    get_tp_rank,
    get_tp_size,
    tp_all_reduce,
    tp_partial_words_target,
)
from workers.layers import fused
from workers.layers.quantization import Int4WeightOnly

if TYPE_CHECKING:
    from workers.layers.norm import RMSNorm

    PendingNorm = tuple[RMSNorm, torch.Tensor]
    """(norm, residual) of a post-norm block whose output stream, residual + norm(x), is left to
    be formed by the next layer that reads it (x: a row-parallel layer's partial sum)."""


def form_stream(x: torch.Tensor, pending: PendingNorm | None) -> torch.Tensor:
    """The residual stream: x itself, or with `pending` = (norm, residual), residual + norm(x
    summed over the ranks), by the norm's fused norm-and-add kernel."""
    if pending is None:
        return x
    norm, residual = pending
    return norm.norm_and_add(x, residual, reduce=True)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    """Copy (and convert the dtype of) a checkpoint tensor or lazy slice after checking shapes."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"weight {name or '?'}: checkpoint shape {tuple(loaded.shape)} does not match the "
            f"model's {tuple(param.shape)}"
        )
    if hasattr(loaded, "materialize"):  # a slice of a file not read yet: read just it
        loaded = loaded.materialize()
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    copy_checked(param, loaded, getattr(param, "checkpoint_name", ""))


class LinearBase(nn.Module):
    """The matmul both parallel kinds share: dense, or weight-only int4 once quantized."""

    int4: Int4WeightOnly | None = None

    def quantize_int4_(self, group_size: int) -> None:
        self.int4 = Int4WeightOnly(self.weight.data, group_size)
        self.register_parameter("weight", None)

    def matmul(self, x: torch.Tensor, push=None) -> torch.Tensor:
        """x W^T; `push`: see `fused.linear` (the int4 path takes none)."""
        return self.int4(x) if self.int4 is not None else fused.linear(x, self.weight, push)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W's rows (output features) split over the ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size = input_size
        self.output_size_per_rank = divide(output_size, self.tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(self.output_size_per_rank)) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias

    def forward_stream(
        self, x: torch.Tensor, pending: PendingNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, this layer of stream), the stream formed from x and `pending` by
        `form_stream` before the matmul, or, on one rank for a one-row decode step, inside it
        (`fused.rms_norm_add_linear`: one launch fewer)."""
        if pending is not None and self.tp_size == 1 and self.int4 is None and self.bias is None:
            norm, residual = pending
            both = fused.rms_norm_add_linear(x, residual, norm.weight, norm.eps, self.weight)
            if both is not None:
                return both
        stream = form_stream(x, pending)
        return stream, self(stream)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one GEMM (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        shard = loaded.narrow(0, self.tp_rank * size, size)
        copy_checked(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections fused; each rank holds its query heads and its K/V heads.

    With fewer K/V heads than ranks, each K/V head is replicated on the ranks that share it.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
    ) -> None:
        tp_size = get_tp_size()
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, num_kv_heads, "tensor-parallel size over KV heads")
        self.head_dim = head_dim
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    @property
    def kv_shard_index(self) -> int:
        """Which KV-head shard this rank holds (ranks that replicate a KV head share one)."""
        return self.tp_rank // self.kv_replicas

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, rank_index = 0, q_rows, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, rank_index = kv_rows, self.kv_shard_index
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        shard = loaded.narrow(0, rank_index * rows, rows)
        copy_checked(param.data.narrow(0, offset, rows), shard)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W's columns (input features) split over the ranks; outputs all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_rank = divide(input_size, self.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        cols = param.shape[1]
        copy_checked(param, loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """`reduce=False` returns this rank's partial sum, for a caller that sums it over the
        ranks itself with the post-norm's all-reduce (`RMSNorm.norm_and_add(reduce=True)`); only
        without a bias, which must come after. Where the peer kernels take that all-reduce as
        tagged words, the matmul pushes its tiles to the other ranks as it writes them."""
        return self.finish(self.matmul(x, self.partial_push(x, reduce)), reduce)

    def partial_push(self, x: torch.Tensor, reduce: bool):
        """Where this layer's partial sum of x's rows goes as it is written (see forward), or
        None: none unless the caller sums it itself (`reduce=False`)."""
        if reduce:
            return None
        return tp_partial_words_target(x.shape[0], self.weight.shape[0], x.dtype)

    def finish(self, out: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """This rank's product `out` summed over the ranks (unless `reduce=False`), plus the bias:
        what forward does after its matmul, for a caller that made the product itself."""
        if not reduce:
            if self.bias is not None:
                raise ValueError("a row-parallel layer with a bias must reduce its output")
            return out
        out = tp_all_reduce(out)
        return out if self.bias is None else out + self.bias
