"""All-reduce and all-gather between the GPUs of one host, through each other's memory.

A tensor-parallel decode step at batch 1 all-reduces a few kilobytes two to four times a layer.
NCCL's kernels for that are fast, but a CUDA graph that captures them also holds NCCL state the
communicator then will not tear down, and eagerly each call is a host round through the process
group. These kernels instead read the other ranks' buffers directly (CUDA IPC over NVLink), so a
decode graph can capture them like any other kernel.

Every rank owns one buffer that every rank has mapped (`PeerBuffers`):

    flags  int32 [WORLD, PROGRAMS]   flags[r, p]: the last call in which rank r's program p
                                     announced its data
    data   [2, WORLD] slots of CAPACITY bytes: a call uses half (epoch % 2), slot r for rank r's
           data
    words  [2, WORLD] slots of CAPACITY bytes, the same for the tagged words below

A call runs PROGRAMS programs on every rank (always that many, whatever the size, so every
program's epoch counter counts every call):

    1. program p copies its chunks of x into slot `rank` of this rank's buffer (pull), or of
       every rank's buffer (push)
    2. barrier: p writes its epoch into flags[rank, p] of every rank (a release at system scope,
       after the block's stores), then waits until flags[r, p] of its own buffer reaches the
       epoch for every r (an acquire)
    3. p reads its chunks of every rank's slot (from the other buffers when pulling, from its
       own when pushed) and writes the result: the sum over ranks in rank order in fp32 (every
       rank gets bitwise the same value), or the gathered slices

Pushing trades the reads over NVLink after the barrier, each a round trip, for posted writes
before it.

A rank that waits too long for another (`max_spins` polls of a flag; a rank that stopped, or the
ranks' calls out of step) stops waiting, sets `status` to the kind of call that gave up (unless
an earlier call on this rank did; `WAITS` names them) and finishes the call with whatever the
other buffers hold: the caller must read `status` and give up on the group, but no GPU is left
spinning forever.

The two kernels a tensor-parallel layer runs three times (the post-norm with its all-reduce, the
QK-norm's sums), and the all-gather (the LM head's logits, a decode step's largest exchange: a
slice of the vocabulary, whose words take twice its bytes), and the broadcast of a decode step's
ids from rank 0 can instead exchange tagged words (`PeerBuffers.tagged`), as NCCL's low-latency
protocol does: each 8-byte word carries the call's epoch in its high half and 32 bits of data
(two 16-bit elements, or one 32-bit) in its low half. A rank writes its words straight into
every other rank's buffer and then polls its own until every word it needs carries the epoch;
an aligned 8-byte store lands whole, so a word with the right tag holds the right data. No
flags, no fence at system scope, no second round trip for the flag behind the data.

Two halves make one barrier per call enough: a rank can only be one call ahead of another (it
waits for the other's flag), so when it writes half h again, two calls later, the other rank has
begun the call in between and so finished reading h, in either direction. The kernels need all
programs resident at once on every rank (they wait on each other), which PROGRAMS far below the
SM count ensures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.launch import (
    launch_next,
    pdl_options,
    wait_for_previous,
    wait_for_previous_launching,
)
from kernels.rmsnorm import add_rounded, norm_warps, rms_normalise
from kernels.rope import check_qkv, qk_tiles, sum_squares

PROGRAMS = 32
"""Programs per call, on every rank."""
WAITS = (
    "an all-reduce",
    "an all-gather",
    "a post-norm's all-reduce",
    "the QK-norm's sums",
    "a broadcast",
)
"""The kinds of call that wait for other ranks, as `status` names them (1 + the index here)."""
_ALL_REDUCE, _ALL_GATHER, _POST_NORM, _QK_SQUARES, _BROADCAST = (
    tl.constexpr(1 + i) for i in range(len(WAITS))
)  # each waiting kernel's kind in `status`, in WAITS' order

MAX_SPINS_LIMIT = (1 << 31) - 1  # a kernel's int32 argument


def max_spins_from_env(environ) -> int:
    """AFS_PEER_MAX_SPINS (polls before a call gives up, 1 to 2^31 - 1), else 2^26."""
    text = environ.get("AFS_PEER_MAX_SPINS", "")
    if not text:
        return 1 << 26
    if not text.isdigit() or not 1 <= int(text) <= MAX_SPINS_LIMIT:
        raise ValueError(f"AFS_PEER_MAX_SPINS: a whole number of polls, 1 to {MAX_SPINS_LIMIT}")
    return int(text)


MAX_SPINS = max_spins_from_env(os.environ)


def gave_up(status: int) -> str:
    """What a nonzero `PeerBuffers.status` says gave up waiting."""
    if 1 <= status <= len(WAITS):
        return WAITS[status - 1]
    return f"a peer call of unknown kind {status}"


POST_NORM_LAUNCH_FIRST = os.environ.get("AFS_PEER_POST_NORM_LAUNCH_FIRST", "1") != "0"
"""The tagged post-norm lets the next kernel (the next projection) launch at its start, before it
waits for the matmul before it: the projection's programs then take the SMs the matmul leaves
and prefetch their first weight tiles while the matmul ends and the ranks' words cross (7B at
tp = 2, batch 1: 405.9 against 402.8 tok/s on two H200s). 0: at the end of its wait."""
RESIDUAL_EARLY = os.environ.get("AFS_PEER_RESIDUAL_EARLY", "1") != "0"
"""The tagged post-norm loads its program's first residual row before it waits for the kernel
before it, as it does the norm's weight: the residual stream a sublayer started from was written
before that sublayer's matmul, the kernel before this one, which lets this one launch only once
its own wait is over. 0: after the other ranks' words, as it adds it."""
TAGGED_GATHER = os.environ.get("AFS_PEER_TAGGED_GATHER", "1") != "0"
"""With tagged words on, the all-gather takes them too where they fit (0: data and flags)."""
_BLOCK = 1024
_BROADCAST_BLOCK = 128  # a decode step's ids: one chunk, one program
_FLAG_BYTES = 4096
"""Room for the flags at the start of each buffer (int32 [WORLD, PROGRAMS] for up to 32 ranks)."""


