"""Generation with media: prefill with vision features against full-sequence logits, batching media with text
prompts, chunked prefill across media, and errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from k25jax import build_model
from k25jax.cache import LatentCache
from k25jax.chat import prepare
from k25jax.config import RunConfig, tiny
from k25jax.generation import generate
from k25jax.serve.steps import extend, media_embeds, prefill
from k25jax.tokenizer import Tokenizer

import tiny_models

REL = 1e-5  # cached vs full logits: max |diff| <= REL * max |logits| (float32)
GREEDY = dict(temperature=0.0, stop_token_ids=())


@pytest.fixture(scope="module")
def model():
    return tiny_models.tiny_float32(seed=3)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def prompts(tok):
    """An image prompt, a text prompt, and a prompt with a 6-frame video (two chunks) and an image."""
    frames = [_image(60, 40, 20 + i) for i in range(6)]
    return [
        prepare(_user({"type": "image", "image": _image(90, 60, 1)}, "What is this?"), tok),
        prepare(_user("Tell me a story about a fox."), tok),
        prepare(
            _user(
                "Watch ",
                {"type": "video", "video": frames, "timestamps": [0, 0.5, 1, 1.5, 2, 2.5]},
                {"type": "image", "image": _image(40, 80, 2)},
                "and compare.",
            ),
            tok,
        ),
    ]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.slow  # ~30 s; CI keeps the chunked-prefill and batch-mixing media checks
def test_cached_logits_with_media_match_full_sequence(model, prompts):
    """Prefill (vision features merged) then teacher-forced absorbed decode equal ``model(ids, pixel_values=...)``
    at every position, for a right-padded batch of an image prompt and a video + image prompt."""
    rows = [prompts[0], prompts[2]]
    extra = np.random.default_rng(0).integers(0, 1000, (2, 6))
    full = [
        np.asarray(model(jnp.asarray([p.ids + extra[b].tolist()]), pixel_values=p.media[0], grid_thw=p.media[1]))[0]
        for b, p in enumerate(rows)
    ]
    lengths = [len(p.ids) for p in rows]
    T = max(lengths)
    ids = np.zeros((2, T), np.int32)
    for b, p in enumerate(rows):
        ids[b, : len(p.ids)] = p.ids
    embeds = media_embeds(model, ids, [p.media for p in rows])
    cache = LatentCache.zeros(model.cfg.text, 2, T + 8, jnp.float32)
    logits, cache = prefill(model, ids, lengths, cache, inputs_embeds=embeds)
    errors = [_rel(logits[b], full[b][n - 1]) for b, n in enumerate(lengths)]
    for step in range(extra.shape[1]):
        logits, cache = extend(model, extra[:, step : step + 1], cache)
        errors += [_rel(logits[b, 0], full[b][n + step]) for b, n in enumerate(lengths)]
    assert max(errors) <= REL, max(errors)
    print(f"max relative error over {len(errors)} positions: {max(errors):.2e}")


def test_greedy_with_media_equals_uncached_argmax(model, prompts):
    """Greedy tokens with the cache are the argmax of the uncached model (vision included) over the prompt and the
    tokens before them (one causal pass over the whole sequence gives every step's logits)."""
    ids, media = prompts[2]
    ours = generate(model, [ids], media=[media], max_new_tokens=8, **GREEDY)[0]
    logits = np.asarray(model(jnp.asarray([ids + ours]), pixel_values=media.pixel_values, grid_thw=media.grid_thw))
    assert ours == np.argmax(logits[0, len(ids) - 1 : -1], axis=-1).tolist()


def test_batch_mixing_media_and_text_matches_alone(model, prompts):
    """Each prompt's features go to its own placeholders: the batch gives every prompt its tokens alone."""
    kw = dict(max_new_tokens=10, **GREEDY)
    together = generate(model, [p.ids for p in prompts], media=[p.media for p in prompts], **kw)
    alone = [generate(model, [p.ids], media=[p.media], **kw)[0] for p in prompts]
    assert together == alone and all(len(t) == 10 for t in together)
    # Text-only prompt: media=None and media=[None] agree with the text path.
    assert generate(model, [prompts[1].ids], **kw)[0] == alone[1]
    # Swapping two same-size images between prompts swaps nothing else: the media really is per prompt.
    swapped = generate(model, [prompts[0].ids, prompts[0].ids], media=[prompts[0].media, _flip(prompts[0].media)], **kw)
    assert swapped[0] == alone[0] and swapped[1] != alone[0]


def test_chunked_prefill_across_media_runs(model, prompts):
    """Prefill chunks of 16 tokens cut through the pad runs; the features still land on their positions."""
    kw = dict(max_new_tokens=8, **GREEDY)
    media = [p.media for p in prompts]
    one_pass = generate(model, [p.ids for p in prompts], media=media, **kw)
    assert generate(model, [p.ids for p in prompts], media=media, prefill_chunk=16, **kw) == one_pass


def test_media_errors_name_the_prompt(model, prompts):
    ids, media = prompts[0]
    with pytest.raises(ValueError, match=r"prompt 1 holds 0 <\|media_pad\|> tokens .* its media give 12"):
        generate(model, [ids, [5, 6]], media=[media, media], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 0 holds 12 <\|media_pad\|> tokens .* its media give 0"):
        generate(model, [ids, [5, 6]], media=[None, media], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 media entries for 1 prompts"):
        generate(model, [ids], media=[media, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="media or inputs_embeds, not both"):
        generate(model, [ids], media=[media], inputs_embeds=[None], max_new_tokens=2)
    text_only = build_model(dataclasses.replace(tiny(), vision=None), RunConfig(compute_dtype=jnp.float32))
    with pytest.raises(ValueError, match="has no vision tower"):
        generate(text_only, [ids], media=[media], max_new_tokens=2)


def _flip(media):
    return media._replace(pixel_values=media.pixel_values[::-1].copy())
