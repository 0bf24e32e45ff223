"""Generation: prefill + absorbed decode against full-sequence logits, batching, sampling (the cache itself:
``test_cache.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.cache import LatentCache
from k25jax.generation import generate, stream
from k25jax.sampling import sample
from k25jax.serve.steps import extend, prefill

import tiny_models

REL = 1e-5  # prefill/decode vs full logits: max |diff| <= REL * max |logits| (float32)


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_float32(seed=3)  # shared with the media and session tests


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_prefill_then_decode_matches_full_logits(model):
    """Right-padded batch: prefill (full form) then one-token absorbed decode steps, teacher-forced."""
    rng = np.random.default_rng(0)
    total = 21
    ids = rng.integers(0, 1000, (2, total))
    full = np.asarray(model(jnp.asarray(ids)))
    starts = [5, 9]
    padded = np.zeros((2, 16), np.int32)
    for b, s in enumerate(starts):
        padded[b, :s] = ids[b, :s]
    cache = LatentCache.zeros(model.cfg.text, 2, 32, jnp.float32)
    logits, cache = prefill(model, padded, starts, cache)
    errors = [_rel(np.asarray(logits)[b], full[b, s - 1]) for b, s in enumerate(starts)]
    # Each row decodes its own next token; the shorter row runs ahead through the longer row's positions.
    for step in range(total - max(starts)):
        tokens = np.array([[ids[b, s + step]] for b, s in enumerate(starts)])
        logits, cache = extend(model, tokens, cache)
        for b, s in enumerate(starts):
            errors.append(_rel(np.asarray(logits)[b, 0], full[b, s + step]))
    assert list(np.asarray(cache.lengths)) == [5 + total - 9, total]
    assert max(errors) <= REL, max(errors)
    print(f"max relative error over {len(errors)} steps: {max(errors):.2e}")


def test_chunked_extend_matches_full_logits(model):
    """A multi-token continuation (absorbed form, T > 1) after a prefill equals the full-sequence logits."""
    ids = np.random.default_rng(1).integers(0, 1000, (1, 19))
    full = np.asarray(model(jnp.asarray(ids)))
    cache = LatentCache.zeros(model.cfg.text, 1, 32, jnp.float32)
    _, cache = prefill(model, ids[:, :6], [6], cache)
    logits, cache = extend(model, ids[:, 6:13], cache)
    rel = _rel(logits[0], full[0, 6:13])
    logits, cache = extend(model, ids[:, 13:], cache)
    rel = max(rel, _rel(logits[0], full[0, 13:]))
    assert int(cache.lengths[0]) == 19
    assert rel <= REL, rel


def test_batch_of_different_lengths_matches_alone(model):
    prompts = [[7, 8, 9], list(range(100, 111)), [400, 3, 77, 12, 900, 41]]
    together = generate(model, prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=())
    alone = [generate(model, [p], max_new_tokens=12, temperature=0.0, stop_token_ids=())[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_stop_tokens_end_one_sequence(model):
    prompts = [[7, 8, 9], list(range(100, 111))]
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_token_ids=())

    def cut(row, stops):  # a row ends at its first stop id, kept as its last token; without one it runs to 10
        ends = [i for i, token in enumerate(row) if token in stops]
        return row[: ends[0] + 1] if ends else row

    stop = next(t for t in free[0][3:] if t not in free[1])  # ends row 0 only
    stopped = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_token_ids=[stop])
    assert stopped == [cut(row, [stop]) for row in free]  # every row
    assert len(stopped[0]) == free[0].index(stop) + 1 < 10 and stopped[1] == free[1] and len(stopped[1]) == 10
    # A second stop id that comes up in row 1: both rows end, each at its own step.
    stops = [stop, free[1][6]]
    stopped = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_token_ids=stops)
    assert stopped == [cut(row, stops) for row in free]
    assert all(len(row) < 10 and row[-1] in stops for row in stopped)


def test_streaming_yields_the_same_tokens(model):
    prompts = [[7, 8, 9], [5, 6]]
    steps = list(stream(model, prompts, max_new_tokens=6, temperature=0.7, seed=5, stop_token_ids=()))
    assert len(steps) == 6 and all(len(s) == 2 for s in steps)
    assert [[s[b] for s in steps] for b in range(2)] == generate(
        model, prompts, max_new_tokens=6, temperature=0.7, seed=5, stop_token_ids=()
    )


def test_max_context_limits_total_tokens(model):
    out = generate(model, [list(range(10))], max_new_tokens=20, temperature=0.0, stop_token_ids=(), max_context=16)
    assert len(out[0]) == 6  # prompt + new == max_context
    with pytest.raises(ValueError, match="prompt 1 has 16 tokens"):
        generate(model, [[1], list(range(16))], max_new_tokens=2, max_context=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 5000]], max_new_tokens=2)
    with pytest.raises(ValueError, match="a batch"):
        generate(model, [1, 2, 3], max_new_tokens=2)


def test_inputs_embeds_replace_token_embeddings(model):
    prompts = [[7, 8, 9, 10], [5, 6]]
    plain = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=())
    own = [np.asarray(model.text.embed(jnp.asarray([p])))[0] for p in prompts]
    same = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=(), inputs_embeds=own)
    assert same == plain
    changed = [own[0] + 0.5, None]
    other = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=(), inputs_embeds=changed)
    assert other[1] == plain[1] and other[0] != plain[0]


def test_sampling_filters_and_seeds():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    greedy = np.asarray(sample(logits, key, 0.0, 1.0, 0))
    assert (greedy == 0).all()
    draws = np.asarray(sample(logits, key, 1.0, 1.0, 0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.03, freq
    top2 = np.bincount(np.asarray(sample(logits, key, 1.0, 1.0, 2)), minlength=4) / len(draws)
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.5 / 0.8) < 0.03, top2
    # top_p 0.7: the smallest set reaching 0.7 is {0, 1} (0.5 + 0.3).
    nucleus = np.bincount(np.asarray(sample(logits, key, 1.0, 0.7, 0)), minlength=4) / len(draws)
    assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.625) < 0.03, nucleus
    assert (np.asarray(sample(logits, key, 1.0, 1e-6, 0)) == 0).all()


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, stop_token_ids=())
    a = generate(model, [[7, 8, 9]], seed=1, **kw)
    assert a == generate(model, [[7, 8, 9]], seed=1, **kw)
    assert a != generate(model, [[7, 8, 9]], seed=2, **kw)


def test_chunked_prefill_matches_one_pass(model):
    """Long prompts prefill in chunks (full form, then absorbed over the cache): same greedy tokens."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 1000, n).tolist() for n in (5, 40, 23)]
    kw = dict(max_new_tokens=8, temperature=0.0, stop_token_ids=())
    own = [np.asarray(model.text.embed(jnp.asarray([p])))[0] + 0.01 for p in prompts]
    one_pass = generate(model, prompts, inputs_embeds=own, **kw)
    assert generate(model, prompts, prefill_chunk=16, inputs_embeds=own, **kw) == one_pass
    assert one_pass != generate(model, prompts, **kw)  # the embeddings were used