@dataclass
class PeerBuffers:
    """This rank's view of every rank's buffer: addresses valid in this process, in rank order."""

    rank: int
    world: int
    capacity: int
    """Bytes in each slot: the largest tensor one call moves."""
    flag_ptrs: torch.Tensor
    """int64 [WORLD] on this rank's device: the address of each rank's flags."""
    data_ptrs: torch.Tensor
    """int64 [WORLD]: the address of each rank's data region."""
    words_ptrs: torch.Tensor
    """int64 [WORLD]: the address of each rank's tagged words."""
    epochs: torch.Tensor
    """int32 [PROGRAMS]: calls made so far, per program (local to this rank)."""
    status: torch.Tensor
    """int32 [1]: 0, or the kind of the first call on this rank that gave up waiting for another
    rank (1 + its index in `WAITS`)."""
    max_spins: int = MAX_SPINS
    """Polls of a flag before a call gives up: by default 2^26, 12 to 33 s on an H200 by kind
    of call (177 to 499 ns a poll, benchmarks/peer_wait_gpu.py), far beyond any step (a rank
    compiling a kernel for a new shape can be seconds behind); AFS_PEER_MAX_SPINS sets it, read
    at import (`MAX_SPINS`)."""
    push: bool = False
    """Write this rank's data into every rank's buffer before the barrier and read only local
    memory after it, instead of writing locally and reading the others' buffers. (The engine
    sets it: on by default, measured faster on two H200s.)"""
    tagged: bool = False
    """The post-norm's all-reduce, the QK-norm's sums and the all-gather (where its words fit)
    exchange tagged words instead of data and flags (the engine sets it, the same on every
    rank)."""

    @staticmethod
    def buffer_bytes(capacity: int, world: int) -> int:
        """The size of the buffer each rank allocates and shares: flags, then two halves of
        `world` slots of `capacity` bytes for data, then as many for tagged words."""
        return _FLAG_BYTES + 4 * world * capacity

    @classmethod
    def from_addresses(
        cls, rank: int, addresses: list[int], capacity: int, device: torch.device
    ) -> PeerBuffers:
        """`addresses[r]`: where rank r's buffer (of buffer_bytes(capacity, len(addresses)), its
        flags zeroed) is mapped in this process."""
        world = len(addresses)
        if not 1 <= world <= _FLAG_BYTES // (4 * PROGRAMS):
            raise ValueError(f"peer collectives take 1 to 32 ranks, not {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a group of {world}")
        if capacity <= 0 or capacity % 16:
            raise ValueError(f"capacity must be a positive multiple of 16 bytes, not {capacity}")
        base = torch.tensor(addresses, dtype=torch.int64)
        return cls(
            rank=rank,
            world=world,
            capacity=capacity,
            flag_ptrs=base.to(device),
            data_ptrs=(base + _FLAG_BYTES).to(device),
            words_ptrs=(base + _FLAG_BYTES + 2 * world * capacity).to(device),
            epochs=torch.zeros(PROGRAMS, dtype=torch.int32, device=device),
            status=torch.zeros(1, dtype=torch.int32, device=device),
        )

    def args(self, element_size: int) -> tuple:
        """The arguments every peer kernel takes after its own, for data of `element_size`
        bytes: flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins."""
        return (
            self.flag_ptrs, self.data_ptrs, self.epochs, self.rank,
            self.capacity // element_size, self.status, self.max_spins,
        )  # fmt: skip

    def constants(self) -> dict:
        """The constexprs and launch options every peer kernel takes."""
        return dict(
            WORLD=self.world, PROGRAMS=PROGRAMS, PUSH=self.push, **pdl_options(self.status.device)
        )

    def words_args(self) -> tuple:
        """The arguments a kernel exchanging tagged words takes after its own: words_ptrs,
        epochs_ptr, rank, SLOT_WORDS, status_ptr, max_spins."""
        return (
            self.words_ptrs, self.epochs, self.rank,
            self.capacity // 8, self.status, self.max_spins,
        )  # fmt: skip

    def words_constants(self) -> dict:
        """The constexprs and launch options a kernel exchanging tagged words takes."""
        return dict(WORLD=self.world, PROGRAMS=PROGRAMS, **pdl_options(self.status.device))

    def fits(self, x: torch.Tensor, nbytes: int | None = None) -> bool:
        """Whether one call can move x (its bytes on each rank; for a gather, the slice), or
        `nbytes` read from a contiguous x (what a fused kernel publishes)."""
        if nbytes is None:
            nbytes = x.numel() * x.element_size()
        return x.is_contiguous() and nbytes <= self.capacity


