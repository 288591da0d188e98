"""A small Python client of the `afs.v1.Inference` service, for our CLI, demo and load test.

Two flavours over the generated stubs: `AfsClient` (blocking, grpc channel) and `AsyncAfsClient`
(grpc.aio). Sampling options are the fields of `SamplingParameters` as keyword arguments
(`temperature=0.0, max_tokens=32, stop=["\\n"]`); the server validates them. Errors arrive as
`grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.afs.v1 import inference_pb2 as pb
from protos.afs.v1 import inference_pb2_grpc as pb_grpc

Prompt = str | Sequence[int]
Message = dict[str, str] | tuple[str, str]


def generate_request(
    prompt: Prompt, request_id: str = "", priority: int = 0, model: str = "", **sampling: Any
) -> pb.GenerateRequest:
    """A text prompt or a sequence of token ids, with sampling options as keywords."""
    request = pb.GenerateRequest(
        sampling=pb.SamplingParameters(**sampling),
        request_id=request_id,
        priority=priority,
        model=model,
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def chat_request(
    messages: Sequence[Message],
    request_id: str = "",
    priority: int = 0,
    model: str = "",
    **sampling: Any,
) -> pb.ChatRequest:
    """Messages as {"role": ..., "content": ...} dicts or (role, content) pairs."""
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else m for m in messages]
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role=role, content=content) for role, content in pairs],
        sampling=pb.SamplingParameters(**sampling),
        request_id=request_id,
        priority=priority,
        model=model,
    )


async def _responses(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.GenerateResponse]:
    try:
        async for response in call:
            yield response
    finally:
        call.cancel()


class _Common:
    """Channel-independent setup: stubs, the auth header and the default deadline."""

    def __init__(self, channel, api_key: str | None, timeout: float | None) -> None:
        self.channel = channel
        self.stub = pb_grpc.InferenceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout or self.timeout}


class AfsClient(_Common):
    """Blocking client; `with AfsClient("127.0.0.1:50051") as client: ...` closes the channel."""

    def __init__(self, address: str, api_key: str | None = None, timeout: float | None = None):
        super().__init__(grpc.insecure_channel(address), api_key, timeout)

    def __enter__(self) -> AfsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Responses as they come; call `.cancel()` on the result to abort the request."""
        return self.stub.Generate(generate_request(prompt, **options), **self._call(timeout))

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Any
    ) -> pb.GenerateResult:
        return self.stub.GenerateUnary(generate_request(prompt, **options), **self._call(timeout))

    def chat_stream(
        self, messages: Sequence[Message], *, timeout: float | None = None, **options: Any
    ) -> Iterator[pb.GenerateResponse]:
        return self.stub.Chat(chat_request(messages, **options), **self._call(timeout))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request, **self._call(None)).token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, **self._call(None)).text

    def server_info(self) -> pb.ServerInfoResponse:
        return self.stub.ServerInfo(pb.ServerInfoRequest(), **self._call(None))

    def list_models(self) -> list[pb.ModelCard]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), **self._call(None)).models)

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING or UNKNOWN: the standard health check, which needs no key."""
        request = health_pb2.HealthCheckRequest(service=service)
        status = self.health_stub.Check(request, timeout=self.timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class AsyncAfsClient(_Common):
    """grpc.aio client; create it inside the event loop that uses it."""

    def __init__(self, address: str, api_key: str | None = None, timeout: float | None = None):
        super().__init__(grpc.aio.insecure_channel(address), api_key, timeout)

    async def __aenter__(self) -> AsyncAfsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate_stream(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Responses as they come; leaving the loop early cancels the call (and the request)."""
        request = generate_request(prompt, **options)
        return _responses(self.stub.Generate(request, **self._call(timeout)))

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **options: Any
    ) -> pb.GenerateResult:
        request = generate_request(prompt, **options)
        return await self.stub.GenerateUnary(request, **self._call(timeout))

    def chat_stream(
        self, messages: Sequence[Message], *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        request = chat_request(messages, **options)
        return _responses(self.stub.Chat(request, **self._call(timeout)))

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self.stub.Tokenize(request, **self._call(None))).token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        request = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self.stub.Detokenize(request, **self._call(None))).text

    async def server_info(self) -> pb.ServerInfoResponse:
        return await self.stub.ServerInfo(pb.ServerInfoRequest(), **self._call(None))

    async def list_models(self) -> list[pb.ModelCard]:
        response = await self.stub.ListModels(pb.ListModelsRequest(), **self._call(None))
        return list(response.models)

    async def health(self, service: str = "") -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health_stub.Check(request, timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
