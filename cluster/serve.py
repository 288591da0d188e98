"""`afs serve`: start or join Ray, start the replicas, the gateway and the metrics endpoint."""

from __future__ import annotations

import logging

import ray

from cluster.backend import ModelCard
from cluster.config import ClusterConfig
from cluster.gateway import Gateway
from cluster.metrics import Metrics
from cluster.scheduler import GlobalScheduler
from workers.config import dtype_name
from workers.weights.loader import default_dtype_for, load_config, load_tokenizer, resolve_model

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
        dtype = engine.dtype or default_dtype_for(model_config, engine.resolved_device())
        card = ModelCard(
            name=engine.model,
            architecture=model_config.architecture,
            max_model_len=engine.max_model_len or model_config.max_position_embeddings,
            vocab_size=model_config.vocab_size,
            dtype=dtype_name(dtype) if not isinstance(dtype, str) else dtype,
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
