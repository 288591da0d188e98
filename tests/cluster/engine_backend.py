"""A `Backend` test double: one in-process `LLMEngine` stepping in a thread, no Ray.

The engine is touched only by its own thread: requests, aborts and anything else a test wants
done (`call`) travel there as commands run between steps, and its outputs come back to each
request's asyncio queue through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from cluster.backend import ModelCard, TokenEvent
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

T = TypeVar("T")


def _event(output: RequestOutput) -> TokenEvent:
    return TokenEvent.from_output(output, output.index, output.prompt_logprobs)


class EngineBackend:
    def __init__(self, engine: LLMEngine, name: str = "smollm2-135m-instruct") -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        config = engine.model_config
        self.model = ModelCard(
            name, config.architecture, engine.max_model_len, config.vocab_size, config.dtype
        )
        self.ready = True
        """Tests turn it off to see health go NOT_SERVING."""
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-backend", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the engine thread --

    def _loop(self) -> None:
        while not self._stopping:
            while not self._commands.empty():
                self._commands.get()()
            if not self.engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            for output in self.engine.step():
                listener = self._listeners.get(output.request_id)
                if listener is not None:
                    loop, events = listener
                    loop.call_soon_threadsafe(events.put_nowait, output)

    def _submit(self, command: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(command())
            except Exception as error:
                future.set_exception(error)

        self._commands.put(run)
        self._wake.set()
        return future

    def call(self, command: Callable[[LLMEngine], T], timeout: float = 120) -> T:
        """Run `command(engine)` on the engine thread, between steps, and wait for it."""
        return self._submit(lambda: command(self.engine)).result(timeout)

    # -- the Backend protocol --

    async def stream(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        # Stop strings are the gateway's: the engine stops on tokens only, as a replica does.
        engine_params = dataclasses.replace(params, stop=())

        def add() -> None:
            self.engine.add_request(prompt_token_ids, engine_params, request_id)
            self._listeners[request_id] = (loop, events)

        await asyncio.wrap_future(self._submit(add))
        unfinished = params.n
        try:
            while unfinished:
                output = await events.get()
                if output.finished:
                    unfinished -= 1
                yield _event(output)
        finally:

            def forget() -> None:
                self.engine.abort(request_id)
                self._listeners.pop(request_id, None)

            self._submit(forget)

    def server_info(self) -> dict[str, Any]:
        stats = self.engine.stats()
        replica = {
            "replica_id": "engine-0",
            "node_id": "local",
            "state": "ready" if self.ready else "starting",
            "tp": 1,
            "total_kv_blocks": stats["num_kv_blocks"],
            "free_kv_blocks": stats["free_kv_blocks"],
            "running": stats["running"],
            "waiting": stats["waiting"],
            "restarts": 0,
        }
        return {
            "version": "test",
            "model": self.model.name,
            "replicas": [replica],
            "total_kv_blocks": stats["num_kv_blocks"],
            "free_kv_blocks": stats["free_kv_blocks"],
            "running_requests": stats["running"],
            "waiting_requests": stats["waiting"],
        }
