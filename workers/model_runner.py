"""Turns a `SchedulerOutput` into tensors, runs the model over the paged slab, and samples.

Rows of one forward are the scheduled requests' new tokens, flattened in schedule order. Only the
last row of a request that reaches its last known token is sampled; requests that asked for prompt
logprobs also get logits for their prompt rows. A step where every request has one new token (a
decode step) runs through `DecodeGraphs` when the runner has them: static buffers, padded batch
sizes, and a CUDA graph replay unless graphs are off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.attention import AttentionBackend, build_attention_metadata
from workers.decode_graphs import DecodeGraphs
from workers.distributed import queue_peer_status, raise_if_peers_timed_out
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import SchedulerOutput
from workers.forward_context import ForwardContext, forward_context
from workers.layers.sampler import (
    Sampler,
    SamplingBatch,
    TokenLogprobs,
    prompt_logprobs,
    to_device,
)


@dataclass
class RequestState:
    """What the runner keeps between steps for one request: enough to sample it."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    """Request id -> the token sampled for it this step."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """Request id -> logprobs of its sampled token, for requests that asked."""
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    """Request id -> (first position, logprobs of the prompt tokens after the positions computed
    this step): position p scores prompt token p + 1."""


@dataclass
class StepInFlight:
    """A step whose forward is queued: what sampling it and collecting its tokens need."""

    output: RunnerOutput
    """Filled as far as the forward allows (prompt logprobs); `collect` adds the samples."""
    logits: torch.Tensor | None = None
    """[R, V] logits of the rows to sample, None when no row samples (or on other ranks)."""
    sampled_states: list[tuple[str, RequestState]] = field(default_factory=list)
    """Request id and state of each sampled row, in row order."""
    token_ids: torch.Tensor | None = None
    """[R] sampled ids on the device, once `sample` has queued the draw."""
    token_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    host_token_ids: torch.Tensor | None = None
    """[R] pinned host copy of token_ids, in flight until `copied` completes (CUDA)."""
    copied: torch.cuda.Event | None = None
    peer_status: torch.Tensor | None = None
    """Pinned host copy of the peer collectives' status behind this step (tp > 1 on GPUs)."""


