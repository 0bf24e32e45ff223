"""Router load during training: per-layer expert counts from the forward equal a numpy recount of the router's top-k
choices; the aux-loss-free correction-bias update moves the bias against the load (and u = 0 keeps it bit for bit);
the load statistics reach the metrics log; a run with the update resumes bit for bit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_finetune import _write_samples

import k25jax
from k25jax.config import RunConfig, tiny
from k25jax.sharding import make_mesh, shard_model, use_mesh
from k25jax.text import scan_layers
from k25jax.train import data as train_data
from k25jax.train.step import load_stats, model_loss, model_loss_with_load, router_bias_step, storage_rounded
from k25jax.train.trainer import FinetuneConfig, finetune, load_for_training, prepare, trained_model

from configs import text_variant

F32 = RunConfig(compute_dtype="float32")


def _model(cfg=None, seed: int = 5):
    model = k25jax.build_model(cfg or tiny(), F32, seed=seed)
    bias = model.text.moe_layers.mlp.correction_bias
    # A non-zero bias, so that the recount checks it shifts the choice (it is added for selection only).
    bias.set_value(jax.random.uniform(jax.random.key(1), bias.shape, jnp.float32, -0.05, 0.05))
    return model


def _batch(vocab: int, batch: int = 4, length: int = 16) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[0, length // 2 :] = 2  # two packed samples in row 0
    segment_ids[-1, length - 5 :] = 0  # padding at the end of the last row
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    positions[0, length // 2 :] -= length // 2
    return {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.asarray((segment_ids > 0).astype(np.float32)),
        "positions": jnp.asarray(positions),
        "segment_ids": jnp.asarray(segment_ids),
    }


def _numpy_choices(x: np.ndarray, router: np.ndarray, bias: np.ndarray, cfg) -> np.ndarray:
    """The router's top-k experts ``[N, k]`` (sigmoid scores + bias, group-limited), in float64 numpy."""
    scores = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ router.astype(np.float64))))
    choice = scores + bias.astype(np.float64)
    n, e, g = choice.shape[0], cfg.n_routed_experts, cfg.n_group
    grouped = choice.reshape(n, g, e // g)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    top_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]
    keep = np.zeros((n, g), bool)
    np.put_along_axis(keep, top_groups, True, axis=1)
    masked = np.where(keep[:, :, None], grouped, -np.inf).reshape(n, e)
    return np.argsort(-masked, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]


def _recount(model, batch) -> np.ndarray:
    """Per MoE layer, the valid tokens routed to each expert ``[L, E]``, layer by layer in Python."""
    text, cfg = model.text, model.cfg.text
    valid = np.asarray(batch["segment_ids"] > 0).reshape(-1)
    h = text.embed(batch["input_ids"])
    pos = text._attention_positions(batch["positions"], None, "full", None, batch["segment_ids"])
    h = scan_layers(text.dense_layers, h, lambda layer, h, i: layer(h, pos)[0])
    graphdef, state = nnx.split(text.moe_layers)
    counts = []
    for i in range(cfg.num_moe_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        _, x, _ = layer._attend(h, pos, None, None, "full")
        experts = _numpy_choices(
            np.asarray(x).reshape(-1, cfg.hidden_size),
            np.asarray(layer.mlp.router[...]),
            np.asarray(layer.mlp.correction_bias[...]),
            cfg,
        )
        counts.append(np.bincount(experts[valid].reshape(-1), minlength=cfg.n_routed_experts))
        h = layer(h, pos)[0]
    return np.stack(counts)


def _load(model, batch):
    graphdef, state = nnx.split(model)
    loss, aux = jax.jit(lambda s: model_loss_with_load(nnx.merge(graphdef, s), batch))(state)
    return loss, np.asarray(aux["expert_load"])


@pytest.mark.slow  # ~25 s; CI keeps the mesh variant of the recount
def test_expert_load_equals_a_numpy_recount_of_the_top_k_choices():
    model = _model()
    batch = _batch(model.cfg.text.vocab_size)
    want = _recount(model, batch)
    loss, got = _load(model, batch)
    cfg = model.cfg.text
    assert got.shape == (cfg.num_moe_layers, cfg.n_routed_experts) and got.dtype == np.int32
    assert np.array_equal(got, want), (got, want)
    tokens = int(np.sum(np.asarray(batch["segment_ids"]) > 0))
    assert (got.sum(-1) == tokens * cfg.num_experts_per_tok).all()  # padding not counted
    # The counting forward is the plain forward: the same loss, bit for bit.
    graphdef, state = nnx.split(model)
    plain = jax.jit(lambda s: model_loss(nnx.merge(graphdef, s), batch)[0])(state)
    assert float(loss) == float(plain)


@pytest.mark.slow  # CI time (12 s); the load statistics on one device stay in CI
def test_expert_load_with_the_experts_split_over_a_mesh():
    """The expert-parallel MoE (experts split over the mesh, routed inside ``shard_map``) counts the same."""
    model = _model(text_variant(tiny(), moe_intermediate_size=64))
    batch = _batch(model.cfg.text.vocab_size, batch=8)
    want = _load(model, batch)[1]
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    sharded = shard_model(model, mesh, "train")
    with use_mesh(mesh):
        got = _load(sharded, batch)[1]
    assert np.array_equal(got, want)


def test_router_bias_step_moves_against_the_load():
    bias = jnp.asarray([[0.0, 0.1, -0.2, 0.0], [0.5, 0.0, 0.0, 0.0]], jnp.float32)
    load = jnp.asarray([[10, 2, 4, 0], [4, 4, 4, 4]], jnp.int32)  # layer 0: mean 4; layer 1 balanced
    new = np.asarray(router_bias_step(bias, load, 1e-3))
    np.testing.assert_array_equal(new[0], np.float32([0.0 - 1e-3, 0.1 + 1e-3, -0.2, 0.0 + 1e-3]))
    assert np.array_equal(new[1], np.asarray(bias[1]))  # at the mean: unchanged
    stats = load_stats(np.asarray(load))
    assert stats["expert_load_max_mean"] == 2.5 and stats["experts_unused"] == 1
    assert stats["expert_load_max_mean_per_layer"] == [2.5, 1.0] and stats["experts_unused_per_layer"] == [1, 0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_samples(tmp_path_factory.mktemp("router") / "train.jsonl", 32)


def _cfg(out, data, **kw) -> FinetuneConfig:
    base = dict(
        model="tiny-random",
        data=data,
        out=str(out),
        steps=2,
        batch_size=4,
        max_length=64,
        lr=1e-3,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def _bias(model) -> np.ndarray:
    return np.asarray(model.text.moe_layers.mlp.correction_bias[...])


def _first_batch_load(cfg: FinetuneConfig):
    """The initial bias and the expert load of ``cfg``'s step 1: its first batch (the same pipeline and seed) through
    the model its first step ran (prepared for training, parameters rounded to the storage dtype)."""
    model, tokenizer = load_for_training(cfg)
    prepared = prepare(model, cfg)
    model = prepared.merge(storage_rounded(prepared.trainable, cfg.storage_dtype), prepared.router)
    batches = train_data.make_batches(
        cfg.data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed
    )
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    return _bias(model), _load(model, batch)[1]


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bias_update_direction_and_stats(tmp_path, data):
    rate = 1e-3
    one = _cfg(tmp_path / "run", data, steps=1, router_bias_update=rate, save_every=1)
    finetune(one)
    bias0, load = _first_batch_load(one)
    bias1 = _bias(trained_model(one))
    want = np.asarray(router_bias_step(jnp.asarray(bias0), jnp.asarray(load), rate))
    assert np.array_equal(bias1, want)
    mean = load.mean(-1, keepdims=True)
    assert (bias1[load > mean] < bias0[load > mean]).all() and (bias1[load < mean] > bias0[load < mean]).all()
    assert (load > mean).any() and (load < mean).any()
    # The step's load statistics are in the metrics log (and match the recount of its batch).
    (record,) = _metrics(one.out)
    stats = load_stats(load)
    for key in ("expert_load_max_mean", "experts_unused", "experts_unused_per_layer"):
        assert record[key] == stats[key], key
    np.testing.assert_allclose(record["expert_load_max_mean_per_layer"], stats["expert_load_max_mean_per_layer"])
    assert len(record["experts_unused_per_layer"]) == tiny().text.num_moe_layers


@pytest.mark.slow  # four more runs (~40 s); test_finetune's SIGKILL test covers resume in CI
def test_bias_update_resumes_bitwise(tmp_path, data):
    """Resumed to 2 steps == 2 steps in one go: the bias rides in the checkpoint."""
    rate = 1e-3
    finetune(_cfg(tmp_path / "run", data, steps=1, router_bias_update=rate, save_every=1))
    resumed = _cfg(tmp_path / "run", data, steps=2, router_bias_update=rate, resume=True)
    assert finetune(resumed)["start_step"] == 1
    straight = _cfg(tmp_path / "straight", data, steps=2, router_bias_update=rate)
    finetune(straight)
    assert np.array_equal(_bias(trained_model(resumed)), _bias(trained_model(straight)))
    assert [r["loss"] for r in _metrics(resumed.out)] == [r["loss"] for r in _metrics(straight.out)]


def test_bias_is_frozen_by_default(tmp_path, data):
    cfg = _cfg(tmp_path / "frozen", data, lr=3e-3)
    summary = finetune(cfg)
    model = k25jax.build_model(k25jax.preset("tiny"), cfg.run_config(), seed=cfg.seed)
    trained = trained_model(cfg)
    assert np.array_equal(_bias(trained), _bias(model))
    assert "experts_unused" in summary["last"] and summary["last"]["expert_load_max_mean"] >= 1.0
    # ... while the trained parameters moved
    assert not np.array_equal(np.asarray(trained.text.lm_head[...]), np.asarray(model.text.lm_head[...]))
