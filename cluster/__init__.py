"""The control plane on the Ray head: gateway, router, global scheduler, replicas, metrics, CLI."""
