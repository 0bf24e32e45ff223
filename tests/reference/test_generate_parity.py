"""Greedy generation with the latent cache against transformers' greedy ``generate`` (the oracle).

The checkpoint is a tiny release-format directory written from a random ``Kimi_K25ForConditionalGeneration``
(routed experts INT4-packed; the text stack only, or with the vision tower and projector for image prompts).
Stop tokens are disabled on both sides so every run yields all tokens.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k25jax import load_model
from k25jax.config import RunConfig
from k25jax.generation import generate

import configs
import oracle

pytestmark = pytest.mark.reference

NEW_TOKENS = 32


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=2)
    hf.generation_config.eos_token_id = None
    text_only = dataclasses.replace(cfg, vision=None)
    path = oracle.write_release(oracle.text_param_tree(hf, cfg), text_only, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 1024, n).tolist() for n in (11, 4, 23)]
    expected = [_hf_greedy_media(hf, p, None, NEW_TOKENS) for p in prompts]
    # All three prompts in one batch (different lengths), and the first one alone.
    ours = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    alone = generate(model, prompts[:1], max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    for b in range(len(prompts)):
        assert len(expected[b]) == NEW_TOKENS
        assert ours[b] == expected[b], f"prompt {b}: first mismatch at {_first_diff(ours[b], expected[b])}"
    assert alone[0] == expected[0]


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


# --------------------------------------------------------------------------------------------------------
# Prompts with images
# --------------------------------------------------------------------------------------------------------


def _hf_greedy_media(hf, prompt, media, new_tokens):
    kw = {}
    if media is not None:
        kw = dict(pixel_values=torch.from_numpy(media.pixel_values), image_grid_thw=torch.from_numpy(media.grid_thw))
    out = hf.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **kw,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_with_images_matches_transformers(tmp_path):
    """Chat prompts with images (prepared by ``chat.prepare``: placeholder runs from the real grids), greedy with
    the cache, against ``Kimi_K25ForConditionalGeneration.generate`` with ``pixel_values`` / ``image_grid_thw``.
    Batched with a text-only prompt and a prompt with two other images, each prompt gets its own tokens."""
    from PIL import Image

    from k25jax import Tokenizer
    from k25jax.chat import prepare

    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=5)
    hf.generation_config.eos_token_id = None
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    tok = Tokenizer.tiny()
    rng = np.random.default_rng(3)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    image_file = tmp_path / "photo.png"
    image(150, 90).save(image_file)  # 12x8 patches after padding: a resampled position table
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": str(image_file)}, {"type": "text", "text": "Hi?"}]}],
        [{"role": "user", "content": "Describe a cat."}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": image(60, 100)},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": np.asarray(image(40, 40))},
                ],
            }
        ],
    ]
    prepared = [prepare(c, tok) for c in conversations]
    assert prepared[0].media.grid_thw.tolist() == [[1, 8, 12]] and prepared[1].media is None
    assert prepared[0].ids.count(cfg.media_placeholder_token_id) == 24
    expected = [_hf_greedy_media(hf, ids, media, NEW_TOKENS) for ids, media in prepared]
    kw = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    ours = generate(model, [p.ids for p in prepared], media=[p.media for p in prepared], **kw)
    alone = generate(model, [prepared[0].ids], media=[prepared[0].media], **kw)
    for b in range(len(prepared)):
        assert len(expected[b]) == NEW_TOKENS
        # transformers embeds a generated <|media_pad|> as token 0; a test with one would compare nothing useful.
        assert cfg.media_placeholder_token_id not in expected[b]
        assert ours[b] == expected[b], f"prompt {b}: first mismatch at {_first_diff(ours[b], expected[b])}"
    assert alone[0] == expected[0]
    # The pixels matter: the same ids with another image of the same size give another reply.
    ids, media = prepared[0]
    other = media._replace(pixel_values=media.pixel_values[::-1].copy())
    assert generate(model, [ids], media=[other], **kw)[0] != expected[0]


def test_greedy_generation_with_video_matches_transformers(tmp_path):
    """A chat prompt with a 6-frame video (chunks of 4 and 2 frames, timestamped blocks). transformers takes video
    chunks at its own ``video_token_id`` with ``pixel_values_videos``; k25jax at ``<|media_pad|>``, as the release."""
    from PIL import Image

    from k25jax import Tokenizer
    from k25jax.chat import prepare

    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=6)
    hf.generation_config.eos_token_id = None
    path = oracle.write_release(oracle.release_tensors(hf, cfg), cfg, tmp_path / "release", num_shards=2)
    model = load_model(path, RunConfig(compute_dtype=jnp.float32), progress=False)
    rng = np.random.default_rng(4)
    frames = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(6)]
    video = {"type": "video", "video": frames, "timestamps": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]}
    ids, media = prepare(
        [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}], Tokenizer.tiny()
    )
    assert media.grid_thw.tolist() == [[4, 4, 6], [2, 4, 6]] and media.num_tokens == 12
    pad = cfg.media_placeholder_token_id
    hf_ids = [hf.config.video_token_id if t == pad else t for t in ids]
    out = hf.generate(
        input_ids=torch.tensor([hf_ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.from_numpy(media.pixel_values),
        video_grid_thw=torch.from_numpy(media.grid_thw),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    expected = out[0, len(ids) :].tolist()
    ours = generate(model, [ids], media=[media], max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())[0]
    assert len(expected) == NEW_TOKENS and pad not in expected
    assert ours == expected, f"first mismatch at {_first_diff(ours, expected)}"
