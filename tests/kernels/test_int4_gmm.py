"""``int4_gmm``: both Pallas kernels (interpret mode) against the reference (dequantize + ragged_dot), the
visit schedule, and the custom_vjp. Tolerances as in ``test_int4_matmul``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_layout as L
from pallas_kernels.int4_gmm import ops, reference
from pallas_kernels.int4_gmm.schedule import max_visits, visit_schedule

TOL = 1e-5
GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3}
FLAVORS = ["pallas:gpu", "pallas:tpu"]


def _experts(e, k, n, seed=0):
    w = np.random.default_rng(seed).normal(size=(e, k, n)).astype(np.float32)
    return L.quantize_device(jnp.asarray(w))


def _rows(m, k, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(m, k)), dtype)


def _sizes(m, e, empty, seed=2):
    """Uneven group sizes summing to ``m``, with the experts in ``empty`` given no rows."""
    rng = np.random.default_rng(seed)
    live = [i for i in range(e) if i not in empty]
    cuts = np.sort(rng.integers(0, m + 1, size=len(live) - 1))
    sizes = np.zeros(e, np.int32)
    sizes[live] = np.diff(np.concatenate([[0], cuts, [m]]))
    return jnp.asarray(sizes)


def _close(got, want, tol, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3e} > {tol} x max |ref| {scale:.3e}"


def test_schedule_covers_every_row_once():
    sizes = jnp.asarray([0, 5, 0, 0, 20, 3, 0, 12], jnp.int32)  # 40 rows in tiles of 8, empty groups inside
    s = visit_schedule(sizes, 40, 8)
    num = int(s.num_visits)
    assert s.group_ids.shape == (max_visits(40, 8, 8),) and num <= s.group_ids.shape[0]
    owner = np.full(40, -1)
    for v in range(num):
        g, t, lo, hi = (int(a[v]) for a in (s.group_ids, s.tile_ids, s.lo, s.hi))
        assert int(sizes[g]) > 0 and t * 8 <= lo < hi <= t * 8 + 8
        assert (owner[lo:hi] == -1).all()
        owner[lo:hi] = g
    np.testing.assert_array_equal(owner, np.repeat(np.arange(8), np.asarray(sizes)))
    assert (np.diff(np.asarray(s.tile_ids)) >= 0).all()  # an output tile's visits are consecutive
    assert (np.asarray(s.lo)[num:] == np.asarray(s.hi)[num:]).all()  # padding visits own no rows


# (M rows, E experts, empty experts, K, N)
SMALL = [
    (1, 4, {0, 2, 3}, 96, 160),
    (7, 4, {1}, 96, 160),
    (64, 8, {0, 3, 7}, 256, 128),
    (300, 8, {2, 5}, 96, 160),
    (8, 384, set(range(384)) - {3, 50, 51, 200, 201, 380, 381, 383}, 96, 64),  # decode: 8 of 384 experts live
]


@pytest.mark.parametrize("impl", FLAVORS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,e,empty,k,n", SMALL, ids=[f"M{c[0]}-E{c[1]}" for c in SMALL])
def test_kernel_matches_reference(impl, dtype, m, e, empty, k, n):
    packed, scales = _experts(e, k, n)
    x = _rows(m, k, dtype)
    sizes = _sizes(m, e, empty)
    want = reference.int4_gmm(x, packed, scales, sizes, out_dtype=jnp.float32)
    got = ops.int4_gmm(x, packed, scales, sizes, impl=impl, out_dtype=jnp.float32)
    assert got.shape == (m, n)
    _close(got, want, TOL, f"{impl} M{m} E{e}")


@pytest.mark.parametrize("impl", FLAVORS)
@pytest.mark.parametrize("m,k,n", [(64, 7168, 2048), (8, 2048, 7168)])
@pytest.mark.slow  # ~20 s each interpreted on CPU; scripts/gpu_check.sh runs the native kernels at these sizes
def test_kernel_matches_reference_k25_sizes(impl, m, k, n):
    """K2.5 expert matrices (8 experts here to keep host memory small; the schedule is size-independent)."""
    packed, scales = _experts(8, k, n)
    x = _rows(m, k, jnp.bfloat16)
    sizes = _sizes(m, 8, {1, 6})
    want = reference.int4_gmm(x, packed, scales, sizes, out_dtype=jnp.float32)
    _close(ops.int4_gmm(x, packed, scales, sizes, impl=impl, out_dtype=jnp.float32), want, TOL, impl)


@pytest.mark.parametrize("impl", ["xla", *FLAVORS])
def test_rows_outside_groups_are_zero(impl):
    packed, scales = _experts(3, 64, 32)
    x = _rows(10, 64, jnp.float32)
    sizes = jnp.asarray([2, 0, 3], jnp.int32)  # 5 of 10 rows in a group
    got = np.asarray(ops.int4_gmm(x, packed, scales, sizes, impl=impl))
    assert (got[5:] == 0).all()
    _close(got, reference.int4_gmm(x, packed, scales, sizes), TOL, impl)


@pytest.mark.parametrize("impl", ["xla", *FLAVORS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,e,empty,k,n", [(7, 4, {1}, 96, 160), (64, 8, {0, 3, 7}, 256, 128)])
def test_gradient_matches_reference_grad(impl, dtype, m, e, empty, k, n):
    packed, scales = _experts(e, k, n)
    x = _rows(m, k, dtype)
    sizes = _sizes(m, e, empty)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(m, n)), jnp.float32)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, packed, scales, sizes, out_dtype=jnp.float32) * cot)

    want = jax.grad(loss(reference.int4_gmm))(x)
    got = jax.jit(jax.grad(loss(lambda *a, **kw: ops.int4_gmm(*a, impl=impl, **kw))))(x)
    assert got.dtype == dtype
    _close(got, want, GRAD_TOL[dtype], f"grad {impl}")


def test_bad_input_raises():
    packed, scales = _experts(3, 64, 32)
    with pytest.raises(ValueError, match=r"group_sizes \[E\]"):
        ops.int4_gmm(_rows(4, 64, jnp.float32), packed, scales, jnp.asarray([4, 0], jnp.int32), impl="xla")
    with pytest.raises(TypeError, match="group_sizes must be integers"):
        ops.int4_gmm(_rows(4, 64, jnp.float32), packed, scales, jnp.asarray([4.0, 0, 0]), impl="xla")
