"""The latent KV cache (``k25jax.cache``): sizes, slot writes, the slot mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.cache import LatentCache, slot_mask, stack_sizes, values_per_token, write
from k25jax.config import k25, tiny
from k25jax.sharding import LOGICAL_AXES


def test_cache_size_per_token():
    # K2.5: 61 layers x (512 + 64) values per token, the 256K-token cache sized abstractly (no memory).
    cfg = k25().text
    cache = LatentCache.abstract(cfg, batch=1, max_len=262144, dtype=jnp.bfloat16)
    assert cfg.latent_cache_dim == 576
    assert cache.stacks["dense_layers"].shape == (1, 1, 262144, 576)
    assert cache.stacks["moe_layers"].shape == (60, 1, 262144, 576)
    assert cache.values_per_token() == values_per_token(cfg) == 61 * 576
    assert cache.bytes_per_token() == 61 * 576 * 2  # 70,272 bytes per token in bf16
    expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert expanded == 20480 and round(expanded / 576, 1) == 35.6
    assert cache.nbytes() == 61 * 576 * 2 * 262144  # 18.4 GB for one 256K-token sequence
    # The tiny config: 3 layers x (32 + 8).
    small = LatentCache.zeros(tiny().text, batch=2, max_len=16, dtype=jnp.float32)
    assert small.values_per_token() == 3 * 40 and small.bytes_per_token() == 480
    assert all(a in LOGICAL_AXES for a in LatentCache.axes) and len(LatentCache.axes) == 4


def test_zeros_shapes_and_errors():
    cfg = tiny().text
    cache = LatentCache.zeros(cfg, batch=3, max_len=20, dtype=jnp.float32)
    assert stack_sizes(cfg) == {"dense_layers": 1, "moe_layers": 2}
    shapes = {k: v.shape for k, v in cache.stacks.items()}
    assert shapes == {"dense_layers": (1, 3, 20, 40), "moe_layers": (2, 3, 20, 40)}
    assert (cache.batch, cache.max_len, cache.dtype) == (3, 20, jnp.float32)
    assert cache.lengths.dtype == jnp.int32 and not np.asarray(cache.lengths).any()
    assert not any(np.asarray(v).any() for v in cache.stacks.values())
    assert stack_sizes(dataclasses.replace(cfg, first_k_dense_replace=0)) == {"moe_layers": 3}
    with pytest.raises(ValueError, match=r"LatentCache: batch \(0\) and max_len \(16\) must be positive"):
        LatentCache.zeros(cfg, batch=0, max_len=16)


def test_write_puts_each_row_at_its_own_slots():
    stack = jnp.zeros((2, 3, 8, 4), jnp.float32)  # [L, B, S, C + R]
    values = jnp.asarray(np.arange(1, 3 * 2 * 4 + 1).reshape(3, 2, 4), jnp.float32)  # [B, T=2, C + R]
    out = np.asarray(write(stack, 1, jnp.asarray([0, 5, 3]), values))
    want = np.zeros((2, 3, 8, 4), np.float32)
    for b, start in enumerate([0, 5, 3]):
        want[1, b, start : start + 2] = np.asarray(values[b])
    np.testing.assert_array_equal(out, want)  # layer 0 and every other slot untouched


def test_write_drops_slots_past_the_end_and_casts():
    stack = jnp.zeros((1, 2, 6, 3), jnp.bfloat16)
    values = jnp.full((2, 3, 3), 1.5, jnp.float32)
    out = write(stack, 0, jnp.asarray([4, 1]), values)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    # Row 0: slots 4, 5 written, the third value (slot 6) dropped, not clamped onto slot 5 or wrapped to slot 0.
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 0, 0, 1.5, 1.5])
    np.testing.assert_array_equal(out[0, 1, :, 0], [0, 1.5, 1.5, 1.5, 0, 0])


def test_compiled_write_copies_no_stack():
    """A decode step's write of one token per row, compiled for CPU with the stack donated, holds no array the size
    of the whole stack besides the stack itself: the vmapped per-row write it replaced lowered to a batched scatter
    that XLA:CPU ran on a row-major transposed copy of the stack (``[B, L, S, C]``) and copied back, two copies of
    every layer's cache per layer per step."""
    L_, B, S, C = 5, 16, 128, 80
    stack = jnp.zeros((L_, B, S, C), jnp.float32)
    step = jax.jit(lambda st, starts, v: write(st, 3, starts, v), donate_argnums=0)
    starts, values = jnp.arange(B, dtype=jnp.int32) * 7, jnp.ones((B, 1, C), jnp.float32)
    hlo = step.lower(stack, starts, values).compile().as_text()
    transposed, natural = f"[{B},{L_},{S},{C}]", f"[{L_},{B},{S},{C}]"
    whole = [
        line.strip()[:120]
        for line in hlo.splitlines()
        if " = " in line and (transposed in line or ("copy(" in line and natural in line))
    ]
    assert not whole, whole
    out = np.asarray(step(jnp.zeros((L_, B, S, C), jnp.float32), starts, values))
    assert out.sum() == B * C and out[3, np.arange(B), np.arange(B) * 7].all() and not out[2].any()


def test_slot_mask_is_causal_over_slots():
    positions = jnp.asarray([[2, 3], [0, 1]])
    mask = np.asarray(slot_mask(positions, 5))
    assert mask.shape == (2, 2, 5) and mask.dtype == bool
    np.testing.assert_array_equal(mask[0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(mask[1], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
