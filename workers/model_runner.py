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
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import SchedulerOutput
from workers.forward_context import ForwardContext, forward_context
from workers.layers.sampler import Sampler, SamplingBatch, TokenLogprobs, prompt_logprobs


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


class ModelRunner:
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

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, schedule: SchedulerOutput) -> RunnerOutput:
        for request_id in schedule.finished_request_ids:
            self.states.pop(request_id, None)
        if not schedule.requests:
            return RunnerOutput()

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

        logits_of = self._forward(schedule, input_ids, positions)

        # every rank computes the logits (the LM head gathers them), only rank 0 samples
        output = RunnerOutput()
        for request_id, (start, rows, next_tokens) in prompt_rows.items():
            logits = logits_of(rows)  # [P, V]
            if self.sampler is not None:
                top_n = self.states[request_id].params.prompt_logprobs
                scored = prompt_logprobs(logits, self._to_device(next_tokens), top_n)
                output.prompt_logprobs[request_id] = (start, scored)
        if not sample_rows:
            return output
        logits = logits_of(sample_rows)  # [R, V]
        if self.sampler is None:
            return output
        batch = SamplingBatch(
            params=[state.params for _, state in sampled_states],
            seeds=[state.seed for _, state in sampled_states],
            output_positions=[len(state.output_token_ids) for _, state in sampled_states],
            prompt_token_ids=[state.prompt_token_ids for _, state in sampled_states],
            output_token_ids=[state.output_token_ids for _, state in sampled_states],
        )
        result = self.sampler(logits, batch)
        token_ids = result.token_ids.tolist()  # the step's one host-device sync
        for (request_id, state), token, logprobs in zip(
            sampled_states, token_ids, result.logprobs, strict=True
        ):
            state.output_token_ids.append(token)
            output.sampled[request_id] = token
            if logprobs is not None:
                output.logprobs[request_id] = logprobs
        return output

    def _forward(
        self, schedule: SchedulerOutput, input_ids: list[int], positions: list[int]
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
            _, logits = self.graphs.run(input_ids, positions, slots, tables)
            batch = len(requests)

            def decode_logits(rows: list[int]) -> torch.Tensor:
                if rows == list(range(batch)):
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
        with forward_context(ForwardContext(meta, self.kv_caches, self.backend)):
            hidden = self.model(self._to_device(input_ids), self._to_device(positions))  # [T, H]

        def eager_logits(rows: list[int]) -> torch.Tensor:
            return self.model.compute_logits(hidden[self._to_device(rows)])

        return eager_logits
