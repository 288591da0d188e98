"""The step engine: requests, the KV slab and its block pool, continuous batching."""
