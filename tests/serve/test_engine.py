"""The engine: continuous batching gives each request exactly the tokens it gives alone, prefill and decode
through the engine match full-sequence logits, prefix reuse, cancellation, chunked prefill beside decode."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.sampling import Sampling
from k25jax.serve.engine import Engine, EngineError

import tiny_models

REL = 1e-5  # engine log-probabilities vs full-sequence log-softmax: max |diff| <= REL * max |logp| (float32)
GREEDY = Sampling(temperature=0.0, stop_token_ids=())


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_float32(seed=3)


def _engine(model, **kw):
    settings = dict(max_slots=4, max_context=256, decode_window=4, prefill_chunk=16, prefill_budget=32)
    return Engine(model, **{**settings, **kw})


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, int(rng.integers(3, 60))).tolist() for _ in range(n)]


def _alone(model, prompt, sampling, max_tokens, **kw):
    engine = _engine(model, **kw)
    r = engine.submit(prompt, sampling, max_tokens=max_tokens)
    engine.run()
    return r.tokens


def test_sixteen_requests_arriving_at_different_steps_match_alone(model):
    """16 greedy requests of different lengths on 4 slots, submitted 2 per step (slots freed and reused, prompts
    prefilled in chunks while others decode), plus a seeded sampled one: each equals its run alone."""
    prompts = _prompts(16)
    lengths = [5 + 3 * (i % 5) for i in range(16)]
    sampled = Sampling(temperature=0.8, top_p=0.9, seed=11, stop_token_ids=())
    engine = _engine(model)
    requests, pending, steps = [], list(range(16)), 0
    while pending or not engine.idle:
        for _ in range(2):
            if pending:
                i = pending.pop(0)
                requests.append(engine.submit(prompts[i], GREEDY, max_tokens=lengths[i]))
        if steps == 3:
            requests.append(engine.submit(prompts[0], sampled, max_tokens=12))
        engine.step()
        steps += 1
    assert steps > 16 // 4 and engine.stats["windows"] > 4
    for i in range(16):
        assert requests[i if i < 8 else i + 1].tokens == _alone(model, prompts[i], GREEDY, lengths[i]), i
    r = requests[8]  # the sampled one, submitted at step 3
    assert r.sampling is sampled and r.tokens == _alone(model, prompts[0], sampled, 12)
    assert r.tokens != requests[0].tokens[:12]
    assert all(q.finish_reason == "length" and len(q.tokens) == q.max_tokens for q in requests)


def test_engine_logprobs_match_full_sequence_logits(model):
    """Chunked prefill (full form, then absorbed chunks) and windowed decode: the chosen tokens' log-probabilities
    equal the full forward's log-softmax at the same positions, and greedy picks its argmax."""
    prompt = _prompts(1, seed=4)[0] + _prompts(1, seed=5)[0]  # > one 16-token chunk
    engine = _engine(model)
    r = engine.submit(prompt, Sampling(temperature=0.0, stop_token_ids=(), logprobs=3), max_tokens=9)
    engine.run()
    full = jax.nn.log_softmax(model(jnp.asarray([prompt + r.tokens]))[0], axis=-1)
    want = np.asarray(full[len(prompt) - 1 : len(prompt) - 1 + len(r.tokens)])
    got = np.array([lp for lp, _ in r.logprobs])
    chosen = want[np.arange(len(r.tokens)), r.tokens]
    assert np.abs(got - chosen).max() <= REL * np.abs(want).max()
    assert r.tokens == want.argmax(-1).tolist()
    for (_, alts), row in zip(r.logprobs, want, strict=True):
        assert [a for a, _ in alts] == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([v for _, v in alts], np.sort(row)[::-1][:3], rtol=1e-5)


def test_prefix_reuse_gives_cold_tokens_and_reports_cached(model):
    """A shared 40-token system prefix: the second request takes 32 tokens (two 16-token blocks) from the first
    one's slot while it still runs (copied), the third from a free slot (no copy); tokens equal cold runs."""
    rng = np.random.default_rng(7)
    system = rng.integers(0, 1000, 40).tolist()
    a, b, c = (system + rng.integers(0, 1000, n).tolist() for n in (5, 9, 3))
    engine = _engine(model, max_slots=2, prefill_budget=None)
    first = engine.submit(a, GREEDY, max_tokens=20)
    engine.step()
    second = engine.submit(b, GREEDY, max_tokens=6)
    engine.run()
    third = engine.submit(c, GREEDY, max_tokens=6)
    engine.run()
    assert (first.cached_tokens, second.cached_tokens, third.cached_tokens) == (0, 32, 32)
    assert third.usage["prompt_tokens_details"] == {"cached_tokens": 32}
    cold = [_alone(model, p, GREEDY, n, block_size=0) for p, n in ((a, 20), (b, 6), (c, 6))]
    assert [first.tokens, second.tokens, third.tokens] == cold
    # A whole earlier conversation (prompt + reply) comes back as the prefix of the next turn.
    turn = a + first.tokens + [5, 6, 7]
    again = engine.submit(turn, GREEDY, max_tokens=4)
    engine.run()
    assert again.cached_tokens == (len(a) + len(first.tokens) - 1) // 16 * 16 > 40
    assert again.tokens == _alone(model, turn, GREEDY, 4, block_size=0)