class ModelRunner:
    """One step is forward → sample → collect; `execute` runs the three in a row. Keeping them
    apart lets the engine queue the next step's forward (its input ids taken on the device from
    this step's draw) before it waits for this step's ids."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        sampler: Sampler | None,
        block_size: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sampler = sampler
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        self.states: dict[str, RequestState] = {}
        # the sampled ids' copy to the host
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return to_device(values, torch.int64, self.device)

    def execute(
        self, schedule: SchedulerOutput, input_ids_on_device: torch.Tensor | None = None
    ) -> RunnerOutput:
        return self.collect(self.sample(self.forward(schedule, input_ids_on_device)))

    @torch.inference_mode()
    def forward(
        self, schedule: SchedulerOutput, input_ids_on_device: torch.Tensor | None = None
    ) -> StepInFlight:
        """Queue the model over the step's rows. `input_ids_on_device` ([B] ids, one row per
        request, in order) replaces the scheduled token ids of a decode step."""
        for request_id in schedule.finished_request_ids:
            self.states.pop(request_id, None)
        if not schedule.requests:
            return StepInFlight(RunnerOutput())

        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled_states: list[tuple[str, RequestState]] = []
        prompt_rows: dict[str, tuple[int, list[int], list[int]]] = {}  # id -> start, rows, next
        for scheduled in schedule.requests:
            if scheduled.new_request is not None:
                new = scheduled.new_request
                self.states[scheduled.request_id] = RequestState(
                    new.params, new.seed, new.prompt_token_ids, list(new.output_token_ids)
                )
            state = self.states[scheduled.request_id]
            first_row, start = len(input_ids), scheduled.num_computed_tokens
            input_ids.extend(scheduled.token_ids)
            positions.extend(range(start, start + len(scheduled.token_ids)))
            if state.params.prompt_logprobs is not None:
                # row at position p predicts prompt token p + 1
                prompt = state.prompt_token_ids
                last = min(start + len(scheduled.token_ids), len(prompt) - 1)
                if last > start:
                    prompt_rows[scheduled.request_id] = (
                        start,
                        list(range(first_row, first_row + last - start)),
                        prompt[start + 1 : last + 1],
                    )
            if scheduled.sample:
                sample_rows.append(len(input_ids) - 1)
                sampled_states.append((scheduled.request_id, state))
        if input_ids_on_device is not None and input_ids_on_device.shape != (len(input_ids),):
            raise ValueError(
                f"input_ids_on_device: expected {len(input_ids)} ids, one per decode row, "
                f"got {tuple(input_ids_on_device.shape)}"
            )

        logits_of = self._forward(schedule, input_ids, positions, input_ids_on_device)

        # every rank computes the logits (the LM head gathers them), only rank 0 samples
        step = StepInFlight(RunnerOutput(), sampled_states=sampled_states)
        for request_id, (start, rows, next_tokens) in prompt_rows.items():
            logits = logits_of(rows)  # [P, V]
            if self.sampler is not None:
                top_n = self.states[request_id].params.prompt_logprobs
                scored = prompt_logprobs(logits, self._to_device(next_tokens), top_n)
                step.output.prompt_logprobs[request_id] = (start, scored)
        if sample_rows:
            step.logits = logits_of(sample_rows)  # [R, V]
        return step

    @torch.inference_mode()
    def sample(self, step: StepInFlight) -> StepInFlight:
        """Queue the draw of the step's sampled rows, from each request's state as it is now
        (the tokens collected so far), and the copy of the ids to the host."""
        if self.sampler is None or step.logits is None:
            return step
        states = [state for _, state in step.sampled_states]
        batch = SamplingBatch(
            params=[state.params for state in states],
            seeds=[state.seed for state in states],
            output_positions=[len(state.output_token_ids) for state in states],
            prompt_token_ids=[state.prompt_token_ids for state in states],
            output_token_ids=[state.output_token_ids for state in states],
        )
        result = self.sampler(step.logits, batch)
        step.token_ids, step.token_logprobs = result.token_ids, result.logprobs
        if self._copy_stream is not None:
            # The ids go to the host (pinned memory) on a stream of their own, so the next step
            # queued behind the draw need not wait for the copy.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                step.host_token_ids = result.token_ids.to("cpu", non_blocking=True)
                step.peer_status = queue_peer_status()
                step.copied = torch.cuda.Event()
                step.copied.record()
            # made on the main stream, read on the copy's: not reused before the copy is done
            result.token_ids.record_stream(self._copy_stream)
        return step

    def collect(self, step: StepInFlight) -> RunnerOutput:
        """Wait for the step's sampled ids (the step's one host-device sync) and hand them out."""
        output = step.output
        if step.token_ids is None:
            return output
        if step.copied is not None:
            step.copied.synchronize()
            token_ids = step.host_token_ids.tolist()
        else:
            token_ids = step.token_ids.tolist()
        raise_if_peers_timed_out(step.peer_status)  # the draw came from a broken step
        for (request_id, state), token, logprobs in zip(
            step.sampled_states, token_ids, step.token_logprobs, strict=True
        ):
            state.output_token_ids.append(token)
            output.sampled[request_id] = token
            if logprobs is not None:
                output.logprobs[request_id] = logprobs
        return output

    def _forward(
        self,
        schedule: SchedulerOutput,
        input_ids: list[int],
        positions: list[int],
        input_ids_on_device: torch.Tensor | None,
    ) -> Callable[[list[int]], torch.Tensor]:
        """Runs the model over the step's rows; returns a function giving chosen rows' logits."""
        requests = schedule.requests
        if (
            self.graphs is not None
            and len(input_ids) == len(requests)
            and self.graphs.padded_size(len(requests)) is not None
        ):  # a decode step: one row per request, in order
            block_size = self.block_size
            slots = [
                s.block_table[p // block_size] * block_size + p % block_size
                for s, p in zip(requests, positions, strict=True)
            ]
            tables = [s.block_table for s in requests]
            ids = input_ids if input_ids_on_device is None else input_ids_on_device
            logits = self.graphs.run(ids, positions, slots, tables)
            batch = len(requests)

            def decode_logits(rows: list[int]) -> torch.Tensor:
                if len(rows) == batch:  # rows ascend and are distinct: all of them
                    return logits[:batch]
                return logits[self._to_device(rows)]

            return decode_logits

        meta = build_attention_metadata(
            [s.block_table for s in requests],
            [s.num_computed_tokens for s in requests],
            [len(s.token_ids) for s in requests],
            self.block_size,
            self.device,
        )
        ids = self._to_device(input_ids) if input_ids_on_device is None else input_ids_on_device
        with forward_context(ForwardContext(meta, self.kv_caches, self.backend)):
            hidden = self.model(ids, self._to_device(positions))  # [T, H]

        def eager_logits(rows: list[int]) -> torch.Tensor:
            return self.model.compute_logits(hidden[self._to_device(rows)])

        return eager_logits
