"""The peer all-reduce and all-gather kernels.

On CPU (Triton's interpreter) one process plays one rank of two: the other rank's buffer is a
second tensor whose flags already announce its data, so the kernel passes its barrier and the
test checks what it wrote (its result, its flag in the other buffer, its epoch) call by call.
Then two processes run the real barrier against each other over shared CPU buffers: a
sequence of sums and gathers of changing sizes, so both halves and every program's epochs turn.
On two GPUs, two processes run them for real: against NCCL, eagerly and replayed from a CUDA
graph, and the process group still tears down afterwards.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from kernels.peer_collectives import (
    _FLAG_BYTES,
    PROGRAMS,
    WAITS,
    PeerBuffers,
    all_gather_last_dim,
    all_reduce_,
    all_reduce_qk_squares,
    all_reduce_rms_norm_add,
    broadcast_,
    gave_up,
    max_spins_from_env,
)
from kernels.rmsnorm import rms_norm_add
from kernels.rope import qk_sum_squares

CAPACITY = 4096
DEVICE_IS_CUDA = torch.cuda.is_available()


class OtherRank:
    """The buffers of a group of two seen from `rank`, the other rank simulated by the test."""

    def __init__(self, rank: int, push: bool = False) -> None:
        self.rank, self.other, self.push = rank, 1 - rank, push
        size = PeerBuffers.buffer_bytes(CAPACITY, 2)
        self.buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]
        addresses = [buffer.data_ptr() for buffer in self.buffers]
        self.peers = PeerBuffers.from_addresses(rank, addresses, CAPACITY, torch.device("cpu"))
        self.peers.push = push

    def flags(self, owner: int) -> torch.Tensor:
        """flags[r, p] of `owner`'s buffer."""
        return self.buffers[owner][:_FLAG_BYTES].view(torch.int32)[: 2 * PROGRAMS].view(2, -1)

    def slot(self, owner: int, slot: int, epoch: int, like: torch.Tensor) -> torch.Tensor:
        """Slot `slot` of the half call `epoch` uses in `owner`'s buffer, as `like`'s elements."""
        start = _FLAG_BYTES + ((epoch % 2) * 2 + slot) * CAPACITY
        raw = self.buffers[owner][start : start + like.numel() * like.element_size()]
        return raw.view(like.dtype).view(like.shape)

    def announce(self, epoch: int, data: torch.Tensor) -> None:
        """The other rank's call number `epoch`: its data in its slot (of its own buffer when
        pulling, pushed into this rank's), its flags set."""
        owner = self.rank if self.push else self.other
        self.slot(owner, self.other, epoch, data).copy_(data)
        self.flags(self.rank)[self.other].fill_(epoch)

    def words(self, owner: int, slot: int, epoch: int) -> torch.Tensor:
        """Slot `slot` of the tagged words' half for call `epoch` in `owner`'s buffer."""
        start = _FLAG_BYTES + (4 + (epoch % 2) * 2 + slot) * CAPACITY
        return self.buffers[owner][start : start + CAPACITY].view(torch.int64)

    def announce_words(self, epoch: int, rows: torch.Tensor, block: int) -> None:
        """The other rank's call number `epoch` through tagged words: its rows (padded to
        `block` elements) written into this rank's buffer, each word tagged with the epoch."""
        tagged = tagged_words(rows, block, epoch)
        self.words(self.rank, self.other, epoch)[: tagged.numel()].copy_(tagged.view(-1))

    def check_words_left(self, rows: torch.Tensor, block: int, epoch: int) -> None:
        """This rank's rows (padded to `block` elements), tagged with call `epoch`, are in its
        slot of the other rank's tagged words."""
        mine = tagged_words(rows, block, epoch)
        left = self.words(self.other, self.rank, epoch)[: mine.numel()]
        assert torch.equal(left, mine.view(-1))

    def check_counted(self, epoch: int) -> None:
        """Every program has counted call `epoch`, and no wait gave up."""
        assert self.peers.epochs.tolist() == [epoch] * PROGRAMS
        assert int(self.peers.status[0]) == 0

    def published(self, epoch: int, like: torch.Tensor) -> torch.Tensor:
        """What this rank left for the other in call `epoch`."""
        owner = self.other if self.push else self.rank
        return self.slot(owner, self.rank, epoch, like)


