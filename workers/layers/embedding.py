"""Token embedding and LM head with the vocabulary split over the tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import get_tp_rank, get_tp_size, tp_all_gather_last_dim, tp_all_reduce
from workers.layers import fused
from workers.layers.linear import copy_checked


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of rows; ids outside it contribute zeros to the sum.

    `replicated`: every rank holds every row instead and looks its ids up alone, with no
    all-reduce (a decode step reads a few rows of the table, so its memory is all it costs)."""

    def __init__(self, vocab_size: int, hidden_size: int, replicated: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.replicated = replicated and self.tp_size > 1
        if self.replicated:
            self.tp_rank, self.tp_size = 0, 1  # a rank's share is the whole table
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp_size)  # the last rank's slice is padded
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(
                f"embedding: checkpoint has {loaded.shape[0]} rows, config says {self.vocab_size}"
            )
        rows = min(self.rows_per_rank, self.vocab_size - self.vocab_start)
        param.data[rows:].zero_()
        copy_checked(param.data[:rows], loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary, gathered from every rank's slice."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, hidden] -> [R, vocab]
        logits = tp_all_gather_last_dim(fused.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
