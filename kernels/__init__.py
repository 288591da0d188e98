"""Triton kernels, one per file; no imports from cluster/ or workers/."""
