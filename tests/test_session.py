"""``Session``: the latent cache reused across turns gives the tokens a fresh ``generate`` gives, running only
the part of each prompt the cache does not hold (media compared by content, never split)."""

import numpy as np
import pytest
from PIL import Image

from k25jax.chat import parse_ids, prepare
from k25jax.generation import generate
from k25jax.session import Session
from k25jax.tokenizer import Tokenizer

import tiny_models


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_float32(seed=3)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def _image(seed, w=90, h=60):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("thinking", [False, True])
def test_turns_reuse_the_cache_and_match_fresh_generation(model, tok, thinking):
    """Three turns with images: each reply equals ``generate`` on the whole prompt; the reused prefix is the
    common prefix of the new prompt with the previous prompt and reply (its last token never cached)."""
    session = Session(model)
    kw = dict(max_new_tokens=10, temperature=0.0, stop_token_ids=tok.stop_ids)
    history = [{"role": "user", "content": [{"type": "image", "image": _image(0)}, {"type": "text", "text": "Hi"}]}]
    cached: list[int] = []
    previous: list[int] = []
    for turn in range(3):
        ids, media = prepare(history, tok, thinking=thinking)
        reply = session.generate(ids, media, **kw)
        assert reply == generate(model, [ids], media=[media], **kw)[0], f"turn {turn}"
        assert session.reused == _common_prefix(cached, ids)
        # Thinking drops past reasoning: the previous prompt is reused; without thinking, the reply too.
        assert session.reused >= len(previous)
        if turn and not thinking:
            assert session.reused > len(previous)
        previous, cached = ids, (ids + reply)[: len(ids) + len(reply) - 1]
        assert int(session.cache.lengths[0]) == len(session.keys) == len(cached)
        history += [
            parse_ids(reply, tok, thinking=thinking).message(),
            {"role": "user", "content": [{"type": "image", "image": _image(turn + 1)}, {"type": "text", "text": "?"}]},
        ]
    assert session.reused > 0


def test_same_size_image_swapped_is_not_reused(model, tok):
    """Two images of one size give the same ids; the cache is reused only up to the first pad of the image."""
    kw = dict(max_new_tokens=6, temperature=0.0, stop_token_ids=())
    first = prepare(
        [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "image": _image(1)}]}], tok
    )
    second = prepare(
        [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "image": _image(2)}]}], tok
    )
    assert first.ids == second.ids
    session = Session(model)
    session.generate(first.ids, first.media, **kw)
    out = session.generate(second.ids, second.media, **kw)
    assert session.reused == first.ids.index(model.cfg.media_placeholder_token_id)
    assert out == generate(model, [second.ids], media=[second.media], **kw)[0]
    assert out != generate(model, [first.ids], media=[first.media], **kw)[0]


def test_cache_grows_and_survives_an_abandoned_stream(model):
    """A short prompt allocates 128 slots; a longer continuation grows the cache keeping its contents. A stream
    dropped after 3 tokens leaves a cache that the next call still reuses correctly."""
    kw = dict(temperature=0.0, stop_token_ids=())
    rng = np.random.default_rng(5)
    short = rng.integers(0, 1000, 20).tolist()
    session = Session(model)
    stream = session.stream(short, max_new_tokens=8, **kw)
    taken = [next(stream) for _ in range(3)]
    stream.close()
    assert session.cache.max_len == 128 and len(session.keys) >= 20
    longer = short + taken + rng.integers(0, 1000, 150).tolist()
    out = session.generate(longer, max_new_tokens=8, **kw)
    assert session.reused == 23 and session.cache.max_len == 256
    assert out == generate(model, [longer], max_new_tokens=8, **kw)[0]
    session.reset()
    assert session.generate(longer, max_new_tokens=8, **kw) == out and session.reused == 0
