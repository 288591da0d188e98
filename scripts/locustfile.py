"""Locust users for the afs gRPC service: each streams `Generate` calls of random token ids.

    locust -f scripts/locustfile.py --headless -u 32 -r 4 -t 2m --host 127.0.0.1:50051

Locust only speaks HTTP, so each call is reported through its `request` event: "Generate" with
the whole stream's time and its token count, and "Generate TTFT" with the time to the first
message that carries tokens. Settings come from the environment:

    AFS_API_KEY     sent as 'authorization: Bearer KEY' when set
    AFS_PROMPT_LEN  prompt tokens (default 128)
    AFS_MAX_TOKENS  tokens generated per request, exactly: ignore_eos is set (default 64)
    AFS_TIMEOUT_S   deadline per call in seconds (default 600)

Prompt ids are drawn below 1000, an id every vocabulary has: which ids they are does not change
the work a request costs, so no `ListModels` call (and no failure mode of its own) is needed.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, task

# the repository root, so that `protos` imports when Locust loads this file from scripts/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protos.afs.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

# grpc's C core must yield to gevent, or one blocked stream would stall every Locust user
grpc_gevent.init_gevent()

API_KEY = os.environ.get("AFS_API_KEY")
PROMPT_LEN = int(os.environ.get("AFS_PROMPT_LEN", "128"))
MAX_TOKENS = int(os.environ.get("AFS_MAX_TOKENS", "64"))
TIMEOUT_S = float(os.environ.get("AFS_TIMEOUT_S", "600"))
TOKEN_ID_LIMIT = 1000


class GenerateUser(User):
    """One closed-loop client: the next stream starts as soon as the last one ends."""

    wait_time = constant(0)

    def on_start(self) -> None:
        # Locust's --host may carry a scheme; gRPC wants a bare HOST:PORT
        target = (self.host or "127.0.0.1:50051").split("://")[-1].rstrip("/")
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {API_KEY}"),) if API_KEY else None
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        prompt = [self.rng.randrange(TOKEN_ID_LIMIT) for _ in range(PROMPT_LEN)]
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompt),
            sampling=inference_pb2.SamplingParameters(
                temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True
            ),
        )
        fire = self.environment.events.request.fire
        tokens = 0
        exception = None
        start = time.perf_counter()
        try:
            for response in self.stub.Generate(request, metadata=self.metadata, timeout=TIMEOUT_S):
                if tokens == 0 and response.token_ids:
                    ttft_ms = (time.perf_counter() - start) * 1e3
                    fire(
                        request_type="grpc",
                        name="Generate TTFT",
                        response_time=ttft_ms,
                        response_length=0,
                        exception=None,
                        context={},
                    )
                tokens += len(response.token_ids)
        except grpc.RpcError as error:
            # the status code and details only: Locust groups failures by their text
            exception = RuntimeError(f"{error.code().name}: {error.details()}")
        fire(
            request_type="grpc",
            name="Generate",
            response_time=(time.perf_counter() - start) * 1e3,
            response_length=tokens,
            exception=exception,
            context={},
        )
