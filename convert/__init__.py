"""Converters between the released Kimi K2.5 format (compressed-tensors INT4 safetensors) and k25jax."""
