"""Tensor-parallel state of this process: its rank, the group size, and the collectives layers use.

Until a group is initialised every process is rank 0 of a group of one, so the parallel layers
reduce to plain dense layers and the collectives to no-ops.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    """This process's rank inside its replica."""
    size: int
    """Number of ranks the model is sharded over."""
    group: dist.ProcessGroup | None
    """The torch.distributed group for tensors (NCCL on GPU, gloo on CPU), or None for one rank."""
    cpu_group: dist.ProcessGroup | None = None
    """A gloo group over the same ranks for Python objects (each step's SchedulerOutput)."""


_TP = TensorParallelGroup(rank=0, size=1, group=None)
_PEERS = None
"""kernels.peer_collectives.PeerBuffers once `init_peer_collectives` has mapped every rank's
buffer, else None (NCCL or gloo carry every collective)."""
_PEER_MEMORY: list[torch.Tensor] = []
"""This rank's buffer and its mappings of the others', kept alive while the kernels use them."""
_PEER_STATUS: dict = {}
"""A follower's last copy of the peer kernels' status on the host ("last") and the event that
says it landed ("copied")."""
_LOCKSTEP = {"on": False}
"""Whether peer calls are in lockstep (see `set_lockstep`)."""


class Lockstep(NamedTuple):
    """Rank 0's word to the other ranks in place of a step: peer calls in lockstep or not."""

    on: bool


LOCKSTEP_SPINS = 1 << 30
"""The peer calls' polls before they give up while in lockstep, 16 times the default (see
`_spins`)."""


def set_lockstep(on: bool) -> None:
    """While on, each peer call first waits for this rank's queued work and then for every rank
    of the group on the host (skipped inside a CUDA graph's capture), and waits LOCKSTEP_SPINS
    polls before it gives up: no call then gives up on a rank still compiling a kernel (on a
    host whose Triton cache is empty, a rank compiling the call's own kernel can be a second or
    more behind the others). A group starts in lockstep; the engine ends it on every rank once
    it has compiled what serving reaches (its graphs and its warm-up), as the peer kernels then
    run at full speed."""
    _LOCKSTEP["on"] = on
    if _PEERS is not None:
        _PEERS.max_spins = _spins()


def _spins() -> int:
    """The peer calls' limit now: LOCKSTEP_SPINS in lockstep, else the default (MAX_SPINS)."""
    from kernels.peer_collectives import MAX_SPINS

    if not _LOCKSTEP["on"] or MAX_SPINS == 1 or MAX_SPINS >= LOCKSTEP_SPINS:
        return MAX_SPINS
    # Triton compiles an integer argument apart when it is 1 or a multiple of 16: the limit in
    # lockstep falls in MAX_SPINS' class, so the kernels compiled then are those served with
    return LOCKSTEP_SPINS + (1 if MAX_SPINS % 16 else 0)


def _lockstep() -> None:
    """Called just before a peer kernel is launched (every rank launches the same ones). A call
    captured into a CUDA graph keeps its arguments for good: it gets the default limit and no
    wait (a capture cannot synchronise)."""
    if not _LOCKSTEP["on"] or _TP.size == 1:
        return
    capturing = torch.cuda.is_current_stream_capturing()
    if _PEERS is not None:
        from kernels.peer_collectives import MAX_SPINS

        _PEERS.max_spins = MAX_SPINS if capturing else _spins()
    if not capturing:
        torch.cuda.synchronize()
        dist.barrier(group=_TP.cpu_group)


def get_tp_group() -> TensorParallelGroup:
    return _TP


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def get_peer_buffers():
    """kernels.peer_collectives.PeerBuffers of this rank, or None."""
    return _PEERS


def set_peer_buffers(peers) -> None:
    """Install (or, with None, set aside) the peer buffers the collectives use."""
    global _PEERS
    _PEERS = peers


def set_tp_group(group: TensorParallelGroup) -> None:
    global _TP
    _TP = group


