"""Continuous batching.

The step rule: there is no prefill phase and no decode phase. Each request has
`num_computed_tokens`, which catches up to `num_tokens` (prompt + output so far). Each step spends
a token budget (`max_num_batched_tokens`) on running requests first, in the order they were
admitted, then on waiting ones, in chunks when a prompt is longer than what is left (chunked
prefill). A request whose computed tokens reach its known tokens samples one more token. When the
KV slab runs out, the newest running request is preempted (its blocks freed, its tokens recomputed
when it is admitted again). A request that could never fit finishes with an error for itself alone.
Speculative decoding will schedule k + 1 tokens for one request: the rule already allows it.
`schedule_ahead` builds the next decode step while this step's sampled ids are still on the
device (the engine's asynchronous scheduling).

    request:  |<------ num_computed_tokens ------>|<-- scheduled this step -->|
              |<------------------------ num_tokens ------------------------->|
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.engine.kv_cache import KVCacheManager
from workers.engine.request import Request, RequestStatus
from workers.engine.sampling_params import SamplingParams

PENDING_TOKEN = -1
"""The token id of a row that reads its id on the device (a draw not yet on the host)."""


@dataclass
class NewRequestData:
    """What the runner needs to sample a request it has not seen (or saw before a preemption)."""

    params: SamplingParams
    """Sampling parameters."""
    seed: int
    """Seed of every draw of this request."""
    prompt_token_ids: list[int]
    """For the repetition penalty and prompt logprobs."""
    output_token_ids: list[int]
    """Tokens sampled before a preemption: penalties and positions of draws continue from them."""


@dataclass
class ScheduledRequest:
    request_id: str
    """Which request these rows belong to."""
    token_ids: list[int]
    """The tokens computed this step: a prompt chunk, or the last sampled token."""
    num_computed_tokens: int
    """Tokens already in the slab; the new tokens' positions start here."""
    block_table: list[int]
    """The request's slab blocks in order, enough for every token up to this step's last."""
    sample: bool
    """This step reaches the request's last known token: sample the next one."""
    new_request: NewRequestData | None = None
    """Set the first time the runner sees the request, and after each preemption."""


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    """The batch, in row order."""
    num_batched_tokens: int = 0
    """Total new tokens (rows of the forward)."""
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests finished or preempted since the last step: the runner drops their state."""
    preempted_request_ids: list[str] = field(default_factory=list)
    """Requests preempted while scheduling this step (for metrics and tests)."""

    @property
    def ids_on_device(self) -> bool:
        """Built ahead (`Scheduler.schedule_ahead`): the rows' ids are the previous step's draw,
        still on the device; rank 0 broadcasts them to the other ranks there."""
        return bool(self.requests) and self.requests[0].token_ids[0] == PENDING_TOKEN


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
    ) -> None:
        self.kv = kv_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.errored: list[Request] = []
        """Requests that finished with an error while scheduling, for the engine to report."""
        self._dropped: list[str] = []
        self._sent: set[str] = set()
        self.num_preemptions = 0
        self.num_chunked_prefills = 0

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """End a request (stop, length, abort or error) and give back its blocks."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.error = error
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._drop(request.request_id)

    def _drop(self, request_id: str) -> None:
        if request_id in self._sent:
            self._sent.discard(request_id)
            self._dropped.append(request_id)

    def _preempt_newest(self) -> Request:
        victim = self.running.pop()
        self.kv.free(victim)
        victim.status = RequestStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        self._drop(victim.request_id)
        return victim

    def _never_fits(self, request: Request) -> str | None:
        longest = request.num_prompt_tokens + request.params.max_tokens
        if self.kv.blocks_needed(longest) > self.kv.pool.num_blocks:
            return (
                f"request needs {self.kv.blocks_needed(longest)} KV blocks for its "
                f"{request.num_prompt_tokens} prompt tokens and max_tokens="
                f"{request.params.max_tokens}, but the whole slab has {self.kv.pool.num_blocks}"
            )
        return None

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # -- running requests first, oldest first; preempt the newest when blocks run out --
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self._preempt_newest()
                output.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            output.requests.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1

        # -- then waiting ones, in arrival order, while budget, sequences and blocks last --
        if not output.preempted_request_ids:
            budget = self._admit_waiting(output, budget)

        output.num_batched_tokens = self.max_num_batched_tokens - budget
        output.finished_request_ids, self._dropped = self._dropped, []
        return output

    def schedule_ahead(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `previous` while previous's sampled tokens are still on the device.

        Only when it is certain to be what `schedule` would return once they arrive: previous
        was a decode step of exactly the running requests, in order; nobody waits who could be
        admitted; no request reaches max_tokens with the token in flight; and blocks for one
        more token each are free. A request may still stop on that token (EOS, a stop string):
        its row of this step is computed and thrown away. Rows carry PENDING_TOKEN for the id
        they read on the device; positions are one past the in-flight token.

            positions  ... p-1 | p (in flight: computing, its id known) | p+1 (this step's row)
        """
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        if len(previous.requests) != len(self.running) or previous.preempted_request_ids:
            return None
        for scheduled, request in zip(previous.requests, self.running, strict=True):
            if (
                scheduled.request_id != request.request_id
                or len(scheduled.token_ids) != 1
                or not scheduled.sample
                or request.num_computed_tokens + 1 != request.num_tokens
                or len(request.output_token_ids) + 1 >= request.params.max_tokens
            ):
                return None
        output = SchedulerOutput()
        for request in self.running:
            # blocks up to the row after the in-flight token (computed tokens + 2)
            if not self.kv.allocate_slots(request, 2):
                return None  # blocks taken so far are the next step's anyway
            output.requests.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=[PENDING_TOKEN],
                    num_computed_tokens=request.num_computed_tokens + 1,
                    block_table=self.kv.block_table(request.request_id),
                    sample=True,
                )
            )
        output.num_batched_tokens = len(output.requests)
        return output

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> int:
        held_back: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            error = self._never_fits(request)
            if error is not None:
                self.finish(request, RequestStatus.FINISHED_ERROR, error)
                self.errored.append(request)
                continue
            leader = request.leader
            if (
                leader is not None
                and not leader.status.finished
                and (leader.num_computed_tokens < leader.num_prompt_tokens)
            ):
                # an n > 1 sibling waits for the leader's prompt blocks to reuse them
                held_back.append(self.waiting.popleft())
                continue
            cached = self.kv.find_cached_prefix(request)
            num_computed = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_computed
            request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.requests.append(self._scheduled(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        if start + num_new < request.num_tokens:
            self.num_chunked_prefills += 1
        new_data = None
        if request.request_id not in self._sent:
            self._sent.add(request.request_id)
            new_data = NewRequestData(
                request.params,
                request.seed,
                request.prompt_token_ids,
                list(request.output_token_ids),
            )
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            num_computed_tokens=start,
            block_table=self.kv.block_table(request.request_id),
            sample=start + num_new == request.num_tokens,
            new_request=new_data,
        )

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Account for a finished step: computed tokens advance, sampled tokens are appended.

        Returns the requests that received a token (the engine decides whether they stop).
        """
        advanced = []
        for scheduled in output.requests:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(scheduled.token_ids)
            token = sampled.get(scheduled.request_id)
            if token is not None:
                request.output_token_ids.append(token)
                advanced.append(request)
        return advanced
