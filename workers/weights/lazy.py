"""A checkpoint tensor not read yet: `narrow` picks a part, `materialize` reads only that part.

Tensor-parallel weight loaders narrow to their rank's rows or columns, so each rank reads its own
slice of the file and never the whole tensor. Formats subclass it with their own `materialize`.
"""

from __future__ import annotations

import copy

import torch


class LazyTensor:
    def __init__(self, name: str, full_shape: tuple[int, ...]) -> None:
        self.name = name
        self.full_shape = tuple(full_shape)
        self.bounds = [(0, n) for n in self.full_shape]
        """Per dimension, the [start, stop) range of the full tensor this view covers."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self.bounds)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        base, stop = self.bounds[dim]
        if start < 0 or base + start + length > stop:
            raise ValueError(f"{self.name}: slice [{start}, {start + length}) out of {stop - base}")
        view = copy.copy(self)
        view.bounds = list(self.bounds)
        view.bounds[dim] = (base + start, base + start + length)
        return view

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError
