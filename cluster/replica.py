"""One model instance: a placement group of worker actors on one node, its health and restarts.

The head keeps one poll in flight per replica: each reply carries every output the replica's
steps produced since the previous one, and an actor that died makes the poll raise, which is how
the head learns of it (then `on_death` re-dispatches its requests and the replica restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.actor import FollowerActor, NewWork, WorkerActor, gpu_ids_here, rendezvous_here
from workers.config import EngineConfig

log = logging.getLogger(__name__)
_RemoteWorker = ray.remote(WorkerActor)
_RemoteFollower = ray.remote(FollowerActor)
_rendezvous = ray.remote(rendezvous_here)
_gpu_ids = ray.remote(gpu_ids_here)


class Replica:
    def __init__(
        self,
        replica_id: str,
        engine: EngineConfig,
        cpus: float,
        gpus: float,
        on_outputs: Callable[[Replica, list], None],
        on_death: Callable[[Replica], Awaitable[None]],
        target_node: str | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.engine = engine
        self.cpus, self.gpus = cpus, gpus
        self.on_outputs, self.on_death = on_outputs, on_death
        self.target_node = target_node
        self.state = "starting"
        self.inflight: set[str] = set()
        self.stats: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.served = 0
        self.actor = None
        self.followers: list = []
        self._group = None
        self._tasks: list[asyncio.Task] = []

    @property
    def load(self) -> int:
        return len(self.inflight)

    @property
    def has_room(self) -> bool:
        return self.state == "ready" and self.load < self.info.get("max_num_seqs", 1)

    async def start(self) -> None:
        self.state = "starting"
        tp = self.engine.tp
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self._group = placement_group(
            [bundle] * tp, strategy="STRICT_PACK", _soft_target_node_id=self.target_node
        )
        await self._group.ready()

        def placed(index: int) -> dict:
            strategy = PlacementGroupSchedulingStrategy(self._group, index)
            return {"num_cpus": self.cpus, "num_gpus": self.gpus, "scheduling_strategy": strategy}

        rendezvous = await _rendezvous.options(**placed(0)).remote() if tp > 1 else None
        replica_gpus = None
        if tp > 1 and self.gpus == 1:
            # each bundle's GPU, so that every rank can see all of them (peer collectives)
            found = await asyncio.gather(
                *(_gpu_ids.options(**placed(r)).remote() for r in range(tp))
            )
            if all(len(ids) == 1 for ids in found):
                replica_gpus = [ids[0] for ids in found]
        incarnation = f"{self.replica_id}-{self.restarts}"
        self.followers = [
            _RemoteFollower.options(
                name=f"afs-rank{rank}-{incarnation}", namespace="afs", **placed(rank)
            ).remote(self.engine, rank, rendezvous, replica_gpus)
            for rank in range(1, tp)
        ]
        self.actor = _RemoteWorker.options(
            name=f"afs-worker-{incarnation}", namespace="afs", max_concurrency=4, **placed(0)
        ).remote(self.engine, self.replica_id, rendezvous, replica_gpus)
        runs = [follower.run.remote() for follower in self.followers]
        try:
            self.info = await self.actor.info.remote()
        except RayActorError as error:
            self.state = "dead"
            raise RuntimeError(f"replica {self.replica_id} failed to start: {error}") from None
        self.state = "ready"
        self._tasks = [asyncio.create_task(self._poll(), name=f"poll-{self.replica_id}")]
        self._tasks += [asyncio.create_task(self._watch(run)) for run in runs]

    async def _die(self, error: Exception) -> None:
        if self.state == "dead":
            return  # another rank's end was noticed first
        log.warning("replica %s died: %s", self.replica_id, error)
        self.state = "dead"
        await self.on_death(self)

    async def _watch(self, run) -> None:
        """A follower's `run` returns only when the replica stops; raising means it died."""
        try:
            await run
        except (RayActorError, RayTaskError) as error:  # the actor died, or `follow` raised
            await self._die(error)

    async def _poll(self) -> None:
        while True:
            try:
                batch = await self.actor.poll.remote(0.5)
            except RayActorError as error:
                await self._die(error)
                return
            self.stats = batch["stats"]
            if batch["outputs"]:
                self.on_outputs(self, batch["outputs"])

    async def submit(self, new: list[NewWork], aborts: list[str]) -> None:
        """Hand requests and aborts to the actor; a dead actor is noticed by the poll."""
        if self.actor is None or self.state == "dead":
            return
        with contextlib.suppress(RayActorError):
            await self.actor.submit.remote(new, aborts)

    async def restart(self) -> None:
        self.restarts += 1
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        for actor in [self.actor, *self.followers]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
        self.actor, self.followers = None, []
        if self._group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._group)
            self._group = None
        self.state = "dead"