class WordsTarget(NamedTuple):
    """Where a row-parallel matmul's epilogue pushes its [rows, hidden] partial sums as the
    tagged words that the post-norm's all-reduce after it reads (`all_reduce_rms_norm_add` with
    `pushed=True` then only waits for them): the peers, a row's words, elements per word."""

    peers: PeerBuffers
    row_words: int
    pack: int

    def args(self) -> tuple:
        """words_ptrs, epochs_ptr, rank, SLOT_WORDS, ROW_WORDS."""
        return (
            self.peers.words_ptrs, self.peers.epochs, self.peers.rank,
            self.peers.capacity // 8, self.row_words,
        )  # fmt: skip

    def constants(self) -> dict:
        return dict(WORLD=self.peers.world, PEER_PROGRAMS=PROGRAMS, PACK=self.pack)


def word_pack(element_size: int) -> int | None:
    """Elements a tagged word carries in its low 32 bits (two 16-bit, one 32-bit), or None for
    data of another size (which exchanges data and flags)."""
    return {2: 2, 4: 1}.get(element_size)


def words_target(
    peers: PeerBuffers, rows: int, hidden: int, dtype: torch.dtype
) -> WordsTarget | None:
    """The tagged words' layout of a post-norm all-reduce of [rows, hidden] in `dtype` (a row
    padded to a power of two elements, two 16-bit or one 32-bit element a word), or None where
    that call exchanges data and flags instead (tagged words off, no rows, or too many)."""
    pack = word_pack(dtype.itemsize)
    if not peers.tagged or pack is None or rows < 1:
        return None
    row_words = max(triton.next_power_of_2(hidden), 2) // pack
    if rows * row_words * 8 > peers.capacity:
        return None
    return WordsTarget(peers, row_words, pack)


