"""Images and videos in training samples: the fixed-capacity vision layout computes what the inference path
computes, a packed media batch's loss equals the per-sample losses of the model's own multimodal forward, the
gradient reaches the vision tower, and bad media are named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k25jax
from k25jax import chat
from k25jax.config import RunConfig
from k25jax.demo import tasks
from k25jax.media import load_part
from k25jax.tokenizer import Tokenizer
from k25jax.train import data
from k25jax.train.step import model_loss, token_loss
from k25jax.vision.moonvit import layout_arrays

TOK = Tokenizer.tiny()
TOL = 2e-5  # relative; the layout resamples the position table in one contraction instead of two


@pytest.fixture(scope="module")
def model():
    return k25jax.build_model(k25jax.preset("tiny"), RunConfig(compute_dtype="float32"), seed=0)


def _relative(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_layout_features_equal_the_inference_path(model):
    """Mixed items (a 56x56 image, an image on the table's own 8x8 grid, a 6x4 one, 4- and 3-frame video
    chunks) through ``layout_arrays`` + ``embed_with_layout``'s tower equal ``vision_features``."""
    rng = np.random.default_rng(0)
    grids = [(1, 4, 4), (1, 8, 8), (1, 6, 4), (4, 4, 4), (3, 4, 4)]
    items = [
        (rng.normal(size=(t * h * w, 3, 14, 14)).astype(np.float32), g)
        for g, (t, h, w) in zip(grids, grids, strict=True)
    ]
    want = model.vision_features(np.concatenate([v for v, _ in items]), np.asarray(grids))
    layout = layout_arrays(items, model.cfg.vision)
    assert layout["vision_pixel_values"].shape[0] == 256 and layout["vision_merge_index"].shape[0] == 64
    merged = model.vision.merge_layout(model.vision.encode_layout(layout), layout)
    got = model.projector(merged)
    M = want.shape[0]
    assert M == 4 + 16 + 6 + 4 + 4
    assert _relative(got[:M], want) < TOL
    assert np.all(np.asarray(layout["vision_merge_weight"][M:]) == 0)


def _samples(tmp_path):
    rng = np.random.default_rng(3)
    picked = [tasks.sample(rng, "image"), tasks.sample(rng, "video"), tasks.sample(rng, "add")]
    path = tmp_path / "media.jsonl"
    tasks.write_jsonl(picked, path)
    return picked, str(path)


def _reference_loss(model, s) -> tuple[float, float]:
    """Sum of the masked token losses of one sample on its own, through ``K25.__call__`` with its media."""
    thinking = s["meta"]["mode"] == "thinking"
    parts = [p for _, p in chat.media_parts_of(s["messages"])]
    loaded = [load_part(p, "part") for p in parts]
    tokens = chat.encode_for_training(s["messages"], TOK, thinking=thinking, media=[i for _, i in loaded] or None)
    ids = jnp.asarray([tokens.ids])
    if loaded:
        pixel_values = np.concatenate([m.pixel_values for m, _ in loaded])
        grid = np.concatenate([np.asarray(m.grid_thw).reshape(-1, 3) for m, _ in loaded])
        logits = model(ids, pixel_values=pixel_values, grid_thw=grid)
    else:
        logits = model(ids)
    targets = jnp.asarray([tokens.ids[1:] + [0]])
    mask = jnp.asarray([tokens.generated[1:] + [0]], jnp.float32)
    loss, n = token_loss(logits, targets, mask)
    return tuple(tokens.ids), float(loss) * float(n), float(n)


def test_packed_media_batch_loss_equals_the_per_sample_losses_and_trains_the_tower(model, tmp_path):
    """An image, a video and a text sample packed into one batch: the jitted training loss equals the token-weighted
    mean of each sample's loss through ``K25.__call__`` alone, and its gradient reaches the vision tower and the
    projector."""
    picked, path = _samples(tmp_path)
    batches = data.make_batches(
        path, TOK, batch_size=2, max_length=512, seed=0, num_epochs=1, vision=model.cfg.vision, packing_bins=2
    )
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    assert "sample_index" not in batch  # consumed by the pipeline, not passed to the step
    pads = int((batch["media_index"] >= 0).sum())
    assert pads > 0 and pads == int((batch["input_ids"] == TOK.token_id("<|media_pad|>")).sum())
    graphdef, params, rest = nnx.split(model, lambda path, v: path[0] in ("vision", "projector"), ...)

    @jax.jit
    def loss_and_grad(p, b):
        return jax.value_and_grad(lambda q: model_loss(nnx.merge(graphdef, q, rest), b), has_aux=True)(p)

    (loss, aux), grads = loss_and_grad(params, batch)
    reference = {ids: (part, n) for ids, part, n in (_reference_loss(model, s) for s in picked)}
    total = count = 0.0
    found = 0
    for b in range(batch["input_ids"].shape[0]):
        segments = np.asarray(batch["segment_ids"][b])
        for seg in np.unique(segments[segments > 0]):
            ids = tuple(int(x) for x in np.asarray(batch["input_ids"][b])[segments == seg])
            part, n = reference[ids]  # KeyError: the batch holds a sample that was not written
            total, count, found = total + part, count + n, found + 1
    assert found == 3 and float(aux["tokens"]) == count
    assert abs(float(loss) - total / count) <= TOL * total / count
    by_name = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    for name in ("vision/patch_proj", "vision/pos_emb", "vision/blocks", "projector/in_proj"):
        hits = [k for k in by_name if k.startswith(name)]
        assert hits, (name, sorted(by_name)[:20])
        assert all(np.abs(by_name[k]).max() > 0 for k in hits), name


def test_media_errors_are_named(tmp_path, model):
    image = tasks.sample(np.random.default_rng(0), "image")
    path = tmp_path / "m.jsonl"
    tasks.write_jsonl([image], path)
    with pytest.raises(data.DataError, match=rf"^{path}: the samples hold images or videos but the model has no"):
        data.make_batches(str(path), TOK, batch_size=1, max_length=256, seed=0)
    image["messages"][-2]["content"][0]["image_url"]["url"] = "data:image/png;base64,AAAA"
    path.write_text(json.dumps(image) + "\n")
    with pytest.raises(data.DataError, match=rf"^{path}:1: messages\[\d\]\.content\[0\]: .*image"):
        data.make_batches(str(path), TOK, batch_size=1, max_length=256, seed=0, vision=model.cfg.vision)


def test_training_ids_extend_the_prompt_ids():
    """The ids a media sample trains on start with exactly the prompt :func:`chat.prepare` gives at inference."""
    for task in ("image", "video"):
        s = tasks.sample(np.random.default_rng(1), task, mode="thinking")
        prompt = chat.prepare(s["messages"][:-1], TOK, thinking=True)
        parts = [p for _, p in chat.media_parts_of(s["messages"])]
        tokens = chat.encode_for_training(
            s["messages"], TOK, thinking=True, media=[load_part(p, "p")[1] for p in parts]
        )
        assert tokens.ids[: len(prompt.ids)] == prompt.ids
        assert sum(tokens.generated[: len(prompt.ids)]) == 0 and sum(tokens.generated) > 0
