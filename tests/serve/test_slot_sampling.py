"""Per-slot sampling: penalties and logit bias against a numpy restatement, min-p, per-row seeds, and the engine's
stop strings, logit bias and max tokens per request."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import sampling as smp
from k25jax.sampling import Sampling, SamplingError
from k25jax.serve.engine import Engine
from k25jax.tokenizer import Tokenizer

import tiny_models

V = 50


def _params(rows):
    """SlotParams of ``rows`` (Sampling, seed, max_tokens) stacked."""
    parts = [smp.slot_row(s, seed, n, (), 4, 4) for s, seed, n in rows]
    return jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *parts)


def test_penalties_and_bias_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, V)).astype(np.float32) * 3
    counts = rng.integers(0, 3, (3, V)).astype(np.int32) * (rng.random((3, V)) < 0.3)
    seen = rng.random((3, V)) < 0.2
    settings = [
        Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 5.0, 7: -100.0}),
        Sampling(repetition_penalty=1.3),
        Sampling(),  # all off: unchanged
    ]
    got = np.asarray(smp.penalized(jnp.asarray(logits), _params([(s, 0, 9) for s in settings]), counts, seen))
    want = logits.copy()
    want[0, 3] += 5.0
    want[0, 7] -= 100.0
    want[0] -= 0.25 * counts[0] + 0.5 * (counts[0] > 0)
    hit = seen[1] | (counts[1] > 0)
    want[1] = np.where(hit, np.where(logits[1] > 0, logits[1] / 1.3, logits[1] * 1.3), logits[1])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[2], logits[2])


def test_min_p_keeps_tokens_above_its_share_of_the_top():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    probs = np.asarray(smp.sampling_probs(jnp.log(jnp.asarray([p], jnp.float32)), 1.0, 1.0, 0, 0.2))[0]
    np.testing.assert_allclose(probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=1e-6)  # 0.05 < 0.2 * 0.5


def test_each_row_draws_with_its_own_seed():
    """A row's token depends on its logits, seed and index only: the same with other rows changed or alone, greedy
    rows the argmax, the index moving the key."""
    draw = jax.jit(smp.draw)  # one compilation per shape, not one per eager op
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, V)).astype(np.float32))
    hot = Sampling(temperature=1.0, top_p=1.0)
    rows = [(hot, 5, 9), (Sampling(temperature=0.0), 0, 9), (hot, 6, 9), (hot, 5, 9)]
    index = jnp.asarray([3, 3, 3, 3])
    a = np.asarray(draw(logits, _params(rows), index))
    assert a[1] == int(jnp.argmax(logits[1]))
    other = logits.at[2].set(0.0)
    b = np.asarray(draw(other, _params(rows[:2] + [(hot, 99, 9)] + rows[3:]), index))
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert int(draw(logits[3:], _params([(hot, 5, 9)]), jnp.asarray([3]))[0]) == a[3]  # alone
    draws = [int(draw(logits[:1], _params([(hot, 5, 9)]), jnp.asarray([i]))[0]) for i in range(40)]
    assert len(set(draws)) > 3  # the index moves the key
    again = [int(draw(logits[:1], _params([(hot, 5, 9)]), jnp.asarray([i]))[0]) for i in range(40)]
    assert draws == again


def test_bad_settings_name_the_field():
    for kw, field in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": "x"}, "stop"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
    ]:
        with pytest.raises(SamplingError, match=f"sampling.{field}"):
            Sampling(**kw).check(1000)


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_float32(seed=3)


def test_engine_stop_strings_bias_and_max_tokens(model):
    tok = Tokenizer.tiny()
    engine = Engine(model, max_slots=3, max_context=128, decode_window=4, tokenizer=tok)
    prompt = tok.encode("Hello there, how are you")
    free = engine.submit(prompt, Sampling(temperature=0.0, stop_token_ids=()), max_tokens=24)
    engine.run()
    text = tok.decode(free.tokens)
    cut = next(i for i in range(4, 24) if len(tok.decode(free.tokens[:i])) > len(tok.decode(free.tokens[: i - 1])))
    stop = tok.decode(free.tokens[:cut])[-2:]  # the last two characters the cut-th token completes
    assert stop in text
    stopped = engine.submit(prompt, Sampling(temperature=0.0, stop_token_ids=(), stop=[stop]), max_tokens=24)
    forced = engine.submit(prompt, Sampling(temperature=0.0, stop_token_ids=(), logit_bias={77: 100.0}), max_tokens=5)
    short = engine.submit(prompt, Sampling(temperature=0.0, stop_token_ids=(), max_tokens=3))
    engine.run()
    first = next(i for i in range(1, 25) if stop in tok.decode(free.tokens[:i]))
    assert stopped.tokens == free.tokens[:first] and (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert forced.tokens == [77] * 5 and forced.finish_reason == "length"
    assert short.tokens == free.tokens[:3]