@triton.jit
def push_row_words(values, rows, row_ok, col0, N, words_ptrs, epochs_ptr, rank, SLOT_WORDS,
                   ROW_WORDS, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, WORLD: tl.constexpr,
                   PEER_PROGRAMS: tl.constexpr, PACK: tl.constexpr):  # fmt: skip
    """A matmul's output tile values [ROWS, BLOCK_N] (columns col0 onwards, of N), as the
    tagged words of the post-norm all-reduce call that comes next on this rank, into slot
    `rank` of every other rank's buffer: row r is program r % PEER_PROGRAMS's there, so its
    epoch is that program's count of calls plus one."""
    epoch = tl.load(epochs_ptr + rows % PEER_PROGRAMS)[:, None] + 1  # [ROWS, 1]
    flat = tl.reshape(values, [ROWS * BLOCK_N])  # a row's pairs stay side by side
    payload = tl.reshape(_payload(flat, ROWS * BLOCK_N, PACK), [ROWS, BLOCK_N // PACK])
    words = (epoch.to(tl.int64) << 32) | payload
    word_cols = col0 // PACK + tl.arange(0, BLOCK_N // PACK)
    ok = row_ok[:, None] & (word_cols * PACK < N)[None, :]
    _push_words(words, rows[:, None] * ROW_WORDS + word_cols[None, :], ok, words_ptrs, rank,
                (epoch % 2).to(tl.int64), WORLD, SLOT_WORDS)  # fmt: skip


@triton.jit
def _announce_and_wait(flag_ptrs, rank, program, epoch, status_ptr, max_spins, WORLD: tl.constexpr,
                       PROGRAMS: tl.constexpr, WHAT: tl.constexpr):  # fmt: skip
    # every thread's stores to this rank's half come before the flag that announces them
    tl.debug_barrier()
    for peer in tl.static_range(WORLD):
        flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + rank * PROGRAMS + program, epoch, sem="release", scope="sys")
    own = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        flag = own + peer * PROGRAMS + program
        spins = 0
        while (tl.atomic_add(flag, 0, sem="acquire", scope="sys") < epoch) & (spins < max_spins):
            spins += 1
        if spins >= max_spins:
            _give_up(status_ptr, WHAT)
    tl.debug_barrier()


@triton.jit
def _give_up(status_ptr, WHAT: tl.constexpr):
    """Say in `status` that a call of kind WHAT (1 + its index in WAITS) stopped waiting, unless
    an earlier call on this rank already did: the first to give up is the one to look at, those
    after it having waited for a group already out of step."""
    tl.atomic_cas(status_ptr, 0, WHAT)


@triton.jit
def _next_epoch(epochs_ptr, program):
    """This program's call number on this rank, and the half (0 or 1) the call uses."""
    epoch = tl.load(epochs_ptr + program) + 1
    tl.store(epochs_ptr + program, epoch)
    return epoch, (epoch % 2).to(tl.int64)


@triton.jit
def _slot(data_ptrs, owner, slot, half, dtype: tl.constexpr, WORLD: tl.constexpr,
          SLOT_ELEMENTS):  # fmt: skip
    """Where `slot` of `half` starts in rank `owner`'s data region."""
    base = tl.load(data_ptrs + owner).to(tl.pointer_type(dtype))
    return base + (half * WORLD + slot) * SLOT_ELEMENTS


@triton.jit
def _store_own(value, offsets, mask, data_ptrs, rank, half, dtype: tl.constexpr, SLOT_ELEMENTS,
               WORLD: tl.constexpr, PUSH: tl.constexpr):  # fmt: skip
    """`value` at `offsets` of slot `rank`: of this rank's buffer (pull), or of every rank's
    (push: posted writes, so that after the barrier every read is local)."""
    if PUSH:
        for owner in tl.static_range(WORLD):
            dst = _slot(data_ptrs, owner, rank, half, dtype, WORLD, SLOT_ELEMENTS)
            tl.store(dst + offsets, value, mask=mask)
    else:
        dst = _slot(data_ptrs, rank, rank, half, dtype, WORLD, SLOT_ELEMENTS)
        tl.store(dst + offsets, value, mask=mask)


@triton.jit
def _publish_and_wait(x_ptr, n, program,
                      flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins,
                      WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr,
                      PUSH: tl.constexpr, WHAT: tl.constexpr):  # fmt: skip
    """Steps 1 and 2 for a flat x of n elements: this program's chunks of x into slot `rank`
    (see _store_own), then the barrier. Returns the half this call used."""
    epoch, half = _next_epoch(epochs_ptr, program)
    dtype = x_ptr.dtype.element_ty
    for start in range(program * BLOCK, n, PROGRAMS * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(x_ptr + offsets, mask=mask)
        _store_own(value, offsets, mask, data_ptrs, rank, half, dtype, SLOT_ELEMENTS, WORLD, PUSH)
    _announce_and_wait(flag_ptrs, rank, program, epoch, status_ptr, max_spins, WORLD, PROGRAMS,
                       WHAT)  # fmt: skip
    return half


@triton.jit
def _source(data_ptrs, rank, peer, half, dtype: tl.constexpr, SLOT_ELEMENTS,
            WORLD: tl.constexpr, PUSH: tl.constexpr):  # fmt: skip
    """Where rank `peer`'s data of this call is: in this rank's buffer (push) or its own."""
    if PUSH:
        return _slot(data_ptrs, rank, peer, half, dtype, WORLD, SLOT_ELEMENTS)
    else:
        return _slot(data_ptrs, peer, peer, half, dtype, WORLD, SLOT_ELEMENTS)


@triton.jit
def _payload(value, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """value [BLOCK] -> int64 [BLOCK // PACK]: the bits of PACK elements (two 16-bit, or one
    32-bit) in each word's low 32 bits, the first element lowest."""
    if PACK == 2:
        low, high = tl.split(tl.reshape(value, [BLOCK // 2, 2]))
        low = low.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
        high = high.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
        return (high << 16) | low
    else:
        return value.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF


@triton.jit
def _pack_words(value, epoch, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """value [BLOCK] -> int64 [BLOCK // PACK]: the epoch in each word's high 32 bits, the
    `_payload` in its low 32."""
    return (epoch.to(tl.int64) << 32) | _payload(value, BLOCK, PACK)


@triton.jit
def _unpack_words(words, dtype: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """What _pack_words packed, back as [BLOCK] of `dtype`."""
    if PACK == 2:
        low = words.to(tl.int16).to(dtype, bitcast=True)  # the low 16 bits
        high = (words >> 16).to(tl.int16).to(dtype, bitcast=True)
        return tl.reshape(tl.join(low, high), [BLOCK])
    else:
        return words.to(tl.int32).to(dtype, bitcast=True)


@triton.jit
def _words_slot(words_ptrs, owner, slot, half, WORLD: tl.constexpr, SLOT_WORDS):
    """Where `slot` of `half` starts in rank `owner`'s tagged words."""
    base = tl.load(words_ptrs + owner).to(tl.pointer_type(tl.int64))
    return base + (half * WORLD + slot) * SLOT_WORDS


@triton.jit
def _push_words(words, offsets, mask, words_ptrs, rank, half, WORLD: tl.constexpr, SLOT_WORDS):
    """This rank's tagged words into slot `rank` of every other rank's buffer."""
    for owner in tl.static_range(WORLD):
        if owner != rank:
            dst = _words_slot(words_ptrs, owner, rank, half, WORLD, SLOT_WORDS)
            tl.store(dst + offsets, words, mask=mask)


@triton.jit
def _await_words(src, mask, epoch, status_ptr, max_spins, WHAT: tl.constexpr):
    """Poll the words at `src` (this rank's memory; masked lanes aside) until each carries
    `epoch`, or max_spins polls (then `_give_up`); returns them."""
    words = tl.load(src, mask=mask, other=0, volatile=True)
    missing = tl.sum(tl.where(mask & ((words >> 32).to(tl.int32) != epoch), 1, 0), axis=0)
    spins = 0
    while (missing > 0) & (spins < max_spins):
        words = tl.load(src, mask=mask, other=0, volatile=True)
        missing = tl.sum(tl.where(mask & ((words >> 32).to(tl.int32) != epoch), 1, 0), axis=0)
        spins += 1
    if spins >= max_spins:
        _give_up(status_ptr, WHAT)
    return words


@triton.jit
def _sum_in_rank_order(own, offsets, mask, epoch, half, words_ptrs, rank, SLOT_WORDS, status_ptr,
                       max_spins, BLOCK: tl.constexpr, PACK: tl.constexpr,
                       WORLD: tl.constexpr, WHAT: tl.constexpr):  # fmt: skip
    """own [BLOCK] (this rank's part) plus every other rank's, from their words at `offsets` of
    their slots in this rank's buffer once those carry `epoch`: in fp32, in rank order."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            part = own
        else:
            src = _words_slot(words_ptrs, rank, peer, half, WORLD, SLOT_WORDS)
            words = _await_words(src + offsets, mask, epoch, status_ptr, max_spins, WHAT)
            part = _unpack_words(words, own.dtype, BLOCK, PACK)
        total += part.to(tl.float32)
    return total


@triton.jit
def _all_reduce_kernel(
    x_ptr, out_ptr, N,
    flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PUSH: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty

    # -- 1, 2. this rank's chunks where the others will read them; the barrier --
    half = _publish_and_wait(
        x_ptr, N, program, flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr,
        max_spins, WORLD, PROGRAMS, BLOCK, PUSH, _ALL_REDUCE,
    )  # fmt: skip

    # -- 3. the sum over ranks, in rank order, in fp32 --
    for start in range(program * BLOCK, N, PROGRAMS * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            data = _source(data_ptrs, rank, peer, half, dtype, SLOT_ELEMENTS, WORLD, PUSH)
            total += tl.load(data + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, total.to(dtype), mask=mask)


@triton.jit
def _store_gathered(out_ptr, value, offsets, mask, owner, COLS, WORLD: tl.constexpr):
    """value at `offsets` of rank `owner`'s flat [ROWS, COLS] slice into its columns of out
    [ROWS, WORLD * COLS]."""
    rows, cols = offsets // COLS, offsets % COLS
    tl.store(out_ptr + rows * (WORLD * COLS) + owner * COLS + cols, value, mask=mask)


@triton.jit
def _all_gather_kernel(
    x_ptr, out_ptr, ROWS, COLS,
    flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PUSH: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    n = ROWS * COLS

    # -- 1, 2. this rank's slice [ROWS, COLS] where the others will read it; the barrier --
    half = _publish_and_wait(
        x_ptr, n, program, flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr,
        max_spins, WORLD, PROGRAMS, BLOCK, PUSH, _ALL_GATHER,
    )  # fmt: skip

    # -- 3. rank r's slice into columns [r * COLS, (r + 1) * COLS) of out [ROWS, WORLD * COLS] --
    for peer in tl.static_range(WORLD):
        data = _source(data_ptrs, rank, peer, half, dtype, SLOT_ELEMENTS, WORLD, PUSH)
        for start in range(program * BLOCK, n, PROGRAMS * BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < n
            value = tl.load(data + offsets, mask=mask)
            _store_gathered(out_ptr, value, offsets, mask, peer, COLS, WORLD)


@triton.jit
def _tagged_all_gather_kernel(
    x_ptr, out_ptr, ROWS, COLS,
    words_ptrs, epochs_ptr, rank, SLOT_WORDS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """_all_gather_kernel's result through tagged words: program p owns chunks p, p + PROGRAMS,
    ... of BLOCK elements of the flat [ROWS, COLS] slice, BLOCK // PACK words each."""
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    epoch, half = _next_epoch(epochs_ptr, program)
    n = ROWS * COLS
    WORDS: tl.constexpr = BLOCK // PACK

    # -- this rank's chunks: tagged, into every other rank's buffer, and into its own columns --
    for start in range(program * BLOCK, n, PROGRAMS * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        word_offsets = start // PACK + tl.arange(0, WORDS)
        _push_words(_pack_words(value, epoch, BLOCK, PACK), word_offsets, word_offsets * PACK < n,
                    words_ptrs, rank, half, WORLD, SLOT_WORDS)  # fmt: skip
        _store_gathered(out_ptr, value, offsets, mask, rank, COLS, WORLD)

    # -- the others' chunks, once their words carry this call's epoch, into their columns --
    for peer in tl.static_range(WORLD):
        if peer != rank:
            src = _words_slot(words_ptrs, rank, peer, half, WORLD, SLOT_WORDS)
            for start in range(program * BLOCK, n, PROGRAMS * BLOCK):
                word_offsets = start // PACK + tl.arange(0, WORDS)
                words = _await_words(src + word_offsets, word_offsets * PACK < n, epoch,
                                     status_ptr, max_spins, _ALL_GATHER)  # fmt: skip
                offsets = start + tl.arange(0, BLOCK)
                _store_gathered(out_ptr, _unpack_words(words, dtype, BLOCK, PACK), offsets,
                                offsets < n, peer, COLS, WORLD)  # fmt: skip


@triton.jit
def _all_reduce_rms_norm_add_kernel(
    x_ptr, residual_ptr, out_ptr, weight_ptr, eps, ROWS, HIDDEN,
    flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PUSH: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """out = residual + rms_norm(sum over ranks of x), row by row: program p owns rows p,
    p + PROGRAMS, ... in both phases, each row one tile of BLOCK >= HIDDEN."""
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    epoch, half = _next_epoch(epochs_ptr, program)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN

    # -- 1. this rank's rows where the others will read them --
    for row in range(program, ROWS, PROGRAMS):
        offsets = row * HIDDEN + cols  # within the capacity: no int32 overflow
        value = tl.load(x_ptr + offsets, mask=mask)
        _store_own(value, offsets, mask, data_ptrs, rank, half, dtype, SLOT_ELEMENTS, WORLD, PUSH)

    # -- 2. barrier --
    _announce_and_wait(flag_ptrs, rank, program, epoch, status_ptr, max_spins, WORLD, PROGRAMS,
                       _POST_NORM)  # fmt: skip

    # -- 3. the sum in rank order, rounded as the all-reduce rounds it; then what
    #       kernels/rmsnorm.py's post-norm computes from it --
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(program, ROWS, PROGRAMS):
        offsets = row * HIDDEN + cols  # within the capacity: no int32 overflow
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            data = _source(data_ptrs, rank, peer, half, dtype, SLOT_ELEMENTS, WORLD, PUSH)
            total += tl.load(data + offsets, mask=mask, other=0.0).to(tl.float32)
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        _store_post_norm(total, weight, eps, HIDDEN, residual, out_ptr, offsets, mask, dtype)


@triton.jit
def _store_post_norm(total, weight, eps, HIDDEN, residual, out_ptr, offsets, mask,
                     dtype: tl.constexpr):  # fmt: skip
    """A row's sum over the ranks (fp32, zero past HIDDEN) rounded as the all-reduce rounds it,
    then what kernels/rmsnorm.py's post-norm computes from it and the row's residual, stored at
    out_ptr + offsets."""
    normed = rms_normalise(total.to(dtype).to(tl.float32), weight, eps, HIDDEN, dtype)
    tl.store(out_ptr + offsets, add_rounded(residual, normed, dtype), mask=mask)


@triton.jit
def _token_squares(row, k_scale, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr):  # fmt: skip
    """[2] fp32: the sum of squares of a token's q heads in its fused projection `row`, and of
    its k heads times k_scale."""
    q_total = sum_squares(row, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_HEADS)
    k_row = row + NUM_HEADS * HEAD_DIM
    k_total = sum_squares(k_row, NUM_KV_HEADS, HEAD_DIM, BLOCK_D, BLOCK_HEADS) * k_scale
    return tl.where(tl.arange(0, 2) == 0, q_total, k_total)


@triton.jit
def _all_reduce_qk_squares_kernel(
    qkv_ptr, stride_qkv_token, out_ptr, k_scale, TOKENS, NUM_HEADS, NUM_KV_HEADS,
    flag_ptrs, data_ptrs, epochs_ptr, rank, SLOT_ELEMENTS, status_ptr, max_spins,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, PUSH: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Each token's sums of squares of q and of k (k's times k_scale) over every rank's heads:
    program p owns tokens p, p + PROGRAMS, ... in both phases."""
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    epoch, half = _next_epoch(epochs_ptr, program)
    parts = tl.arange(0, 2)  # q, k

    # -- 1. this rank's two sums per token where the others will read them --
    for token in range(program, TOKENS, PROGRAMS):
        value = _token_squares(qkv_ptr + token * stride_qkv_token, k_scale, NUM_HEADS,
                               NUM_KV_HEADS, HEAD_DIM, BLOCK_D, BLOCK_HEADS)  # fmt: skip
        _store_own(value, token * 2 + parts, parts < 2, data_ptrs, rank, half, tl.float32,
                   SLOT_ELEMENTS, WORLD, PUSH)  # fmt: skip

    # -- 2. barrier --
    _announce_and_wait(flag_ptrs, rank, program, epoch, status_ptr, max_spins, WORLD, PROGRAMS,
                       _QK_SQUARES)  # fmt: skip

    # -- 3. the sums over ranks, in rank order --
    for token in range(program, TOKENS, PROGRAMS):
        total = tl.zeros([2], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            data = _source(data_ptrs, rank, peer, half, tl.float32, SLOT_ELEMENTS, WORLD, PUSH)
            total += tl.load(data + token * 2 + parts)
        tl.store(out_ptr + token * 2 + parts, total)


@triton.jit
def _tagged_all_reduce_rms_norm_add_kernel(
    x_ptr, residual_ptr, out_ptr, weight_ptr, eps, ROWS, HIDDEN,
    words_ptrs, epochs_ptr, rank, SLOT_WORDS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr,
    PUSHED: tl.constexpr, LAUNCH_FIRST: tl.constexpr, RESIDUAL_EARLY: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """_all_reduce_rms_norm_add_kernel's result through tagged words: program p owns rows p,
    p + PROGRAMS, ...; a row is BLOCK // PACK words in the slots. PUSHED: the matmul that made x
    pushed them already (push_row_words), so this call only waits for the others'.
    RESIDUAL_EARLY: the program's first residual row is read before the wait (the caller
    guarantees that no kernel after the one before the one before wrote it)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    program = tl.program_id(0)
    if LAUNCH_FIRST:  # the next kernel may launch now, while the one before still runs
        launch_next(PDL)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # no kernel writes it
    if RESIDUAL_EARLY:
        first_residual = tl.load(residual_ptr + program * HIDDEN + cols,
                                 mask=mask & (cols * 0 + program < ROWS), other=0.0)  # fmt: skip
    wait_for_previous_launching(not LAUNCH_FIRST, PDL)
    dtype = x_ptr.dtype.element_ty
    epoch, half = _next_epoch(epochs_ptr, program)
    WORDS: tl.constexpr = BLOCK // PACK
    word_cols = tl.arange(0, WORDS)
    word_mask = word_cols * PACK < HIDDEN

    # -- this rank's rows, tagged, into every other rank's buffer --
    if not PUSHED:
        for row in range(program, ROWS, PROGRAMS):
            value = tl.load(x_ptr + row * HIDDEN + cols, mask=mask, other=0.0)
            words = _pack_words(value, epoch, BLOCK, PACK)
            _push_words(words, row * WORDS + word_cols, word_mask, words_ptrs, rank, half, WORLD,
                        SLOT_WORDS)  # fmt: skip

    # -- each row: the others' words once they carry this call's epoch; the sum in rank order,
    #    rounded as the all-reduce rounds it; then the post-norm --
    for row in range(program, ROWS, PROGRAMS):
        offsets = row * HIDDEN + cols
        own = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        total = _sum_in_rank_order(own, row * WORDS + word_cols, word_mask, epoch, half,
                                   words_ptrs, rank, SLOT_WORDS, status_ptr, max_spins, BLOCK,
                                   PACK, WORLD, _POST_NORM)  # fmt: skip
        total = tl.where(mask, total, 0.0)  # an odd row's last word: its high half not ours
        if RESIDUAL_EARLY and row == program:  # the row loaded before the wait
            residual = first_residual
        else:
            residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        _store_post_norm(total, weight, eps, HIDDEN, residual, out_ptr, offsets, mask, dtype)


@triton.jit
def _tagged_all_reduce_qk_squares_kernel(
    qkv_ptr, stride_qkv_token, out_ptr, k_scale, TOKENS, NUM_HEADS, NUM_KV_HEADS,
    words_ptrs, epochs_ptr, rank, SLOT_WORDS, status_ptr, max_spins,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """_all_reduce_qk_squares_kernel's result through tagged words, two a token."""
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    epoch, half = _next_epoch(epochs_ptr, program)
    parts = tl.arange(0, 2)  # q, k

    # -- this rank's two sums per token, tagged, into every other rank's buffer --
    for token in range(program, TOKENS, PROGRAMS):
        value = _token_squares(qkv_ptr + token * stride_qkv_token, k_scale, NUM_HEADS,
                               NUM_KV_HEADS, HEAD_DIM, BLOCK_D, BLOCK_HEADS)  # fmt: skip
        tl.store(out_ptr + token * 2 + parts, value)  # read back below, by this program
        words = _pack_words(value, epoch, 2, 1)
        _push_words(words, token * 2 + parts, parts < 2, words_ptrs, rank, half, WORLD,
                    SLOT_WORDS)  # fmt: skip

    # -- the sums over ranks, in rank order --
    for token in range(program, TOKENS, PROGRAMS):
        own = tl.load(out_ptr + token * 2 + parts).to(tl.float32)
        total = _sum_in_rank_order(own, token * 2 + parts, parts < 2, epoch, half,
                                   words_ptrs, rank, SLOT_WORDS, status_ptr, max_spins, 2, 1,
                                   WORLD, _QK_SQUARES)  # fmt: skip
        tl.store(out_ptr + token * 2 + parts, total)


@triton.jit
def _tagged_broadcast_kernel(
    x_ptr, N,
    words_ptrs, epochs_ptr, rank, SLOT_WORDS, status_ptr, max_spins,
    WORLD: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Rank 0's x (N 32-bit words of data) into every rank's x through tagged words: rank 0 only
    pushes (it waits for no one), the others wait for its words. Program p owns chunks p,
    p + PROGRAMS, ... of BLOCK elements."""
    wait_for_previous(PDL)  # before the first access to memory
    program = tl.program_id(0)
    epoch, half = _next_epoch(epochs_ptr, program)
    for start in range(program * BLOCK, N, PROGRAMS * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        if rank == 0:
            value = tl.load(x_ptr + offsets, mask=mask, other=0)
            _push_words(_pack_words(value, epoch, BLOCK, 1), offsets, mask, words_ptrs, rank,
                        half, WORLD, SLOT_WORDS)  # fmt: skip
        else:
            src = _words_slot(words_ptrs, rank, 0, half, WORLD, SLOT_WORDS)
            words = _await_words(src + offsets, mask, epoch, status_ptr, max_spins, _BROADCAST)
            tl.store(x_ptr + offsets, _unpack_words(words, tl.int32, BLOCK, 1), mask=mask)


def _check(x: torch.Tensor, peers: PeerBuffers) -> None:
    if not peers.fits(x):
        raise ValueError(
            f"peer collective: a contiguous tensor of at most {peers.capacity} bytes is needed, "
            f"got {tuple(x.shape)} {x.dtype} (contiguous: {x.is_contiguous()})"
        )


def all_reduce_(x: torch.Tensor, peers: PeerBuffers) -> torch.Tensor:
    """Sum x over the ranks, in place (every rank calls it with the same shape); returns x."""
    _check(x, peers)
    _all_reduce_kernel[(PROGRAMS,)](
        x, x, x.numel(), *peers.args(x.element_size()), BLOCK=_BLOCK, **peers.constants()
    )
    return x


def all_gather_last_dim(x: torch.Tensor, peers: PeerBuffers) -> torch.Tensor:
    """x [R, C] on every rank -> [R, WORLD * C], rank r's x in columns r*C .. (r+1)*C. Through
    tagged words where the buffers take them (twice x's bytes for 16-bit data)."""
    _check(x, peers)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    cols = x.shape[-1]
    out = torch.empty(*x.shape[:-1], peers.world * cols, dtype=x.dtype, device=x.device)
    pack = word_pack(x.element_size())
    if (
        peers.tagged and TAGGED_GATHER and pack is not None
        and -(-x.numel() // pack) * 8 <= peers.capacity
    ):  # fmt: skip
        _tagged_all_gather_kernel[(PROGRAMS,)](
            x, out, rows, cols, *peers.words_args(), BLOCK=_BLOCK, PACK=pack,
            **peers.words_constants(),
        )  # fmt: skip
        return out
    _all_gather_kernel[(PROGRAMS,)](
        x, out, rows, cols, *peers.args(x.element_size()), BLOCK=_BLOCK, **peers.constants()
    )
    return out


def broadcast_fits(x: torch.Tensor, peers: PeerBuffers) -> bool:
    """Whether `broadcast_` takes x: tagged words on, x contiguous, whole 32-bit words whose tagged
    words (twice x's bytes) fit a slot."""
    nbytes = x.numel() * x.element_size()
    return peers.tagged and nbytes % 4 == 0 and peers.fits(x, 2 * nbytes)


def broadcast_(x: torch.Tensor, peers: PeerBuffers) -> torch.Tensor:
    """Rank 0's x into every rank's x, in place (every rank calls it with the same shape and
    dtype); returns x. Through tagged words, each 32 bits of x one word: rank 0 writes its words
    into the others' buffers and goes on without waiting, so it costs rank 0 one short kernel;
    the others wait for them.

    Rank 0 waits for no one, so its next call must not be another broadcast, or rank 0 could
    write a half again before a slower rank has read it: a call that every rank waits in (any
    other collective, these kernels' or the group's) has to come between two broadcasts. (A
    decode step's forward holds several.)"""
    if not broadcast_fits(x, peers):
        raise ValueError(
            f"peer broadcast: tagged words and a contiguous tensor of whole 32-bit words of at "
            f"most {peers.capacity // 2} bytes are needed, got {tuple(x.shape)} {x.dtype} "
            f"(contiguous: {x.is_contiguous()}, tagged words: {peers.tagged})"
        )
    words = x.view(-1).view(torch.int32)
    if words.numel():  # a call without data would wait for nothing
        _tagged_broadcast_kernel[(PROGRAMS,)](
            words, words.numel(), *peers.words_args(), BLOCK=_BROADCAST_BLOCK,
            **peers.words_constants(),
        )  # fmt: skip
    return x


def all_reduce_rms_norm_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    peers: PeerBuffers,
    pushed: bool = False,
    residual_settled: bool = False,
) -> torch.Tensor:
    """Olmo 2's post-norm after a row-parallel layer, with its all-reduce inside: x [T, hidden]
    this rank's partial sums -> residual + rms_norm(sum over ranks of x), a new tensor. The
    values are those of `all_reduce_` followed by kernels/rmsnorm.py's `rms_norm_add`.
    `pushed`: the matmul that made x pushed it as tagged words (to `words_target` of this call,
    which must not be None), so that this call only waits for the others'. `residual_settled`:
    residual was written before the kernel that made x began (the stream a post-norm block
    started from), so the kernel may read it before it waits for that kernel."""
    _check(x, peers)
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"x, residual: expected two contiguous [T, hidden] of one dtype, got "
            f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}"
        )
    rows, hidden = x.shape
    if not residual.is_contiguous() or weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"residual, weight: expected contiguous [T, {hidden}] and [{hidden}]")
    out = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    target = words_target(peers, rows, hidden, x.dtype)
    if pushed and target is None:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}: no tagged words to have pushed it as")
    if target is not None:
        _tagged_all_reduce_rms_norm_add_kernel[(PROGRAMS,)](
            x, residual, out, weight, eps, rows, hidden, *peers.words_args(),
            BLOCK=target.row_words * target.pack, PACK=target.pack, PUSHED=pushed,
            LAUNCH_FIRST=POST_NORM_LAUNCH_FIRST, RESIDUAL_EARLY=RESIDUAL_EARLY and residual_settled,
            **peers.words_constants(),
            num_warps=norm_warps(block),
        )  # fmt: skip
        return out
    _all_reduce_rms_norm_add_kernel[(PROGRAMS,)](
        x, residual, out, weight, eps, rows, hidden, *peers.args(x.element_size()),
        BLOCK=block, **peers.constants(),
        num_warps=norm_warps(block),  # as kernels/rmsnorm.py: the same sum order
    )  # fmt: skip
    return out


def all_reduce_qk_squares(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_scale: float,
    peers: PeerBuffers,
) -> torch.Tensor:
    """Olmo 2's sharded QK-norm sums in one kernel: [T, 2] fp32, each token's sum of squares of
    q and of k (times k_scale) summed over the ranks; bitwise what kernels/rope.py's
    `qk_sum_squares` and then `all_reduce_` give."""
    check_qkv(qkv, num_heads, num_kv_heads, head_dim)
    out = torch.empty(qkv.shape[0], 2, dtype=torch.float32, device=qkv.device)
    _check(out, peers)
    block_d, block_heads = qk_tiles(num_heads, num_kv_heads, head_dim)
    if peers.tagged and out.numel() * 8 <= peers.capacity:
        if out.numel():  # a call without tokens would exchange nothing, and so wait for nothing
            _tagged_all_reduce_qk_squares_kernel[(PROGRAMS,)](
                qkv, qkv.stride(0), out, k_scale, qkv.shape[0], num_heads, num_kv_heads,
                *peers.words_args(),
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HEADS=block_heads,
                **peers.words_constants(),
            )  # fmt: skip
        return out
    _all_reduce_qk_squares_kernel[(PROGRAMS,)](
        qkv, qkv.stride(0), out, k_scale, qkv.shape[0], num_heads, num_kv_heads,
        *peers.args(out.element_size()),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_HEADS=block_heads, **peers.constants(),
    )  # fmt: skip
    return out