def test_cancel_frees_the_slot_at_the_next_window(model):
    engine = _engine(model, max_slots=1, prefill_budget=None)
    long = engine.submit(_prompts(1)[0], GREEDY, max_tokens=100)
    queued = engine.submit(_prompts(1, seed=1)[0], GREEDY, max_tokens=3)
    engine.step()
    engine.step()
    assert len(long.tokens) == 1 + 2 * 4 and queued.slot is None  # first token + two windows of 4
    engine.cancel(long)
    engine.step()  # the cancel frees the slot, the queued request takes it in the same step
    assert long.finish_reason == "cancelled" and len(long.tokens) == 9 and queued.slot == 0
    engine.run()
    assert queued.tokens == _alone(model, queued.prompt, GREEDY, 3, prefill_budget=None)


def test_a_long_prompt_prefills_in_chunks_while_others_decode(model):
    """Budget 32 tokens a step: a 200-token prompt takes 7 steps to prefill, and the running stream gets a window
    of tokens in each of them."""
    engine = _engine(model, max_slots=2, max_context=512)
    running = engine.submit(list(range(10, 20)), GREEDY, max_tokens=60)
    engine.step()
    long = engine.submit(np.random.default_rng(3).integers(0, 1000, 200).tolist(), GREEDY, max_tokens=4)
    counts = []
    while not long.tokens:
        engine.step()
        counts.append(len(running.tokens))
    assert len(counts) == 7  # ceil(200 / 32): 16-token chunks, two a step
    assert all(b - a == 4 for a, b in zip([1 + 4] + counts, counts, strict=False))
    engine.run()
    assert long.tokens == _alone(model, long.prompt, GREEDY, 4, max_context=512)


