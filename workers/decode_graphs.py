"""Decode steps over static buffers, replayed as CUDA graphs.

A decode step (one new token per sequence) launches a few hundred small kernels; at batch 1 on a
GPU their launch cost, not the weight read, sets the step time. A CUDA graph records the whole
forward once per batch size and replays it with one launch. A graph reads and writes fixed
addresses, so every input lives in a static buffer sized for the largest batch:

    input_ids [N]  positions [N]  slot_mapping [N]  seq_lens [N]  block_tables [N, max_blocks]

(views of one device buffer) and each step fills the first `size` rows of a pinned host buffer of
the same layout and copies it over in one transfer (on a stream of its own, as soon as the step
before has run, so that it crosses while that step's draw is computed), where `size` is the
step's batch rounded up to a captured size (1, 2, 4, 8, then steps of 8 up to max_num_seqs).
Padding rows have slot -1 (the KV store skips them) and length 0 (decode attention gives them
zeros); their logits are never read.

Graphs on or off, a decode step runs this same padded computation (`enforce_eager` just calls
the forward instead of replaying it), so both give bitwise-equal logits: the GEMMs see the same
row counts and the split-K decode kernel the same batch and block-table width.

The graphs share one memory pool and are captured largest first, so the smaller ones reuse the
largest one's activations. The LM head is captured too: a graph's output is every row's logits.
Prompts and mixed steps run eagerly through the model runner's general path.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn

from workers.attention import AttentionBackend, AttentionMetadata
from workers.forward_context import ForwardContext, forward_context


class _Layout:
    """Where each static input lies in the one buffer: ids, positions and slots as rows of an
    [3, N] int64 block, then seq_lens [N] int32, then block_tables [N, max_blocks] int32; each
    part starts on a 256-byte boundary (as separate allocations would), rows of the first block
    too."""

    def __init__(self, size: int, max_blocks: int) -> None:
        self.size, self.max_blocks = size, max_blocks
        self.row = _align(size * 8) // 8  # int64s from one row of the first block to the next
        self.ids_end = self.row * 8  # bytes of the ids' row
        self.lens_at = 3 * self.row * 8
        self.tables_at = self.lens_at + _align(size * 4)
        self.total = self.tables_at + size * max_blocks * 4

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([3, N] int64, [N] int32, [N, max_blocks] int32) views of a uint8 buffer."""
        ids = buffer[: self.lens_at].view(torch.int64).view(3, self.row)[:, : self.size]
        lens = buffer[self.lens_at : self.lens_at + self.size * 4].view(torch.int32)
        tables = buffer[self.tables_at :].view(torch.int32).view(self.size, self.max_blocks)
        return ids, lens, tables

    def end(self, size: int) -> int:
        """Bytes up to the last table row of a step of `size` rows (all other inputs before)."""
        return self.tables_at + size * self.max_blocks * 4