def tagged_words(rows: torch.Tensor, block: int, epoch: int) -> torch.Tensor:
    """rows [R, C] -> int64 [R, block // pack]: the epoch in each word's high 32 bits, two
    16-bit elements (the first lowest) or one 32-bit element in its low 32; written here with
    torch, independently of the kernels' packing."""
    padded = torch.zeros(rows.shape[0], block, dtype=rows.dtype)
    padded[:, : rows.shape[1]] = rows
    if rows.element_size() == 2:
        bits = padded.view(torch.int16).to(torch.int64) & 0xFFFF
        payload = bits[:, 0::2] | (bits[:, 1::2] << 16)
    else:
        payload = padded.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (epoch << 32) | payload


PUSH = [pytest.param(False, id="pull"), pytest.param(True, id="push")]


@pytest.mark.parametrize("push", PUSH)
@pytest.mark.parametrize("rank", [0, 1])
def test_all_reduce_sums_in_rank_order_and_announces_each_call(rank, push):
    group = OtherRank(rank, push)
    for epoch, (n, dtype) in enumerate(
        [(300, torch.float32), (5000 // 4, torch.float16), (1, torch.float32)], start=1
    ):
        x, theirs = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        parts = [theirs, x] if rank else [x, theirs]
        expected = (parts[0].float() + parts[1].float()).to(dtype)
        group.announce(epoch, theirs)
        mine = x.clone()
        assert all_reduce_(x, group.peers) is x
        assert torch.equal(x, expected)
        assert torch.equal(group.published(epoch, mine), mine)
        # its flag reached the other rank for every program, and each program counted the call
        assert group.flags(group.other)[rank].tolist() == [epoch] * PROGRAMS
        assert group.peers.epochs.tolist() == [epoch] * PROGRAMS


@pytest.mark.parametrize("push", PUSH)
def test_all_gather_puts_each_rank_slice_in_its_columns(push):
    group = OtherRank(1, push)
    x, theirs = torch.randn(3, 70), torch.randn(3, 70)
    group.announce(1, theirs)
    out = all_gather_last_dim(x, group.peers)
    assert torch.equal(out, torch.cat([theirs, x], dim=-1))


@pytest.mark.parametrize("push", PUSH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_all_reduce_with_the_post_norm_equals_the_two_kernels(push, dtype):
    """One kernel gives bitwise what the all-reduce and then the post-norm kernel give."""
    group = OtherRank(0, push)
    rows, hidden = 3, 96  # 96: a row tile with masked lanes
    x, theirs = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    residual = torch.randn(rows, hidden).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden)).to(dtype)
    expected = rms_norm_add((x.float() + theirs.float()).to(dtype), residual, weight, 1e-6)
    group.announce(1, theirs)
    got = all_reduce_rms_norm_add(x, residual, weight, 1e-6, group.peers)
    assert torch.equal(got, expected)
    assert group.flags(1)[0].tolist() == [1] * PROGRAMS


@pytest.mark.parametrize("settled", [False, True], ids=["residual-late", "residual-early"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tagged_words_carry_the_post_norm_all_reduce(rank, dtype, settled):
    """Through tagged words the post-norm with its all-reduce gives bitwise the two kernels'
    result, and leaves its rows in the other rank's buffer tagged with the call's epoch; the
    same with each program's first residual row read before its wait."""
    group = OtherRank(rank)
    group.peers.tagged = True
    rows, hidden, block = 3, 95, 128  # 95: an odd row, a word half masked
    for epoch in (1, 2, 3):  # both halves, and a half used again
        x, theirs = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
        residual = torch.randn(rows, hidden).to(dtype)
        weight = (1 + 0.2 * torch.randn(hidden)).to(dtype)
        parts = [theirs, x] if rank else [x, theirs]
        summed = (parts[0].float() + parts[1].float()).to(dtype)
        expected = rms_norm_add(summed, residual, weight, 1e-6)
        group.announce_words(epoch, theirs, block)
        got = all_reduce_rms_norm_add(
            x, residual, weight, 1e-6, group.peers, residual_settled=settled
        )
        assert torch.equal(got, expected), epoch
        mine = tagged_words(x, block, epoch)  # the words that hold a row's elements
        left = group.words(group.other, rank, epoch)[: mine.numel()].view(mine.shape)
        used = -(-hidden // (2 if dtype == torch.float16 else 1))
        assert torch.equal(left[:, :used], mine[:, :used])
        assert group.peers.epochs.tolist() == [epoch] * PROGRAMS
        assert int(group.peers.status[0]) == 0
    assert group.flags(group.other).eq(0).all()  # no flags: the words are the barrier


def test_a_residual_read_early_serves_only_its_programs_first_row():
    """With more rows than programs, a program's later rows take their own residual rows."""
    group = OtherRank(0)
    group.peers.tagged = True
    rows, hidden = PROGRAMS + 3, 8
    x, theirs = torch.randn(rows, hidden), torch.randn(rows, hidden)
    residual, weight = torch.randn(rows, hidden), 1 + 0.2 * torch.randn(hidden)
    group.announce_words(1, theirs, hidden)
    got = all_reduce_rms_norm_add(x, residual, weight, 1e-6, group.peers, residual_settled=True)
    assert torch.equal(got, rms_norm_add(x + theirs, residual, weight, 1e-6))
    group.check_counted(1)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tagged_words_carry_the_all_gather(rank, dtype):
    """Through tagged words the all-gather puts each rank's slice in its columns, and leaves
    this rank's flat slice in the other rank's buffer tagged with the call's epoch."""
    group = OtherRank(rank)
    group.peers.tagged = True
    pack = 2 if dtype == torch.float16 else 1
    for epoch, (rows, cols) in enumerate([(3, 70), (1, 333), (2, 200)], start=1):
        x, theirs = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
        flat = -(-rows * cols // pack) * pack  # the slice's elements, in whole words
        group.announce_words(epoch, theirs.view(1, -1), flat)
        out = all_gather_last_dim(x, group.peers)
        parts = [theirs, x] if rank else [x, theirs]
        assert torch.equal(out, torch.cat(parts, dim=-1)), epoch
        group.check_words_left(x.view(1, -1), flat, epoch)
        group.check_counted(epoch)
    assert group.flags(group.other).eq(0).all()  # no flags: the words are the barrier


def test_tagged_words_with_a_stale_tag_are_waited_for():
    """Words from the call before (the same half two calls back) are not taken: the call
    waits for this epoch's, gives up after max_spins polls and says so in the status."""
    group = OtherRank(0)
    group.peers.tagged, group.peers.max_spins = True, 50
    x = torch.randn(1, 64)
    group.announce_words(1, torch.randn(1, 64), 64)
    all_reduce_rms_norm_add(x, x, torch.ones(64), 1e-6, group.peers)
    assert int(group.peers.status[0]) == 0
    group.peers.epochs.fill_(2)  # the next call is number 3, in the half call 1 used
    all_reduce_rms_norm_add(x, x, torch.ones(64), 1e-6, group.peers)
    assert gave_up(int(group.peers.status[0])) == "a post-norm's all-reduce"


@pytest.mark.parametrize("rank", [0, 1])
def test_tagged_words_carry_the_broadcast_from_rank_0(rank):
    """Rank 0's tensor lands in every rank's, bit for bit whatever its dtype: rank 0 leaves its
    words (each 32 bits of x, tagged with the call's epoch) in the other rank's buffer and keeps
    its own x; rank 1 takes rank 0's words as they are."""
    group = OtherRank(rank)
    group.peers.tagged = True
    cases = [torch.tensor([5, 100_351, 2**40 + 7, -3]), torch.randn(3, 6).half(), torch.randn(7)]
    for epoch, theirs in enumerate(cases, start=1):  # both halves, and a half used again
        x = torch.zeros_like(theirs) if rank else theirs.clone()
        words = theirs.reshape(1, -1).view(torch.float32)  # its bits, 32 at a time
        if rank:
            group.announce_words(epoch, words, words.shape[1])
        assert broadcast_(x, group.peers) is x
        assert torch.equal(x, theirs), epoch
        if rank == 0:
            group.check_words_left(words, words.shape[1], epoch)
        group.check_counted(epoch)
    assert group.flags(group.other).eq(0).all()  # no flags: the words are the barrier


def test_a_broadcast_waits_for_rank_0s_words_of_this_call():
    """Rank 1 does not take words left by the call two back: it waits, gives up after max_spins
    polls and says so in the status."""
    group = OtherRank(1)
    group.peers.tagged, group.peers.max_spins = True, 50
    group.announce_words(1, torch.tensor([[1.5, 2.5]]), 2)
    group.peers.epochs.fill_(2)  # the next call is number 3, in the half call 1 used
    x = torch.zeros(2)
    broadcast_(x, group.peers)
    assert gave_up(int(group.peers.status[0])) == "a broadcast"


def test_the_status_keeps_the_first_call_that_gave_up():
    """A call left waiting is the one to look at; those after it waited for a group already out
    of step, and do not overwrite it."""
    group = OtherRank(1)
    group.peers.tagged, group.peers.max_spins = True, 50
    broadcast_(torch.zeros(2), group.peers)  # rank 0's words never come
    x = torch.randn(1, 64)
    all_reduce_rms_norm_add(x, x, torch.ones(64), 1e-6, group.peers)  # nor the other's partial
    assert int(group.peers.status[0]) == 1 + WAITS.index("a broadcast")
    group.peers.status.zero_()
    all_reduce_rms_norm_add(x, x, torch.ones(64), 1e-6, group.peers)
    assert int(group.peers.status[0]) == 1 + WAITS.index("a post-norm's all-reduce")


def test_a_broadcast_refuses_what_its_words_cannot_carry():
    group = OtherRank(0)
    with pytest.raises(ValueError, match="tagged words"):
        broadcast_(torch.zeros(4, dtype=torch.int64), group.peers)  # tagged words off
    group.peers.tagged = True
    with pytest.raises(ValueError, match="whole 32-bit words"):
        broadcast_(torch.zeros(3, dtype=torch.float16), group.peers)
    with pytest.raises(ValueError, match="at most 2048 bytes"):
        broadcast_(torch.zeros(257, dtype=torch.int64), group.peers)
    with pytest.raises(ValueError, match="contiguous"):
        broadcast_(torch.zeros(4, 4).t(), group.peers)
    assert group.peers.epochs.tolist() == [0] * PROGRAMS
    assert group.words(1, 0, 1).eq(0).all()


@pytest.mark.parametrize("push", PUSH)
def test_qk_squares_summed_over_ranks_equal_the_two_kernels(push):
    """The sharded QK-norm's sums in one kernel: bitwise each rank's qk_sum_squares, summed."""
    group = OtherRank(1, push)
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 5
    qkv, theirs = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) for _ in range(2))
    mine = qk_sum_squares(qkv, heads, kv_heads, head_dim, 0.5)
    other = qk_sum_squares(theirs, heads, kv_heads, head_dim, 0.5)
    group.announce(1, other)
    got = all_reduce_qk_squares(qkv, heads, kv_heads, head_dim, 0.5, group.peers)
    assert torch.equal(got, torch.zeros_like(mine) + other + mine)  # rank order: 0, then 1
    assert torch.equal(group.published(1, mine), mine)


def test_qk_squares_through_tagged_words_equal_the_two_kernels():
    group = OtherRank(0)
    group.peers.tagged = True
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 5
    qkv, theirs = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) for _ in range(2))
    mine = qk_sum_squares(qkv, heads, kv_heads, head_dim, 0.5)
    other = qk_sum_squares(theirs, heads, kv_heads, head_dim, 0.5)
    group.announce_words(1, other, 2)
    got = all_reduce_qk_squares(qkv, heads, kv_heads, head_dim, 0.5, group.peers)
    assert torch.equal(got, torch.zeros_like(mine) + mine + other)
    assert torch.equal(group.words(1, 0, 1)[: 2 * tokens], tagged_words(mine, 2, 1).view(-1))


def test_bad_inputs_are_refused_before_any_launch():
    group = OtherRank(0)
    with pytest.raises(ValueError, match="at most 4096 bytes"):
        all_reduce_(torch.zeros(2000), group.peers)
    with pytest.raises(ValueError, match="contiguous"):
        all_reduce_(torch.zeros(8, 8).t(), group.peers)
    assert group.peers.epochs.tolist() == [0] * PROGRAMS
    with pytest.raises(ValueError, match="rank 2"):
        PeerBuffers.from_addresses(2, [0, 0], CAPACITY, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 16"):
        PeerBuffers.from_addresses(0, [0, 0], 100, torch.device("cpu"))


_SHARED_CAPACITY = 1 << 18


def _cpu_rank(
    rank: int, buffers, calls: list, results, max_spins=None, push=False, tagged=False
) -> None:
    addresses = [buffer.data_ptr() for buffer in buffers]
    peers = PeerBuffers.from_addresses(rank, addresses, _SHARED_CAPACITY, torch.device("cpu"))
    peers.push, peers.tagged = push, tagged
    out = []
    for i, (kind, inputs) in enumerate(calls):
        if rank >= len(inputs):  # this rank skips the call
            continue
        if max_spins is not None and i == len(calls) - 1:
            peers.max_spins = max_spins  # only the last call is left waiting
        x = inputs[rank].clone().view(1, -1)
        if kind == "sum":
            y = all_reduce_(x, peers)
        elif kind == "gather":
            y = all_gather_last_dim(x, peers)
        elif kind == "squares":  # tokens of 2 q heads and 1 k and v head of 16
            y = all_reduce_qk_squares(x.view(-1, 64), 2, 1, 16, 0.5, peers)
        elif kind == "broadcast":  # rank 0's, as int64 ids
            y = broadcast_(x.to(torch.int64), peers)
        else:  # the post-norm with its all-reduce, rows of 50
            x = x.view(-1, 50)
            y = all_reduce_rms_norm_add(x, torch.ones_like(x), torch.ones(50), 1e-6, peers)
        out.append(y.view(-1).tolist())
    results.put((rank, out, int(peers.status[0])))


def _run_cpu_ranks(calls: list, max_spins=None, push=False, tagged=False) -> dict:
    import torch.multiprocessing

    size = PeerBuffers.buffer_bytes(_SHARED_CAPACITY, 2)
    buffers = [torch.zeros(size, dtype=torch.uint8).share_memory_() for _ in range(2)]
    # spawned ranks map the shared buffers wherever they like: each passes its own addresses
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(
            target=_cpu_rank, args=(r, buffers, calls, results, max_spins, push, tagged)
        )
        for r in (0, 1)
    ]
    for process in ranks:
        process.start()
    try:
        replies = [results.get(timeout=240) for _ in ranks]
    finally:
        for process in ranks:
            process.join(30 if process.exitcode is None else 0)
            if process.is_alive():  # left waiting by a rank that failed
                process.kill()
    return {rank: (out, status) for rank, out, status in replies}


@pytest.mark.skipif(DEVICE_IS_CUDA, reason="the interpreter's ranks are CPU processes")
@pytest.mark.parametrize(
    "push, tagged",
    [(False, False), (True, False), (True, True)],
    ids=["pull", "push", "tagged"],
)
def test_two_processes_meet_at_every_barrier(push, tagged):
    sizes = [1, 7, 300, 2048, 33, 40_000]  # 40 000: several chunks per program
    kinds = ["sum", "gather", "sum", "norm", "squares"]
    if tagged:  # rank 0's ids, between calls that every rank waits in
        kinds.insert(2, "broadcast")
    rows = {"norm": 50, "squares": 64}
    calls = []
    for i in range(20):
        kind, size = kinds[i % len(kinds)], sizes[i % len(sizes)]
        if kind in rows:  # whole rows
            size = rows[kind] * (1 + size // rows[kind] % 40)
        if kind == "broadcast":
            ids = [torch.randint(-(2**40), 2**40, (min(size, 2000),)) for _ in range(2)]
            calls.append((kind, ids))
            continue
        calls.append((kind, [torch.randn(size) for _ in range(2)]))
    got = _run_cpu_ranks(calls, push=push, tagged=tagged)
    for i, (kind, inputs) in enumerate(calls):
        if kind == "broadcast":
            want = inputs[0]
        elif kind == "sum":
            want = inputs[0] + inputs[1]
        elif kind == "gather":
            want = torch.cat(inputs)
        elif kind == "squares":
            parts = [qk_sum_squares(x.view(-1, 64), 2, 1, 16, 0.5) for x in inputs]
            want = (torch.zeros_like(parts[0]) + parts[0] + parts[1]).view(-1)
        else:
            summed = (inputs[0] + inputs[1]).view(-1, 50)
            want = rms_norm_add(summed, torch.ones_like(summed), torch.ones(50), 1e-6).view(-1)
        assert got[0][0][i] == got[1][0][i] == want.tolist(), (i, kind)
    assert got[0][1] == got[1][1] == 0


@pytest.mark.skipif(DEVICE_IS_CUDA, reason="the interpreter's ranks are CPU processes")
def test_a_rank_left_waiting_gives_up_and_says_so():
    """Rank 1 skips the last call: rank 0's call stops waiting after max_spins polls instead of
    spinning forever, and its status says so; the calls before it are right."""
    calls = [("sum", [torch.randn(64), torch.randn(64)]) for _ in range(3)]
    calls.append(("sum", [torch.randn(64)]))  # rank 0 only
    got = _run_cpu_ranks(calls, max_spins=200)
    for i, (_, inputs) in enumerate(calls[:3]):
        assert got[0][0][i] == got[1][0][i] == (inputs[0] + inputs[1]).tolist()
    assert len(got[0][0]) == 4 and len(got[1][0]) == 3
    assert (got[0][1], got[1][1]) == (1, 0)


def test_a_timed_out_collective_stops_the_rank(monkeypatch):
    from workers import distributed

    group = OtherRank(0)
    monkeypatch.setattr(distributed, "_PEERS", group.peers)
    distributed.check_peer_collectives()  # status 0: nothing to say
    group.peers.status.fill_(1 + WAITS.index("the QK-norm's sums"))
    with pytest.raises(
        distributed.PeerCollectiveTimeout, match="QK-norm's sums waited.*out of step"
    ):
        distributed.check_peer_collectives()


@pytest.mark.parametrize("tagged, rows", [(True, [9, 16]), (False, [1, 2, 16])])
def test_the_post_norm_kernel_of_flags_is_run_once_per_row_class_it_serves(
    monkeypatch, tagged, rows
):
    """The steps too many rows for tagged words but within the buffers (fp32 rows of 64: tagged
    up to 4096 / (64 * 8) = 8 rows, data up to 4096 / (64 * 4) = 16) take the kernel of data and
    flags: one run for each class of row count Triton compiles apart (one, a multiple of
    16, other), the first rows past the tagged words' limit (every size with them off)."""
    from workers import distributed

    group = OtherRank(0, push=True)
    group.peers.tagged = tagged
    group.flags(0)[1].fill_(10)  # the other rank has announced every call up to 10
    monkeypatch.setattr(distributed, "_PEERS", group.peers)
    assert distributed.warm_peer_post_norm(torch.ones(64), 1e-6, torch.float32) == rows
    assert group.peers.epochs.tolist() == [len(rows)] * PROGRAMS  # one call each
    assert int(group.peers.status[0]) == 0


def test_the_broadcast_is_run_once_per_id_class_each_behind_an_all_reduce(monkeypatch):
    """At start-up the broadcast of a step's ids runs for one id and for eight (two words an id:
    a multiple of 16 words or not, which Triton compiles apart), each followed by an all-reduce
    that every rank waits in; rank 0 leaves its words, tagged with the last broadcast's call."""
    from workers import distributed

    group = OtherRank(0, push=True)
    group.peers.tagged = True
    group.flags(0)[1].fill_(10)  # the other rank has announced every call up to 10
    monkeypatch.setattr(distributed, "_PEERS", group.peers)
    assert distributed.warm_peer_broadcast(torch.device("cpu")) == [1, 8]
    assert group.peers.epochs.tolist() == [4] * PROGRAMS  # two broadcasts, two sums
    words = group.words(1, 0, 3)[:16]  # the eight ids' call (the same half as the first's)
    assert torch.equal(words, torch.full_like(words, 3 << 32))  # zeros, tagged
    assert int(group.peers.status[0]) == 0
    monkeypatch.setattr(distributed, "PEER_BROADCAST", False)
    assert distributed.warm_peer_broadcast(torch.device("cpu")) == []


def _two_gpu_rank(rank: int, init_method: str, failures) -> None:
    import torch.distributed as dist

    from kernels.peer_collectives import words_target
    from kernels.skinny_matmul import Config, skinny_matmul
    from workers import distributed

    try:
        device = torch.device("cuda", rank)
        distributed.init_tensor_parallel(rank, 2, init_method, device)
        assert distributed.init_peer_collectives(1 << 20, device)
        group = distributed.get_tp_group().group
        gen = torch.Generator(device).manual_seed(rank)
        cases = [((1, 4096), torch.bfloat16), ((64, 4096), torch.bfloat16),
                 ((5, 1), torch.float32), ((3, 1000), torch.float16)]  # fmt: skip
        peers = distributed.get_peer_buffers()
        for push, (shape, dtype) in [(push, case) for push in (False, True) for case in cases]:
            peers.push = push
            x = torch.randn(shape, generator=gen, device=device).to(dtype)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            assert torch.equal(distributed.tp_all_reduce(x.clone()), ref), (shape, dtype)
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x, group=group)
            assert torch.equal(distributed.tp_all_gather_last_dim(x), torch.cat(parts, -1))
        for tagged in (False, True):  # the LM head's gather of a one-row step's logits
            peers.push, peers.tagged = True, tagged
            x = torch.randn(1, 50176, generator=gen, device=device).to(torch.bfloat16)
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x, group=group)
            assert torch.equal(distributed.tp_all_gather_last_dim(x), torch.cat(parts, -1))
        peers.push, peers.tagged = True, True  # a step's ids from rank 0, then through NCCL
        for shape, dtype in [((1,), torch.int64), ((64,), torch.int64), ((3, 10), torch.float16)]:
            ids = torch.randint(0, 100_352, shape, generator=gen, device=device).to(dtype)
            got = distributed.tp_broadcast_tensor(ids.clone())
            dist.broadcast(ids, src=0, group=group)  # every rank waits in it between broadcasts
            assert torch.equal(got, ids), (shape, dtype)
        ways = [(False, False), (True, False), (True, True)]  # (push, tagged)
        for (push, tagged), rows in [(way, rows) for way in ways for rows in (1, 64)]:
            peers.push, peers.tagged = push, tagged  # the post-norm with its all-reduce
            x = torch.randn(rows, 4096, generator=gen, device=device).to(torch.bfloat16)
            residual = torch.randn(rows, 4096, device=device).to(torch.bfloat16)
            weight = torch.ones(4096, device=device, dtype=torch.bfloat16)
            fused = distributed.tp_all_reduce_rms_norm_add(x, residual, weight, 1e-6)
            two = rms_norm_add(distributed.tp_all_reduce(x.clone()), residual, weight, 1e-6)
            assert torch.equal(fused, two), (push, tagged, rows)
        for (push, tagged), tokens in [(way, tokens) for way in ways for tokens in (1, 64)]:
            peers.push, peers.tagged = push, tagged  # the QK-norm sums in one kernel
            qkv = torch.randn(tokens, 32 * 128, generator=gen, device=device).to(torch.bfloat16)
            fused = distributed.tp_qk_sum_squares(qkv, 16, 8, 128, 1.0)
            two = distributed.tp_all_reduce(qk_sum_squares(qkv, 16, 8, 128, 1.0))
            assert torch.equal(fused, two), (push, tagged, tokens)
        peers.push, peers.tagged = True, True  # a row-parallel matmul pushing its partial
        for rows, config in [(1, Config(8, 1024, 1, 2, 2, True)), (16, Config(32, 128, 4))]:
            x = torch.randn(rows, 2048, generator=gen, device=device).to(torch.bfloat16)
            weight = torch.randn(4096, 2048, generator=gen, device=device).to(torch.bfloat16)
            residual = torch.randn(rows, 4096, device=device).to(torch.bfloat16)
            norm_weight = torch.ones(4096, device=device, dtype=torch.bfloat16)
            target = words_target(peers, rows, 4096, torch.bfloat16)
            part = skinny_matmul(x, weight, config=config, push=target)
            fused = all_reduce_rms_norm_add(part, residual, norm_weight, 1e-6, peers, pushed=True)
            plain = skinny_matmul(x, weight, config=config)
            two = rms_norm_add(distributed.tp_all_reduce(plain), residual, norm_weight, 1e-6)
            assert torch.equal(fused, two), ("pushed", rows)
        peers.tagged = False
        for push in (False, True):  # captured in a graph: ten chained sums, replayed three times
            peers.push = push
            static = torch.zeros(8, 4096, dtype=torch.bfloat16, device=device)
            distributed.tp_all_reduce(static * 0.5)  # compiled before the capture
            torch.cuda.synchronize(device)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                y = static
                for _ in range(10):
                    y = distributed.tp_all_reduce(y * 0.5)
            for step in range(3):
                static.fill_(float(rank + step))
                graph.replay()
                # the first sum gives (rank 0's + rank 1's) / 2; each later one keeps it
                expected = torch.full_like(static, float(2 * step + 1) / 2)
                assert torch.equal(y, expected), (push, step, y[0, 0].item())
            torch.cuda.synchronize(device)
            del graph
        peers = distributed.get_peer_buffers()
        assert int(peers.status[0]) == 0
        if rank == 0:  # a call rank 1 never makes: it gives up instead of hanging
            peers.max_spins = 1 << 14
            distributed.tp_all_reduce(torch.ones(8, device=device))
            torch.cuda.synchronize(device)
            assert int(peers.status[0]) == 1
        distributed.destroy_tensor_parallel()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        failures.put(f"rank {rank}: {exc!r}")
        raise


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_two_gpus_match_nccl_eagerly_and_in_a_graph():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    context = mp.get_context("spawn")
    failures = context.Queue()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ranks = [context.Process(target=_two_gpu_rank, args=(r, init_method, failures)) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(180)
    alive = [p for p in ranks if p.is_alive()]
    for process in alive:
        process.kill()
    errors = [failures.get() for _ in range(failures.qsize())] if not failures.empty() else []
    assert not alive, f"ranks did not finish in 180 s (a hang): {errors}"
    assert [p.exitcode for p in ranks] == [0, 0], errors


@pytest.mark.parametrize(
    "rows, config",
    [(1, (8, 64, 1, 4, 2, True)), (3, (16, 32, 3, 4, 2, False))],
    ids=["one-row", "split-k"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_matmul_pushes_its_partial_and_the_post_norm_only_waits(rows, config, dtype):
    """A row-parallel matmul pushes its product as the tagged words of the post-norm all-reduce
    that comes next (the other rank's epoch for the call); that call, told so, pushes nothing
    and gives what the two kernels give."""
    from kernels.peer_collectives import words_target
    from kernels.skinny_matmul import Config, skinny_matmul

    group = OtherRank(1)
    group.peers.tagged = True
    hidden, k = 48, 96
    group.peers.epochs.fill_(4)  # the post-norm's call will be number 5
    x, weight = torch.randn(rows, k).to(dtype), torch.randn(hidden, k).to(dtype)
    target = words_target(group.peers, rows, hidden, dtype)
    product = skinny_matmul(x, weight, config=Config(*config), push=target)
    assert torch.equal(product, skinny_matmul(x, weight, config=Config(*config)))
    block = 64  # the next power of two of hidden
    mine = tagged_words(product, block, 5)
    used = -(-hidden // target.pack)
    pushed = group.words(0, 1, 5)[: mine.numel()].view(mine.shape)
    assert torch.equal(pushed[:, :used], mine[:, :used])
    assert group.peers.epochs.tolist() == [4] * PROGRAMS  # the matmul counts no call

    pushed.fill_(-1)  # anything the post-norm pushed now would show
    theirs = torch.randn(rows, hidden).to(dtype)
    residual, norm_weight = torch.randn(rows, hidden).to(dtype), torch.ones(hidden).to(dtype)
    group.announce_words(5, theirs, block)
    got = all_reduce_rms_norm_add(product, residual, norm_weight, 1e-6, group.peers, pushed=True)
    summed = (theirs.float() + product.float()).to(dtype)  # rank order: 0, then 1
    assert torch.equal(got, rms_norm_add(summed, residual, norm_weight, 1e-6))
    assert pushed.eq(-1).all()
    assert int(group.peers.status[0]) == 0


def test_the_polls_limit_comes_from_the_environment_or_is_refused():
    assert max_spins_from_env({}) == 1 << 26
    assert max_spins_from_env({"AFS_PEER_MAX_SPINS": "1073741824"}) == 1 << 30
    for bad in ("0", "-5", "1e9", "2147483648", "many"):
        with pytest.raises(ValueError, match="AFS_PEER_MAX_SPINS"):
            max_spins_from_env({"AFS_PEER_MAX_SPINS": bad})
