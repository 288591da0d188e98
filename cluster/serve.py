"""`afs serve`: start or join Ray, start the replicas, the gateway and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import signal

import ray

from cluster.backend import ModelCard
from cluster.config import ClusterConfig
from cluster.gateway import Gateway
from cluster.metrics import Metrics
from cluster.scheduler import GlobalScheduler
from workers.config import dtype_name
from workers.weights.loader import load_config, load_tokenizer, resolve_dtype, resolve_model

log = logging.getLogger(__name__)


def connect_ray(address: str) -> None:
    """local: a Ray instance of our own on this machine; auto or HOST:PORT: an existing cluster."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


class Cluster:
    """Everything one `afs serve` runs on the head, in one asyncio loop."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.scheduler: GlobalScheduler | None = None
        self.gateway: Gateway | None = None
        self.port = 0
        self.metrics_port = 0

    def model_card(self) -> tuple[ModelCard, object]:
        engine = self.config.engine
        source = resolve_model(engine.model)
        model_config = load_config(source)
        dtype = resolve_dtype(model_config, engine.dtype, engine.resolved_device())
        card = ModelCard(
            name=engine.model,
            architecture=model_config.architecture,
            max_model_len=engine.max_model_len or model_config.max_position_embeddings,
            vocab_size=model_config.vocab_size,
            dtype=dtype_name(dtype),
        )
        return card, load_tokenizer(source)

    async def start(self) -> None:
        card, tokenizer = self.model_card()
        connect_ray(self.config.address)
        self.metrics_port = self.metrics.start_http_server(
            self.config.host, self.config.metrics_port
        )
        self.scheduler = GlobalScheduler(self.config, card, tokenizer, self.metrics)
        await self.scheduler.start()
        self.gateway = Gateway(self.scheduler, self.metrics, api_key=self.config.api_key)
        self.port = await self.gateway.start(self.config.host, self.config.port)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop(1.0)
        if self.scheduler is not None:
            await self.scheduler.stop()
        self.metrics.stop()


SAMPLE_QUESTION = "What is the capital of France? Answer in one sentence."


def _sample_chat(address: str, api_key: str | None) -> None:
    from cluster.client import AfsClient

    client = AfsClient(address, api_key=api_key)
    print(f"\n> {SAMPLE_QUESTION}\n", flush=True)
    messages = [{"role": "user", "content": SAMPLE_QUESTION}]
    for message in client.chat_stream(messages, temperature=0.0, max_tokens=64):
        print(message.text, end="", flush=True)
    print("\n", flush=True)


def serve_main(config: ClusterConfig, sample: bool = False, demo: bool = False) -> int:
    """Serve until Ctrl-C; `sample` streams one chat answer first, `demo` exits after it."""

    async def run() -> None:
        cluster = Cluster(config)
        await cluster.start()
        address = f"{config.host}:{cluster.port}"
        print(
            f"afs: serving {config.engine.model} with {config.replicas} replica(s) on {address}; "
            f"metrics at http://{config.host}:{cluster.metrics_port}/metrics",
            flush=True,
        )
        key = f" --api-key {config.api_key}" if config.api_key else ""
        print(f'afs: try  afs generate --server {address}{key} "Hello"', flush=True)
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopped.set)
        try:
            if sample or demo:
                await asyncio.to_thread(_sample_chat, address, config.api_key)
            if not demo:
                print("afs: serving until Ctrl-C", flush=True)
                await stopped.wait()
        finally:
            await cluster.stop()
            if config.address == "local":
                ray.shutdown()

    asyncio.run(run())
    return 0
