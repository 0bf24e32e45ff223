"""The train step's cross-entropy: ``jax.nn.log_softmax`` + a gather, computed without the gather's scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.train.step import token_loss


def _gather_loss(logits, targets, loss_mask):
    """The textbook form (what ``token_loss`` computed before): log-softmax, then a gather of the targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0), mask.sum()


@pytest.mark.parametrize("scale, dtype", [(1.0, jnp.float32), (30.0, jnp.float32), (1e4, jnp.float32), (5.0, "bf16")])
def test_token_loss_equals_log_softmax_gather(scale, dtype):
    dtype = jnp.bfloat16 if dtype == "bf16" else dtype
    logits = (jax.random.normal(jax.random.key(0), (3, 17, 1280)) * scale).astype(dtype)
    targets = jax.random.randint(jax.random.key(1), (3, 17), 0, 1280)
    mask = (jax.random.uniform(jax.random.key(2), (3, 17)) > 0.3).astype(jnp.float32)
    got, tokens = jax.jit(token_loss)(logits, targets, mask)
    want, want_tokens = jax.jit(_gather_loss)(logits, targets, mask)
    assert float(tokens) == float(want_tokens) == float(mask.sum())
    # the same arithmetic per token; the final sums may be fused (so ordered) differently: a few ulp
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: token_loss(x, targets, mask)[0]))(logits)
    want_grad = jax.jit(jax.grad(lambda x: _gather_loss(x, targets, mask)[0]))(logits)
    assert grad.dtype == logits.dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), rtol=1e-6, atol=1e-9)


def test_token_loss_gradient_has_no_scatter():
    logits = jnp.zeros((2, 8, 64))
    targets = jnp.zeros((2, 8), jnp.int32)
    mask = jnp.ones((2, 8))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: token_loss(x, targets, mask)[0]))(logits))
    assert "scatter" not in jaxpr and "gather" not in jaxpr
    assert "scatter" in str(jax.make_jaxpr(jax.grad(lambda x: _gather_loss(x, targets, mask)[0]))(logits))
