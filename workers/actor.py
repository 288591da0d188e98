"""A worker actor: one engine (a replica's rank 0 today) with its step loop on its own thread.

The head talks to it through three calls, each batched: `submit` (new requests and aborts),
`poll` (every output produced since the last poll, blocking until there is one), and `info`.
A step's outputs for all its requests leave in one reply, never one call per token per request.
The class is plain Python; the cluster wraps it with `ray.remote` (threaded, so a poll can wait
while a submit comes in).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from workers.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput, Usage
from workers.engine.sampling_params import SamplingParams
from workers.worker import follow


@dataclass
class NewWork:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume_output_ids: list[int] = field(default_factory=list)


def gpu_ids_here() -> list[str]:
    """The GPUs Ray gave this task or actor (empty outside Ray)."""
    try:
        import ray
    except ImportError:
        return []
    if not ray.is_initialized():  # asking would start a Ray instance here
        return []
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def share_replica_gpus(replica_gpus: list[str] | None, rank: int, mine: list[str]) -> bool:
    """Let this rank see every GPU of its replica, in rank order, before CUDA starts here: Ray
    shows an actor only its own, and ranks that cannot see each other's GPUs cannot map each
    other's memory (tensor-parallel decode then runs eagerly). `rank_device` then picks this
    rank's GPU by its index. Only when Ray gave this rank exactly the GPU listed for it."""
    if not replica_gpus or len(replica_gpus) < 2 or mine != [replica_gpus[rank]]:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(replica_gpus)
    return True


class WorkerActor:
    """Rank 0 of a replica: the engine and its step loop."""

    def __init__(
        self,
        config: EngineConfig,
        replica_id: str,
        rendezvous: str | None = None,
        replica_gpus: list[str] | None = None,
    ):
        share_replica_gpus(replica_gpus, 0, gpu_ids_here())
        self.replica_id = replica_id
        self.engine = LLMEngine(config, rendezvous=rendezvous)
        self._cond = threading.Condition()
        self._new: list[NewWork] = []
        self._aborts: list[str] = []
        self._outbox: list[RequestOutput] = []
        self._step_seconds = 0.0
        self._batch_size = 0
        self._thread = threading.Thread(target=self._loop, name="step-loop", daemon=True)
        self._thread.start()

    def info(self) -> dict[str, Any]:
        node_id = None
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray (tests drive the class directly)
            node_id = None
        return {
            "replica_id": self.replica_id,
            "node_id": node_id,
            "pid": os.getpid(),
            "num_kv_blocks": self.engine.num_kv_blocks,
            "max_num_seqs": self.engine.config.max_num_seqs,
            "load_seconds": self.engine.load_seconds,
        }

    def submit(self, new: list[NewWork], aborts: list[str]) -> None:
        with self._cond:
            self._new.extend(new)
            self._aborts.extend(aborts)
            self._cond.notify_all()

    def poll(self, timeout: float = 1.0) -> dict[str, Any]:
        """Outputs since the last poll (waiting up to `timeout` for one) and the engine's stats."""
        with self._cond:
            if not self._outbox:
                self._cond.wait(timeout)
            outputs, self._outbox = self._outbox, []
            stats = dict(self.engine.stats())
        stats["step_seconds"] = self._step_seconds
        stats["batch_size"] = self._batch_size
        return {"outputs": outputs, "stats": stats}

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._new or self._aborts or engine.has_unfinished_requests()):
                    self._cond.wait()
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
            failed = [self._add(work) for work in new]
            for request_id in aborts:
                engine.abort(request_id)
            start = time.perf_counter()
            try:
                outputs = engine.step() if engine.has_unfinished_requests() else []
            except Exception as error:
                if engine.config.tp > 1:
                    # a broken group (a rank died) cannot step again: end this rank, so that the
                    # head restarts the replica and resumes its requests elsewhere
                    os._exit(1)
                # a bug or an out-of-memory in one process: fail the batch, keep serving
                outputs = engine.fail_all(f"step failed: {type(error).__name__}: {error}")
            self._step_seconds = time.perf_counter() - start
            self._batch_size = len(engine.scheduler.running)
            with self._cond:
                self._outbox.extend(f for f in failed if f is not None)
                self._outbox.extend(outputs)
                self._cond.notify_all()

    def _add(self, work: NewWork) -> RequestOutput | None:
        """Queue one request; a bad one comes back as a finished output with its error."""
        try:
            self.engine.add_request(
                work.prompt_token_ids, work.params, work.request_id, work.resume_output_ids
            )
        except ValueError as error:
            usage = Usage(len(work.prompt_token_ids), len(work.resume_output_ids), 0)
            return RequestOutput(
                request_id=work.request_id,
                index=0,
                new_token_ids=[],
                text_delta="",
                finished=True,
                finish_reason="error",
                usage=usage,
                error=str(error),
            )
        return None


class FollowerActor:
    """Rank 1..tp-1 of a replica: `run` follows rank 0's steps until the replica stops."""

    def __init__(
        self,
        config: EngineConfig,
        rank: int,
        rendezvous: str,
        replica_gpus: list[str] | None = None,
    ) -> None:
        share_replica_gpus(replica_gpus, rank, gpu_ids_here())
        self.config, self.rank, self.rendezvous = config, rank, rendezvous

    def run(self) -> None:
        follow(self.config, self.rank, self.rendezvous)


def rendezvous_here() -> str:
    """A free port on this node, for a replica's ranks to meet at (they share the node)."""
    import socket

    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"