def _peer_fit(x: torch.Tensor, nbytes: int | None = None) -> bool:
    """Whether this collective on x (moving `nbytes`, by default x's) goes through the peer
    kernels rather than the group. A CUDA graph being captured must not hold an NCCL
    collective: past the buffers' capacity it fails."""
    if _TP.size == 1:
        return False
    if _PEERS is not None and x.is_cuda and _PEERS.fits(x, nbytes):
        return True
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"a collective on {tuple(x.shape)} {x.dtype} inside a CUDA graph needs the peer "
            "buffers, and they are absent or too small"
        )
    return False


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if _TP.size > 1:
        if _peer_fit(x):
            from kernels.peer_collectives import all_reduce_

            _lockstep()
            return all_reduce_(x, _PEERS)
        dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_reduce_rms_norm_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual_settled: bool = False,
) -> torch.Tensor | None:
    """residual + rms_norm(sum of x over the ranks) as one peer kernel, or None where that
    kernel does not apply (one rank, no peer buffers, a tensor they cannot take).
    `residual_settled`: see kernels.peer_collectives.all_reduce_rms_norm_add."""
    pushed = getattr(x, PUSHED_ATTRIBUTE, False)
    if pushed:
        delattr(x, PUSHED_ATTRIBUTE)  # read once: a second reader pushes x itself
    if not _peer_fit(x):
        return None
    from kernels.peer_collectives import all_reduce_rms_norm_add

    _lockstep()
    # a copy made by contiguous() is a PyTorch kernel, which lets the next one launch only once
    # it is done: the residual stays settled
    return all_reduce_rms_norm_add(
        x, residual.contiguous(), weight, eps, _PEERS, pushed, residual_settled
    )


PUSHED_ATTRIBUTE = "_afs_peer_words_pushed"
"""The attribute a partial product carries once its matmul pushed it to the other ranks as
tagged words (to `tp_partial_words_target`); its post-norm all-reduce takes it off as it reads
it."""
PUSH_PARTIALS = os.environ.get("AFS_PEER_PUSH_PARTIALS", "1") != "0"
"""Row-parallel matmuls push their partial sums as tagged words as they write them (where the
skinny matmul makes them and the post-norm's all-reduce takes tagged words); 0: the all-reduce
kernel pushes them itself."""


def tp_partial_words_target(rows: int, hidden: int, dtype: torch.dtype):
    """Where a row-parallel matmul pushes its [rows, hidden] partial sums for the post-norm's
    all-reduce (a kernels.peer_collectives.WordsTarget), or None: one rank, no peer buffers, no
    tagged words for that call, or AFS_PEER_PUSH_PARTIALS=0."""
    if _TP.size == 1 or _PEERS is None or not PUSH_PARTIALS:
        return None
    from kernels.peer_collectives import words_target

    return words_target(_PEERS, rows, hidden, dtype)


def tp_qk_sum_squares(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_scale: float
) -> torch.Tensor:
    """[T, 2] fp32: each token's sums of squares of q and of k (k's times k_scale) over every
    rank's heads, as one peer kernel where the peer buffers can take it."""
    if _peer_fit(qkv, nbytes=qkv.shape[0] * 2 * 4):  # it publishes [T, 2] fp32
        from kernels.peer_collectives import all_reduce_qk_squares

        _lockstep()
        return all_reduce_qk_squares(qkv, num_heads, num_kv_heads, head_dim, k_scale, _PEERS)
    from kernels.rope import qk_sum_squares

    return tp_all_reduce(qk_sum_squares(qkv, num_heads, num_kv_heads, head_dim, k_scale))


PEER_BROADCAST = os.environ.get("AFS_PEER_BROADCAST", "1") != "0"
"""Broadcasts (a decode step's ids, drawn by rank 0) go through the peer kernel where it takes
them; 0: through the group (NCCL)."""


