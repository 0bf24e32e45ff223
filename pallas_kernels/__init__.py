"""Pallas kernels for k25jax: one folder per op (reference, gpu, tpu, ops, bench)."""
