"""The cluster's configuration: one frozen dataclass, built from `afs serve` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.config import EngineConfig


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    """What each replica's engine is built from (the model among it)."""
    replicas: int = 1
    """Model instances; each is a placement group of `engine.tp` worker actors on one node."""
    address: str = "local"
    """Ray cluster: local (start one here), auto (the one this node is in), or HOST:PORT."""
    host: str = "127.0.0.1"
    """Interface the gRPC gateway listens on."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics port; 0 picks a free one."""
    api_key: str | None = None
    """When set, every call needs `authorization: Bearer <key>`."""
    max_queue: int = 1024
    """Requests the global admission queue holds before answering RESOURCE_EXHAUSTED."""
    cpus_per_worker: float = 1.0
    """Ray CPUs each worker actor reserves (fractions let tests fit several on 2 cores)."""
    gpus_per_worker: float | None = None
    """Ray GPUs each worker reserves; None means 1 when the engine's device is CUDA, else 0."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port: must be in [0, 65535], got {self.metrics_port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {self.max_queue}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
