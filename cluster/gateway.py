"""The gRPC gateway: the `afs.v1.Inference` service over a `Backend`, on the Ray head.

The gateway owns text. It validates and tokenizes every request before the backend sees it,
renders chat templates, detokenizes each completion with a `TextStream` and cuts it at stop
strings (closing the backend's stream, which aborts the request). Closing happens in a `finally`,
so a passed deadline or a client that goes away aborts the request too.

Per-completion failures are not RPC errors: a completion whose event says finish_reason "error"
gets a final message with finish_reason "error" and the error text in stop_reason, and the
request's other completions go on. RPC status codes are for the whole request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import jinja2
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.backend import Backend, NoReplicaError, QueueFullError
from cluster.completions import CompletionStreams, Prepared, chat_messages, sampling_params
from cluster.metrics import Metrics
from protos.afs.v1 import inference_pb2 as pb
from protos.afs.v1 import inference_pb2_grpc as pb_grpc
from workers.engine.request import check_prompt_fits, check_prompt_ids

_ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoReplicaError, grpc.StatusCode.UNAVAILABLE),
)
logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
_HEALTH_METHODS = f"/{health.SERVICE_NAME}/"


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but the standard health checks needs `authorization: Bearer <key>`."""

    def __init__(self, api_key: str, metrics: Metrics) -> None:
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_METHODS):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        given = next((value for key, value in metadata if key == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        # A constant-time comparison: the key must not leak through response timing.
        if hmac.compare_digest(given, self._expected):
            return handler
        return self._rejecting(handler)

    def _rejecting(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def reject(_request, context: grpc.aio.ServicerContext) -> None:
            self._metrics.observe_error(grpc.StatusCode.UNAUTHENTICATED.name)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: missing or wrong API key; send 'authorization: Bearer <key>'",
            )

        # The replacement must be of the same streaming kind as the method it stands in for.
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return kind(
            reject,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Health(health.aio.HealthServicer):
    """SERVING while the backend has a ready replica, re-read on every Check."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self._backend = backend

    async def Check(self, request, context):
        await self.refresh()
        return await super().Check(request, context)

    async def refresh(self) -> None:
        try:
            replicas = self._backend.server_info().get("replicas", ())
            ready = any(replica.get("state") == "ready" for replica in replicas)
        except Exception:
            logger.exception("health: server_info failed")
            ready = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for service in ("", SERVICE_NAME):
            await self.set(service, status)


class Gateway(pb_grpc.InferenceServicer):
    def __init__(self, backend: Backend, metrics: Metrics, api_key: str | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.api_key = api_key
        self._server: grpc.aio.Server | None = None
        self._health: _Health | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on host:port (port 0 picks a free one); returns the bound port."""
        interceptors = [_ApiKeyInterceptor(self.api_key, self.metrics)] if self.api_key else []
        server = grpc.aio.server(interceptors=interceptors)
        self._health = _Health(self.backend)  # fresh: a stopped one stays NOT_SERVING
        pb_grpc.add_InferenceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = server.add_insecure_port(address)
        await self._health.refresh()
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, then running RPCs get `grace` seconds to finish."""
        if self._server is None or self._health is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None

    # -- status codes and metrics for every RPC --

    @contextlib.asynccontextmanager
    async def _rpc(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self.metrics.observe_error(code.name)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            code = next((c for kind, c in _ERROR_CODES if isinstance(error, kind)), None)
            if code is None:
                logger.exception("gateway: an RPC failed")
                code = grpc.StatusCode.INTERNAL
            self.metrics.observe_error(code.name)
            await context.abort(code, str(error) or type(error).__name__)

    # -- validation, before the backend sees anything --

    def _prepare(
        self, prompt_ids: list[int], sampling: pb.SamplingParameters, model: str
    ) -> Prepared:
        card = self.backend.model
        if model and model != card.name:
            raise ValueError(f"model: this server serves {card.name!r}, got {model!r}")
        params = sampling_params(sampling)
        params.validate_for_vocab(card.vocab_size)
        prompt_ids = check_prompt_ids(prompt_ids, card.vocab_size)
        check_prompt_fits(len(prompt_ids), params.max_tokens, card.max_model_len)
        return Prepared(prompt_ids, params)

    def _generate_request(self, request: pb.GenerateRequest) -> Prepared:
        which = request.WhichOneof("prompt")
        if which == "text":
            prompt_ids = self.backend.tokenizer.encode(request.text)
        else:
            prompt_ids = list(request.token_ids.ids) if which == "token_ids" else []
        return self._prepare(prompt_ids, request.sampling, request.model)

    def _chat_request(self, request: pb.ChatRequest) -> Prepared:
        messages = chat_messages(request.messages)
        try:
            text = self.backend.tokenizer.apply_chat_template(messages)
        except jinja2.TemplateError as error:
            raise ValueError(f"messages: the chat template failed: {error}") from error
        return self._prepare(self.backend.tokenizer.encode(text), request.sampling, request.model)

    # -- generation --

    def _streams(self, prepared: Prepared, request_id: str, arrival: float) -> CompletionStreams:
        return CompletionStreams(
            self.backend, self.metrics, prepared, request_id or uuid.uuid4().hex, arrival
        )

    async def _stream_to(self, context, streams: CompletionStreams, priority: int) -> None:
        async with contextlib.aclosing(streams.responses(priority)) as responses:
            async for response in responses:
                await context.write(response)

    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        arrival = time.perf_counter()
        async with self._rpc(context):
            streams = self._streams(self._generate_request(request), request.request_id, arrival)
            await self._stream_to(context, streams, request.priority)

    async def Chat(self, request: pb.ChatRequest, context) -> None:
        arrival = time.perf_counter()
        async with self._rpc(context):
            streams = self._streams(self._chat_request(request), request.request_id, arrival)
            await self._stream_to(context, streams, request.priority)

    async def GenerateUnary(self, request: pb.GenerateRequest, context) -> pb.GenerateResult:
        arrival = time.perf_counter()
        async with self._rpc(context):
            streams = self._streams(self._generate_request(request), request.request_id, arrival)
            async with contextlib.aclosing(streams.responses(request.priority)) as responses:
                async for _ in responses:
                    pass
            return streams.result()

    # -- the rest --

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        async with self._rpc(context):
            ids = self.backend.tokenizer.encode(request.text, request.add_special_tokens)
            return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        async with self._rpc(context):
            vocab_size = self.backend.tokenizer.vocab_size
            bad = [token_id for token_id in request.token_ids if not 0 <= token_id < vocab_size]
            if bad:
                raise ValueError(f"token_ids: must be in [0, {vocab_size}), got {bad[:5]}")
            text = self.backend.tokenizer.decode(request.token_ids, request.skip_special_tokens)
            return pb.DetokenizeResponse(text=text)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async with self._rpc(context):
            card = pb.ModelCard(**dataclasses.asdict(self.backend.model))
            return pb.ListModelsResponse(models=[card])

    async def ServerInfo(self, request: pb.ServerInfoRequest, context) -> pb.ServerInfoResponse:
        async with self._rpc(context):
            info = self.backend.server_info()
            return json_format.ParseDict(info, pb.ServerInfoResponse(), ignore_unknown_fields=True)