def test_stop_ids_max_tokens_and_context_end_requests(model):
    engine = _engine(model, max_context=64)
    free = engine.submit(_prompts(1)[0], GREEDY, max_tokens=10)
    engine.run()
    stop = free.tokens[4]
    stopped = engine.submit(free.prompt, Sampling(temperature=0.0, stop_token_ids=(stop,)), max_tokens=10)
    full = engine.submit(list(range(1, 60)), GREEDY)  # 59 prompt tokens: 5 more fill the 64 positions
    engine.run()
    assert stopped.tokens == free.tokens[: free.tokens.index(stop) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert len(full.tokens) == 5 and full.finish_reason == "length"
    with pytest.raises(EngineError, match="request 3: prompt has 64 tokens"):
        engine.submit(list(range(64)), GREEDY)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit([1, 10**6], GREEDY)
    with pytest.raises(EngineError, match="needs an engine made with a tokenizer"):
        engine.submit([1, 2], Sampling(stop=["x"]))


class _OnlyTokens:
    """A guide allowing only ``allowed`` tokens, complete after ``length`` of them."""

    def __init__(self, allowed, length):
        self.allowed, self.length, self.seen = allowed, length, []

    def fill(self, row):
        row[:] = 0
        for t in self.allowed:
            row[t // 32] |= np.int32(1 << (t % 32)) if t % 32 != 31 else np.int32(-(2**31))

    def advance(self, token):
        assert token in self.allowed
        self.seen.append(token)

    def finished(self):
        return len(self.seen) >= self.length


def test_guide_masks_tokens_and_background_loop_serves_threads(model):
    """A guided request draws only allowed tokens (one step per window) and stops when its guide is complete;
    requests submitted from threads to a started engine finish with on_update called, the unguided ones as
    they would alone."""
    import threading

    engine = _engine(model)
    engine.start()
    try:
        updates, done = [], threading.Event()
        guide = _OnlyTokens([5, 63, 64, 999], 5)
        guided = engine.submit([1, 2, 3], Sampling(temperature=1.0, seed=1, stop_token_ids=()), guide=guide)
        plain = []

        def client(i):
            plain.append(engine.submit(_prompts(1, seed=i)[0], GREEDY, max_tokens=6, on_update=updates.append))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        while not (guided.finished and all(r.finished for r in plain)):
            done.wait(0.05)
    finally:
        engine.stop()
    assert guided.tokens == guide.seen and len(guided.tokens) == 5 and set(guided.tokens) <= {5, 63, 64, 999}
    assert guided.finish_reason == "stop"
    for r in plain:
        assert r.tokens == _alone(model, r.prompt, GREEDY, 6) and r in updates


def test_blockwise_attention_engine_gives_plain_tokens():
    """With ``attention_block`` set, chunked prefill and decode attend over the cache blockwise (online softmax,
    no score tensor spanning the cache): same greedy tokens and log-probabilities to 1e-5 as plain attention."""
    plain = tiny_models.tiny_float32(seed=3)
    blockwise = tiny_models.tiny_float32(seed=3).set_run(attention_block=16)
    prompts = _prompts(3, seed=9)
    sampling = Sampling(temperature=0.0, stop_token_ids=(), logprobs=0)
    results = []
    for m in (plain, blockwise):
        engine = _engine(m, max_slots=2)
        rs = [engine.submit(p, sampling, max_tokens=10) for p in prompts]
        engine.run()
        results.append(rs)
    for a, b in zip(*results, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose([x for x, _ in a.logprobs], [x for x, _ in b.logprobs], rtol=1e-5, atol=1e-5)


def test_prefill_batches_padded_with_other_slots_change_nothing(model):
    """Three prompts prefilled together run as a batch of 4 (padded with the fourth slot's row, here a request
    that is decoding, then a free slot holding a reusable prompt): every request still equals its run alone, the
    padding slot's prompt is still reused, and every prefill batch has a power-of-two size."""
    prompts = _prompts(5, seed=9)
    prompts[0] = _prompts(1, seed=12)[0] * 4  # long: its length + a chunk passes the group's cache span
    penalized = Sampling(temperature=0.8, seed=5, presence_penalty=1.0, frequency_penalty=0.5, stop_token_ids=())
    engine = _engine(model, prefill_chunk=64, prefill_budget=None, block_size=4)
    batches, inner = [], engine.fns.prefill_chunk

    def spy(state, cache, ss, params, slots, *args, **kwargs):
        batches.append(int(slots.shape[0]))
        return inner(state, cache, ss, params, slots, *args, **kwargs)

    engine.fns = SimpleNamespace(**{**vars(engine.fns), "prefill_chunk": spy})
    first = engine.submit(prompts[0], penalized, max_tokens=20)
    for _ in range(2):
        engine.step()  # first is decoding
    assert first.tokens and not first.finished
    group = [engine.submit(p, GREEDY, max_tokens=6) for p in prompts[1:4]]
    engine.run()
    assert len(prompts[0]) + len(first.tokens) > 128 and first.tokens == _alone(model, prompts[0], penalized, 20)
    for p, r in zip(prompts[1:4], group, strict=True):
        assert r.tokens == _alone(model, p, GREEDY, 6)
    # Every slot is free now and holds a reusable prompt. Three fresh prompts take three slots, padded with the
    # fourth; then the four first prompts again: the one whose slot was only padding reuses its cached blocks.
    fresh = [engine.submit(p, GREEDY, max_tokens=5) for p in _prompts(3, seed=10)]
    engine.run()
    for p, r in zip(_prompts(3, seed=10), fresh, strict=True):
        assert r.tokens == _alone(model, p, GREEDY, 5)
    again = [engine.submit(p, GREEDY, max_tokens=5) for p in prompts[:4]]
    engine.run()
    for p, r in zip(prompts[:4], again, strict=True):
        assert r.tokens == _alone(model, p, GREEDY, 5)
    assert any(r.cached_tokens > 0 for r in again)
    assert batches.count(4) >= 2, batches  # the two groups of 3
    assert all(b & (b - 1) == 0 for b in batches), batches


def test_warmup_compiles_every_shape_plain_traffic_meets(model):
    """After ``warmup(max_length)`` on an idle engine, requests of mixed batch sizes whose sequences stay within
    ``max_length`` compile nothing more (prefill, decode, admission), and each gives the tokens of a cold engine:
    the warm-up changed neither the cache nor the slots."""
    prompts = [p[:30] for p in _prompts(5, seed=4)]
    settings = dict(max_slots=2, max_context=256, prefill_chunk=32, prefill_budget=None, block_size=0)
    engine = _engine(model, **settings)
    shapes = engine.warmup_shapes(128)
    assert shapes == {
        "prefill": [(1, 16), (1, 32), (2, 16), (2, 32)],
        "decode": [(1, 128), (2, 128)],
        "prefill_after_prefix": [],
    }
    reusing = _engine(model, **{**settings, "block_size": 4}).warmup_shapes(128)["prefill_after_prefix"]
    assert reusing == [(1, 16, 128), (1, 32, 128), (2, 16, 128), (2, 32, 128)]  # the rest of a prompt after a prefix
    done = engine.warmup(128, progress=False)
    assert done["shapes"] == 6
    fns = engine.fns
    sizes = [f._cache_size() for f in (fns.prefill_chunk, fns.decode_window, fns.admit)]
    assert sizes[0] >= 4 and sizes[1] >= 2 and sizes[2] >= 2, sizes  # the counters count these compilations
    first = engine.submit(prompts[0], GREEDY, max_tokens=12)
    engine.step()  # one row decoding, then two prompts prefilled together beside it
    rest = [engine.submit(p, GREEDY, max_tokens=8 + i) for i, p in enumerate(prompts[1:])]
    engine.run()
    assert [f._cache_size() for f in (fns.prefill_chunk, fns.decode_window, fns.admit)] == sizes
    for p, r, n in zip(prompts, [first, *rest], [12, 8, 9, 10, 11], strict=True):
        assert len(r.tokens) == n and r.tokens == _alone(model, p, GREEDY, n, **settings)
    with pytest.raises(EngineError, match="idle"):
        engine.submit(prompts[0], GREEDY, max_tokens=2)
        engine.warmup(128)
