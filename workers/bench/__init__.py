"""`afs bench`: ceilings, latency, throughput, kernels and the report, each run written as JSON."""
