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
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc
import jinja2
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.backend import Backend, NoReplicaError, QueueFullError
from cluster.metrics import Metrics
from protos.afs.v1 import inference_pb2 as pb
from protos.afs.v1 import inference_pb2_grpc as pb_grpc
from workers.engine.outputs import TextStream
from workers.engine.sampling_params import SamplingParams
from workers.layers.sampler import TokenLogprobs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
_HEALTH_METHODS = f"/{health.SERVICE_NAME}/"
_CHAT_ROLES = ("system", "user", "assistant", "tool")
_OPTIONAL_SAMPLING_FIELDS = (
    "n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "skip_special_tokens",
)  # fmt: skip
_ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoReplicaError, grpc.StatusCode.UNAVAILABLE),
)
logger = logging.getLogger(__name__)


def sampling_params(proto: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; bad values raise ValueError."""
    fields = {
        name: getattr(proto, name) for name in _OPTIONAL_SAMPLING_FIELDS if proto.HasField(name)
    }
    return SamplingParams(
        **fields,
        logit_bias=dict(proto.logit_bias) or None,
        stop=tuple(proto.stop),
        stop_token_ids=tuple(proto.stop_token_ids),
        ignore_eos=proto.ignore_eos,
        include_stop_str_in_output=proto.include_stop_str_in_output,
    )


def chat_messages(messages: Iterable[pb.ChatMessage]) -> list[dict]:
    checked = []
    for position, message in enumerate(messages):
        if message.role not in _CHAT_ROLES:
            raise ValueError(
                f"messages[{position}].role: must be one of {', '.join(_CHAT_ROLES)}, "
                f"got {message.role!r}"
            )
        checked.append({"role": message.role, "content": message.content})
    if not checked:
        raise ValueError("messages: must not be empty")
    return checked


def _logprob(entry: TokenLogprobs) -> pb.Logprob:
    top = [pb.TopLogprob(token_id=token_id, logprob=value) for token_id, value in entry.top]
    return pb.Logprob(token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank, top=top)


@dataclass(frozen=True)
class Prepared:
    """A validated request: what the backend gets."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Completion:
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str = ""
    last_token_at: float | None = None


class CompletionStreams:
    """One request's n completions: text, stop strings, responses and client-side timings."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        prepared: Prepared,
        request_id: str,
        arrival: float,
    ) -> None:
        self.backend, self.metrics = backend, metrics
        self.prompt_ids, self.params = prepared.prompt_ids, prepared.params
        self.request_id, self.arrival = request_id, arrival
        self.completions = [
            _Completion(TextStream(backend.tokenizer, self.params, self.prompt_ids))
            for _ in range(self.params.n)
        ]
        self.prompt_logprobs: list[pb.Logprob] | None = None
        self.cached_tokens = 0
        self.first_token_seen = False

    async def responses(self, priority: int) -> AsyncIterator[pb.GenerateResponse]:
        """Responses until every completion has finished; leaving early aborts the request."""
        events = self.backend.stream(self.request_id, self.prompt_ids, self.params, priority)
        rejected = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    response = self._on_event(event)
                    if response is not None:
                        yield response
                    if all(c.finish_reason is not None for c in self.completions):
                        return
            # The backend ended the stream early: every completion still gets its end.
            for index, completion in enumerate(self.completions):
                if completion.finish_reason is None:
                    completion.finish_reason = "abort"
                    yield self._response(index, [], [], True)
        except (QueueFullError, NoReplicaError, ValueError):
            rejected = True
            raise
        finally:
            if not rejected:
                self.metrics.observe_finished(
                    time.perf_counter() - self.arrival,
                    len(self.prompt_ids),
                    sum(len(c.token_ids) for c in self.completions),
                    [c.finish_reason or "abort" for c in self.completions],
                )

    def _on_event(self, event) -> pb.GenerateResponse | None:
        completion = self.completions[event.index]
        if completion.finish_reason is not None:
            return None  # cut by a stop string earlier; the backend has not seen it yet
        now = time.perf_counter()
        kept = self._add_tokens(completion, event.token_ids)
        logprobs = [_logprob(entry) for entry in (event.logprobs or ())[: len(kept)]]
        completion.logprobs += logprobs
        if event.usage is not None:
            self.cached_tokens = event.usage.cached_tokens
        self._observe_tokens(completion, len(kept), now)
        if completion.text.stop_reason is not None:
            completion.finish_reason, completion.stop_reason = "stop", completion.text.stop_reason
        elif event.finished:
            completion.finish_reason = event.finish_reason or "stop"
            if completion.finish_reason == "error":
                completion.stop_reason = event.error or "the engine failed this completion"
            elif event.stop_reason is not None:
                completion.stop_reason = str(event.stop_reason)
            # The engine flushes an incomplete tail only when no stop ended the completion.
            if completion.finish_reason != "stop":
                completion.text.finish()
        finished = completion.finish_reason is not None
        response = self._response(event.index, kept, logprobs, finished)
        if self.prompt_logprobs is None and event.prompt_logprobs:
            # The first prompt token has no logprob: nothing comes before it.
            self.prompt_logprobs = [_logprob(e) for e in event.prompt_logprobs if e is not None]
            response.prompt_logprobs.extend(self.prompt_logprobs)
        return response

    def _add_tokens(self, completion: _Completion, token_ids: list[int]) -> list[int]:
        """Detokenize token by token as the engine does; tokens after a stop string are dropped."""
        kept: list[int] = []
        for token_id in token_ids:
            kept.append(token_id)
            # stop strings count only once min_tokens tokens are out
            can_stop = len(completion.token_ids) + len(kept) > self.params.min_tokens
            if completion.text.add([token_id], can_stop):
                break
        completion.token_ids += kept
        return kept

    def _observe_tokens(self, completion: _Completion, count: int, now: float) -> None:
        if not count:
            return
        if not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.observe_first_token(now - self.arrival)
        # Tokens that arrive together in one event reach the client with no gap between them.
        for position in range(count):
            if position == 0 and completion.last_token_at is None:
                continue
            gap = now - completion.last_token_at if position == 0 else 0.0
            self.metrics.observe_token_gap(gap)
        completion.last_token_at = now

    def _response(
        self, index: int, token_ids: list[int], logprobs: list[pb.Logprob], finished: bool
    ) -> pb.GenerateResponse:
        completion = self.completions[index]
        response = pb.GenerateResponse(
            request_id=self.request_id,
            index=index,
            token_ids=token_ids,
            text=completion.text.delta(finished),
            logprobs=logprobs,
            finished=finished,
        )
        if finished:
            response.finish_reason = completion.finish_reason or ""
            response.stop_reason = completion.stop_reason
            response.usage.CopyFrom(self._usage(len(completion.token_ids)))
        return response

    def _usage(self, completion_tokens: int) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=completion_tokens,
            cached_tokens=self.cached_tokens,
        )

    def result(self) -> pb.GenerateResult:
        """The whole request, once `responses` has run to its end."""
        completions = [
            pb.Completion(
                index=index,
                text=c.text.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason or "",
                stop_reason=c.stop_reason,
            )
            for index, c in enumerate(self.completions)
        ]
        return pb.GenerateResult(
            request_id=self.request_id,
            completions=completions,
            usage=self._usage(sum(len(c.token_ids) for c in self.completions)),
            prompt_logprobs=self.prompt_logprobs or [],
        )


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
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        bad = [token_id for token_id in prompt_ids if not 0 <= token_id < card.vocab_size]
        if bad:
            raise ValueError(f"prompt: token ids must be in [0, {card.vocab_size}), got {bad[:5]}")
        if len(prompt_ids) + params.max_tokens > card.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_ids)} prompt tokens + max_tokens={params.max_tokens} exceed "
                f"the model's context of {card.max_model_len} tokens"
            )
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