def tp_broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` into every rank's `x` (same shape and dtype), in place; returns it. On GPUs
    it is queued on the stream like a kernel: no rank waits for it on the host. Through the
    peer kernel (kernels/peer_collectives.py's `broadcast_`) where it takes x, else the group."""
    if _TP.size > 1:
        peers = _PEERS
        if PEER_BROADCAST and peers is not None and x.device == peers.status.device:
            from kernels.peer_collectives import broadcast_, broadcast_fits

            if broadcast_fits(x, peers):
                _lockstep()
                return broadcast_(x, peers)
        dist.broadcast(x, src=0, group=_TP.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `x` along the last dimension, in rank order."""
    if _TP.size == 1:
        return x
    if _peer_fit(x):
        from kernels.peer_collectives import all_gather_last_dim

        _lockstep()
        return all_gather_last_dim(x, _PEERS)
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=-1)


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device) -> None:
    """Join the replica's group: rank 0's address in `init_method` (tcp://host:port) is the
    rendezvous. NCCL carries tensors between GPUs, gloo between CPU processes; objects always go
    over gloo."""
    if size == 1:
        set_tp_group(TensorParallelGroup(rank=0, size=1, group=None))
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared hosts
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    set_lockstep(True)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else group
    set_tp_group(TensorParallelGroup(rank=rank, size=size, group=group, cpu_group=cpu_group))


def init_peer_collectives(capacity: int, device: torch.device) -> bool:
    """Map every rank's peer buffer into every rank (CUDA IPC; the ranks' GPUs on one host and
    visible to each process), so all-reduces and gathers of up to `capacity` bytes run as the
    peer kernels, which a CUDA graph can capture. Collective over the group; True where every
    rank managed it and a test sum came out right, else False and the group carries everything.
    The kernels push (see the kernels); AFS_PEER_PUSH=0 in every rank's environment makes them
    pull instead. The post-norm's all-reduce, the QK-norm's sums and the all-gather (where its
    words fit) exchange tagged words; AFS_PEER_TAGGED=0 makes them use data and flags as the
    others do."""
    global _PEERS
    if _TP.size == 1 or device.type != "cuda":
        return False
    from kernels.peer_collectives import PeerBuffers

    own, handle = None, None
    try:
        from torch.multiprocessing.reductions import reduce_tensor

        size = PeerBuffers.buffer_bytes(capacity, _TP.size)
        own = torch.zeros(size, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)  # flags zeroed before any rank can see the buffer
        handle = reduce_tensor(own)
    except Exception as exc:  # no CUDA IPC here: the group carries everything
        log.warning("peer collectives: cannot share this rank's buffer: %s", exc)
    handles: list = [None] * _TP.size
    dist.all_gather_object(handles, handle, group=_TP.cpu_group)
    mapped, ok = [], 0
    try:
        if None not in handles:
            # opened on this rank's device, so this device gets access to the peers' memory
            index = device.index if device.index is not None else torch.cuda.current_device()
            for rank, (rebuild, args) in enumerate(handles):
                args = (*args[:6], index, *args[7:])  # the storage's device
                mapped.append(own if rank == _TP.rank else rebuild(*args))
            probe = torch.empty(16, dtype=torch.uint8, device=device)
            for buffer in mapped:
                probe.copy_(buffer[-16:])  # lets this device reach each peer's memory
            torch.cuda.synchronize(device)
            ok = 1
    except Exception as exc:
        log.warning("peer collectives: cannot map the other ranks' buffers: %s", exc)
    if tp_min(ok) == 1:
        addresses = [buffer.data_ptr() for buffer in mapped]
        peers = PeerBuffers.from_addresses(_TP.rank, addresses, capacity, device)
        peers.push = os.environ.get("AFS_PEER_PUSH", "1") != "0"  # the same on every rank
        peers.tagged = os.environ.get("AFS_PEER_TAGGED", "1") != "0"
        try:
            from kernels.peer_collectives import all_reduce_

            check = torch.full((4,), float(_TP.rank + 1), device=device)
            # compiled first, by a call that waits no more than 16 polls (the same
            # specialisation, a multiple of 16), then every rank meets: the test sum's short
            # limit then never counts a rank still compiling it
            _lockstep()
            peers.max_spins = 16
            all_reduce_(torch.zeros_like(check), peers)
            peers.status.zero_()  # queued behind that call
            _lockstep()
            peers.max_spins = 1 << 22  # a mapping that fails, fails fast
            all_reduce_(check, peers)
            peers.max_spins = _spins()
            expected = _TP.size * (_TP.size + 1) / 2
            ok = int(bool((check == expected).all()) and int(peers.status[0]) == 0)
        except Exception as exc:
            log.warning("peer collectives: the test sum failed: %s", exc)
            ok = 0
        if tp_min(ok) == 1:
            _PEERS = peers
            _PEER_MEMORY[:] = mapped
            return True
        log.warning("peer collectives: a test sum came out wrong; the group carries everything")
    return False


def warm_peer_post_norm(weight: torch.Tensor, eps: float, dtype: torch.dtype) -> list[int]:
    """Run the post-norm's all-reduce kernel of data and flags once on zeros, on every rank
    together, for each class of row count Triton compiles apart (one, a multiple of 16, any
    other) among the steps it serves: those too many rows for tagged words that the buffers still
    take (a prefill chunk of some hundred tokens). Decode steps and the warm-up's prefill never
    reach it, so otherwise the first such step would stall on its compiles (on two H200s, two of
    about 0.4 s each). `weight` and `eps`: a post-norm's; `dtype`: the activations'. Collective;
    returns the row counts run (none without peer buffers)."""
    peers = _PEERS
    if peers is None:
        return []
    from kernels.peer_collectives import all_reduce_rms_norm_add, words_target

    hidden = weight.shape[0]
    most = peers.capacity // (hidden * dtype.itemsize)
    # the first row count without tagged words (words_target's rule, which only gets stricter)
    sizes = range(1, most + 1)
    first = sizes[0] + bisect.bisect_left(
        sizes, True, key=lambda rows: words_target(peers, rows, hidden, dtype) is None
    )
    chosen: dict[str, int] = {}
    for rows in range(first, min(most, first + 16) + 1):
        chosen.setdefault("one" if rows == 1 else "16" if rows % 16 == 0 else "other", rows)
    row_counts = sorted(chosen.values())
    for rows in row_counts:
        x = torch.zeros(rows, hidden, dtype=dtype, device=weight.device)
        _lockstep()
        all_reduce_rms_norm_add(x, torch.zeros_like(x), weight, eps, peers)
    return row_counts


def warm_peer_broadcast(device: torch.device) -> list[int]:
    """Run the peer broadcast of a step's ids once on zeros, on every rank together, for each
    class of id count Triton compiles apart (two 32-bit words an id: a multiple of 16 words or
    not), so that the first decode steps that send their ids do not stall on its compile. Each
    broadcast is followed by an all-reduce, a call every rank waits in (as `broadcast_` needs).
    Collective; returns the id counts run (none without peer buffers or the peer broadcast)."""
    peers = _PEERS
    if peers is None or not PEER_BROADCAST or not peers.tagged:
        return []
    from kernels.peer_collectives import all_reduce_, broadcast_

    counts = [1, 8]
    for count in counts:
        _lockstep()
        broadcast_(torch.zeros(count, dtype=torch.int64, device=device), peers)
        _lockstep()
        all_reduce_(torch.zeros(4, device=device), peers)  # as init_peer_collectives' test sum
    return counts


class PeerCollectiveTimeout(RuntimeError):
    """A peer collective gave up waiting for another rank: the group is out of step."""


def _timed_out(status: int) -> PeerCollectiveTimeout:
    from kernels.peer_collectives import gave_up

    return PeerCollectiveTimeout(
        f"tensor-parallel rank {_TP.rank}: {gave_up(status)} waited past its limit for another "
        "rank (the first of this rank's peer calls to give up); the ranks are out of step and "
        "this replica must restart"
    )


def queue_peer_status() -> torch.Tensor | None:
    """Queue a copy of the peer kernels' status to the host behind the work queued so far; read
    it once that work is done (None without peer kernels on a GPU)."""
    peers = _PEERS
    if peers is None or peers.status.device.type != "cuda":
        return None
    return peers.status.to("cpu", non_blocking=True)  # into pinned memory, as the sampled ids


def raise_if_peers_timed_out(status: torch.Tensor | None) -> None:
    """`status`: a copy from queue_peer_status whose work is done."""
    kind = 0 if status is None else int(status[0])
    if kind:
        raise _timed_out(kind)


def check_peer_collectives() -> None:
    """Raise PeerCollectiveTimeout once a peer kernel on this rank has given up waiting, a step
    or two late: it never waits for the GPU, reading the status copied at an earlier call once
    that copy has landed, then queueing the next."""
    peers = _PEERS
    if peers is None:
        return
    if peers.status.device.type != "cuda":
        raise_if_peers_timed_out(peers.status)
        return
    copied = _PEER_STATUS.get("copied")
    if copied is not None and not copied.query():
        return
    raise_if_peers_timed_out(_PEER_STATUS.get("last"))
    _PEER_STATUS["last"] = queue_peer_status()
    _PEER_STATUS["copied"] = copied or torch.cuda.Event()
    _PEER_STATUS["copied"].record()


def destroy_tensor_parallel() -> None:
    """Leave the group: this process is one rank again even while (or if) the collective
    teardown of the process group below waits for the other ranks."""
    set_peer_buffers(None)
    _PEER_MEMORY.clear()
    _PEER_STATUS.clear()
    parallel = _TP.size > 1
    set_tp_group(TensorParallelGroup(rank=0, size=1, group=None))
    if parallel and dist.is_initialized():
        dist.destroy_process_group()


def tp_broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (what rank 0 passes is returned to it unchanged)."""
    if _TP.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_TP.cpu_group)
    return box[0]


def tp_min(value: int) -> int:
    """The smallest of the ranks' values (every rank gets it)."""
    if _TP.size == 1:
        return value
    values: list = [None] * _TP.size
    dist.all_gather_object(values, value, group=_TP.cpu_group)
    return min(values)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division, or a ValueError naming what could not be split."""
    if numerator % denominator:
        raise ValueError(
            f"{what}: {numerator} is not divisible by tensor-parallel size {denominator}"
        )
    return numerator // denominator
