"""The global scheduler: every live request, a bounded priority queue, dispatch, aborts, failover.

A request with n completions becomes n entries, each with n = 1 and its own seed, because each
completion streams (and may have to be resumed) on its own. Seeds are fixed here when the client
gave none: a completion re-dispatched after its replica died is resumed with the tokens already
streamed (`resume_output_ids`), so it continues at the same output position with the same seed
and draws what it would have drawn: the client's stream goes on with nothing lost or repeated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray

from cluster.backend import ModelCard, NoReplicaError, QueueFullError, TokenEvent
from cluster.config import ClusterConfig
from cluster.replica import Replica
from cluster.router import Router
from workers.actor import NewWork
from workers.engine.sampling_params import SamplingParams
from workers.weights.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_SEED_SPACE = 1 << 63


@dataclass(eq=False)
class _Completion:
    request_id: str
    """The id replicas know it by: the client's, or '<id>#<index>' when n > 1."""
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    order: int
    """Arrival order: ties in priority, and a failed-over completion keeps its place."""
    events: asyncio.Queue
    streamed: list[int] = field(default_factory=list)
    replica: Replica | None = None
    finished: bool = False
    sent_prompt_logprobs: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    dispatched: bool = False


class GlobalScheduler:
    def __init__(
        self, config: ClusterConfig, model: ModelCard, tokenizer: Tokenizer, metrics=None
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.router = Router(block_size=config.engine.block_size)
        self.max_queue = config.max_queue
        self.replicas: list[Replica] = []
        self.table: dict[str, _Completion] = {}
        self._heap: list[tuple[int, int, _Completion]] = []
        self._queued = 0
        self._order = itertools.count()
        self._seeds = random.Random()
        self._wake = asyncio.Event()
        self._outgoing: dict[Replica, list[NewWork]] = {}
        self._dispatcher: asyncio.Task | None = None
        self._restarts: set[asyncio.Task] = set()

    # -- life cycle --

    async def start(self) -> None:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        gpus = self.config.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if self.config.engine.resolved_device().type == "cuda" else 0.0
        for i in range(self.config.replicas):
            self.replicas.append(
                Replica(
                    f"replica-{i}",
                    self.config.engine,
                    self.config.cpus_per_worker,
                    gpus,
                    self._on_outputs,
                    self._on_death,
                    target_node=nodes[i % len(nodes)] if nodes else None,
                )
            )
        await asyncio.gather(*(r.start() for r in self.replicas))
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatch")

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)

    # -- requests --

    def stream(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[TokenEvent]:
        if not any(r.state in ("ready", "starting") for r in self.replicas):
            raise NoReplicaError("no replica is healthy")
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if any(i in self.table for i in ids):
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if self._queued + params.n > self.max_queue:
            raise QueueFullError(f"the admission queue is full ({self.max_queue} requests)")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        events: asyncio.Queue = asyncio.Queue()
        completions = [
            _Completion(
                request_id=completion_id,
                index=index,
                prompt_token_ids=prompt_token_ids,
                params=dataclasses.replace(params, n=1, seed=(seed + index) % _SEED_SPACE),
                priority=priority,
                order=next(self._order),
                events=events,
            )
            for index, completion_id in enumerate(ids)
        ]
        for completion in completions:
            self.table[completion.request_id] = completion
            self._push(completion)
        self._assign()  # at once: the queue bound counts only what truly waits
        self._wake.set()  # the loop sends what was assigned
        return self._events(completions, events)

    async def _events(
        self, completions: list[_Completion], events: asyncio.Queue
    ) -> AsyncIterator[TokenEvent]:
        remaining = len(completions)
        try:
            while remaining:
                event = await events.get()
                remaining -= event.finished
                yield event
        finally:
            if remaining:
                await self._abort(completions)

    async def _abort(self, completions: list[_Completion]) -> None:
        by_replica: dict[Replica, list[str]] = {}
        for completion in completions:
            if completion.finished:
                continue
            completion.finished = True
            self.table.pop(completion.request_id, None)
            if completion.replica is None:
                self._queued -= 1
            else:
                completion.replica.inflight.discard(completion.request_id)
                by_replica.setdefault(completion.replica, []).append(completion.request_id)
        for replica, request_ids in by_replica.items():
            await replica.submit([], request_ids)
        self._wake.set()

    def _push(self, completion: _Completion) -> None:
        heapq.heappush(self._heap, (completion.priority, completion.order, completion))
        self._queued += 1

    # -- dispatch --

    def _assign(self) -> None:
        """Move queued completions to replicas with room; their submit goes out from the loop."""
        while self._heap:
            ready = [r for r in self.replicas if r.has_room]
            if not ready:
                break
            _, _, completion = heapq.heappop(self._heap)
            if completion.finished:
                continue  # aborted while queued
            self._queued -= 1
            replica = self.router.choose(ready, completion.prompt_token_ids)
            completion.replica = replica
            replica.inflight.add(completion.request_id)
            if not completion.dispatched and self.metrics is not None:
                self.metrics.observe_queue_time(time.perf_counter() - completion.arrival_time)
            completion.dispatched = True
            self._outgoing.setdefault(replica, []).append(
                NewWork(
                    completion.request_id,
                    completion.prompt_token_ids,
                    completion.params,
                    list(completion.streamed),
                )
            )

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._assign()
            outgoing, self._outgoing = self._outgoing, {}
            for replica, new in outgoing.items():
                await replica.submit(new, [])
            self._update_queue_metrics()

    def _on_outputs(self, replica: Replica, outputs: list) -> None:
        for output in outputs:
            completion = self.table.get(output.request_id)
            if completion is None or completion.replica is not replica:
                continue  # aborted, or from before a failover
            prompt_logprobs = None
            if output.prompt_logprobs is not None and not completion.sent_prompt_logprobs:
                prompt_logprobs, completion.sent_prompt_logprobs = output.prompt_logprobs, True
            completion.streamed += output.new_token_ids
            if output.finished:
                completion.finished = True
                self.table.pop(completion.request_id, None)
                replica.inflight.discard(completion.request_id)
                replica.served += 1
                self._wake.set()
            completion.events.put_nowait(
                TokenEvent.from_output(output, completion.index, prompt_logprobs)
            )
        if self.metrics is not None:
            stats = replica.stats
            self.metrics.set_replica(
                replica.replica_id,
                1 - stats.get("free_kv_blocks", 0) / max(stats.get("num_kv_blocks", 1), 1),
                stats.get("prefix_hit_rate", 0.0),
                stats.get("batch_size", 0),
                stats.get("step_seconds", 0.0),
                stats.get("preemptions", 0),
            )
            self._update_queue_metrics()

    def _update_queue_metrics(self) -> None:
        if self.metrics is not None:
            running = sum(r.load for r in self.replicas)
            self.metrics.set_queue(running, self._queued)

    # -- failover --

    async def _on_death(self, replica: Replica) -> None:
        lost = [self.table[i] for i in replica.inflight if i in self.table]
        replica.inflight.clear()
        for completion in lost:
            completion.replica = None
            self._push(completion)  # same priority and order: back at its place in line
        log.warning("replica %s died; re-dispatching %d requests", replica.replica_id, len(lost))
        self._wake.set()
        task = asyncio.create_task(self._restart(replica))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, replica: Replica) -> None:
        for attempt in range(3):
            try:
                await replica.restart()
                log.warning("replica %s is back", replica.replica_id)
                break
            except Exception as error:
                log.error("restarting %s failed (%d): %s", replica.replica_id, attempt + 1, error)
                await asyncio.sleep(2.0 * (attempt + 1))
        self._wake.set()

    # -- introspection --

    def server_info(self) -> dict:
        replicas = []
        for r in self.replicas:
            stats = r.stats
            replicas.append(
                {
                    "replica_id": r.replica_id,
                    "node_id": r.info.get("node_id") or "",
                    "state": r.state,
                    "tp": self.config.engine.tp,
                    "total_kv_blocks": stats.get("num_kv_blocks", r.info.get("num_kv_blocks", 0)),
                    "free_kv_blocks": stats.get("free_kv_blocks", r.info.get("num_kv_blocks", 0)),
                    "running": stats.get("running", 0),
                    "waiting": stats.get("waiting", 0),
                    "restarts": r.restarts,
                    "served": r.served,
                }
            )
        return {
            "model": self.model.name,
            "replicas": replicas,
            "total_kv_blocks": sum(r["total_kv_blocks"] for r in replicas),
            "free_kv_blocks": sum(r["free_kv_blocks"] for r in replicas),
            "running_requests": sum(r["running"] for r in replicas),
            "waiting_requests": sum(r["waiting"] for r in replicas) + self._queued,
        }
