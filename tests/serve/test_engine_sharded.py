"""The engine on a mesh of 8 fake CPU devices: the cache and slot arrays live on the mesh, and continuous
batching gives the single-device tokens."""

import numpy as np
import pytest

from k25jax import make_mesh, shard_model
from k25jax.sampling import Sampling
from k25jax.serve.engine import Engine

import tiny_models


# data x expert is slow-marked (CI time); expert=8 stays in CI
@pytest.mark.parametrize("mesh", [dict(expert=8), pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow)])
def test_sharded_engine_gives_single_device_tokens(mesh):
    model = tiny_models.tiny_float32(seed=3)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 23, 40, 11)]
    greedy = Sampling(temperature=0.0, stop_token_ids=())
    sampled = Sampling(temperature=0.9, seed=4, stop_token_ids=())

    def run(m):
        engine = Engine(m, max_slots=2, max_context=128, decode_window=4, prefill_chunk=16, prefill_budget=16)
        rs = [engine.submit(p, greedy if i % 2 else sampled, max_tokens=6 + i) for i, p in enumerate(prompts)]
        engine.run()
        return engine, [r.tokens for r in rs]

    _, single = run(model)
    engine, sharded = run(shard_model(model, make_mesh(**mesh)))
    assert engine.mesh is not None and engine.mesh.size == 8
    stack = next(iter(engine.cache.stacks.values()))
    assert len(stack.sharding.device_set) == 8
    assert sharded == single
