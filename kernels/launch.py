"""How the kernels launch: the SM count their grids are sized by, and programmatic dependent
launch (Hopper and later), on by default (AFS_PDL=0 turns it off).

A kernel launched this way may start while the kernel before it on the stream is finishing: its
programs become resident and wait at `griddepcontrol.wait` until the previous grid has completed
and its writes are visible, instead of the launch starting only then. A decode step at batch 1 is
hundreds of short kernels in a row, so the launch and ramp-up between each pair is a large part
of it. Every kernel that takes `PDL` calls `wait_for_previous` before it writes global memory or
reads anything a kernel of the step may write, so nothing it touches can race with the kernel
before it; it then lets the next kernel launch early in turn (a few at another point: decode
attention once its K/V reads are done, or at its start; the tagged post-norm before its wait). A
kernel launched that way still waits for the whole of the one before it, and that one for its
own before it, so what any earlier kernel wrote is visible after the wait. What none of them
writes (weights, the step's inputs, the slab's earlier tokens) may be read before the wait, while
the kernel before finishes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

PDL = os.environ.get("AFS_PDL", "1") != "0"
_DEFAULT_NUM_SMS = 132  # H200; the CPU interpreter has no SM count


@functools.lru_cache
def num_sms(device: torch.device) -> int:
    """The device's SM count (the H200's in the interpreter), asked once per device."""
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


_DEVICE_BUFFERS: dict[tuple[str, torch.device], tuple[torch.Tensor, ...]] = {}


def device_buffers(
    owner: str, device: torch.device, make: Callable[[], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """Buffers a kernel keeps on a device across calls (scratch space, counters each call leaves
    at zero), made by `make` on first use. A CUDA graph's capture must not be that first use (the
    graph would own them): the decode step runs once eagerly before it is captured."""
    key = (owner, device)
    if key not in _DEVICE_BUFFERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{owner}'s buffers must exist before a CUDA graph is captured: run the decode "
                "step once eagerly first"
            )
        _DEVICE_BUFFERS[key] = make()
    return _DEVICE_BUFFERS[key]


@functools.lru_cache
def _hopper_or_later(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 or more."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr: on for a Hopper or later GPU unless
    AFS_PDL=0, else off (the interpreter, older GPUs)."""
    if PDL and _hopper_or_later(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def last_to_arrive(counter, total):
    """After this program's stores: count it in at `counter` (acq_rel, GPU scope) and say whether
    it is the last of `total` programs. The last sees every other program's stores (read them
    with .cg, from L2, never an L1 line its SM may hold from an earlier call) and then calls
    `rearm(counter)`."""
    tl.debug_barrier()  # every thread's stores are made before the counter moves
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == total - 1


@triton.jit
def rearm(counter):
    """A counter back to zero, ready for the kernel's next call."""
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def wait_for_previous_only(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible, but let
    the next kernel launch only at `launch_next` (or as each program ends). For a short kernel
    bound by latency, not bandwidth: the next kernel's programs, launched early, would start
    their weight prefetch while this kernel's own loads are still in flight."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_next(PDL: tl.constexpr):
    """With PDL: this program has done its part; the next kernel may launch."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible, then let
    the next kernel launch. Called first, before any global memory access."""
    wait_for_previous_only(PDL)
    launch_next(PDL)


@triton.jit
def wait_for_previous_launching(LAUNCH: tl.constexpr, PDL: tl.constexpr):
    """`wait_for_previous` with LAUNCH, else `wait_for_previous_only` (the caller lets the next
    kernel launch later, at `launch_next`)."""
    wait_for_previous_only(PDL)
    if LAUNCH:
        launch_next(PDL)