def _align(nbytes: int, to: int = 256) -> int:
    return -(-nbytes // to) * to


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    """Static decode buffers for up to max_num_seqs sequences, and a graph per captured size."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
        enforce_eager: bool,
    ) -> None:
        if not getattr(backend, "supports_padded_decode", False):
            raise ValueError(f"attention backend {backend.name!r} cannot run padded decode rows")
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.device = block_size, device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        size = self.sizes[-1]
        # -- static inputs: views of one device buffer, staged in one pinned host buffer of the
        # same layout, so that a step's inputs cross in one copy --
        self._layout = _Layout(size, self.max_blocks)
        cuda = device.type == "cuda"
        self._inputs = torch.zeros(self._layout.total, dtype=torch.uint8, device=device)
        self._host_inputs = torch.zeros(self._layout.total, dtype=torch.uint8, pin_memory=cuda)
        # [N] int64 x 3; [N] int32; [N, max_blocks] int32
        ids, self.seq_lens, self.block_tables = self._layout.views(self._inputs)
        self.input_ids, self.positions, self.slot_mapping = ids
        self.slot_mapping.fill_(-1)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)  # [N + 1]
        # numpy views of the staging rows fill them from lists quickly
        self._host_ids_np, self._host_lens_np, self._host_tables_np = (
            view.numpy() for view in self._layout.views(self._host_inputs)
        )
        # The copy crosses on a stream of its own, once the step before has run (it read the
        # static buffers), so it overlaps that step's draw; the forward waits for it.
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._ran = torch.cuda.Event() if cuda else None  # the last step's forward is done
        # recorded once a step's copy is queued: the next step refills the staging rows after it
        self._copied = torch.cuda.Event() if cuda else None
        # -- outputs, per size --
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not enforce_eager:
            self._capture_all()

    def padded_size(self, batch: int) -> int | None:
        """The captured size a batch runs at, or None if it is larger than any."""
        index = bisect.bisect_left(self.sizes, batch)
        return self.sizes[index] if index < len(self.sizes) else None

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_host=list(range(size + 1)),
            seq_lens_host=[0] * size,  # padded backends read the device tensors only
        )

    def _forward(self, size: int) -> torch.Tensor:
        with forward_context(ForwardContext(self._metadata(size), self.kv_caches, self.backend)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])  # [size, hidden]
        return self.model.compute_logits(hidden)  # [size, vocab]

    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            # the first run compiles the Triton kernels and settles cuBLAS outside the capture
            torch.cuda.synchronize(self.device)
            self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def run(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int],
        slots: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """One decode step of len(input_ids) sequences; returns the logits of the padded batch
        ([size, vocab]): row i is sequence i, rows past the batch are padding.

        `input_ids` may be a tensor on the device (a previous step's draw, not yet on the host)."""
        batch = len(input_ids)
        size = self.padded_size(batch)
        if size is None:
            raise ValueError(f"decode batch of {batch} exceeds the largest size {self.sizes[-1]}")
        # -- fill the host staging rows; padding: token 0 (ids on the device: an earlier step's)
        # at position 0, no slot, length 0 --
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the staging rows
        ids, lens, tables = self._host_ids_np, self._host_lens_np, self._host_tables_np
        ids[:, :size] = 0
        ids[2, :size] = -1
        on_device = isinstance(input_ids, torch.Tensor)
        if not on_device:
            ids[0, :batch] = input_ids
        ids[1, :batch] = positions
        ids[2, :batch] = slots
        lens[:size] = 0
        lens[:batch] = ids[1, :batch] + 1
        tables[:size] = 0
        for row, table in enumerate(block_tables):
            if len(table) > self.max_blocks:
                raise ValueError(f"block table of {len(table)} blocks exceeds {self.max_blocks}")
            tables[row, : len(table)] = table
        # -- copy to the static buffers: one transfer, up to the last table row of this size
        # (rows past `size` in the other inputs cross too; no graph of this size reads them).
        # Ids already on the device are copied in on this stream, right behind the draw that
        # made them, and the transfer starts past their row: it need not wait for that copy,
        # nor that copy for it (padding rows keep an earlier step's ids, all valid tokens) --
        start = 0
        if on_device:
            start = self._layout.ids_end
            self.input_ids[:batch].copy_(input_ids)
        end = self._layout.end(size)
        if self._copy_stream is None:
            self._inputs[start:end].copy_(self._host_inputs[start:end])
        else:
            self._copy_stream.wait_event(self._ran)
            with torch.cuda.stream(self._copy_stream):
                self._inputs[start:end].copy_(self._host_inputs[start:end], non_blocking=True)
                self._copied.record()
            torch.cuda.current_stream(self.device).wait_event(self._copied)
        # -- run --
        if size in self.graphs:
            self.graphs[size].replay()
            logits = self.logits[size]
        else:
            logits = self._forward(size)
        if self._ran is not None:
            self._ran.record()
        return logits
