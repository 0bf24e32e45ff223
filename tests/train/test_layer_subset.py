"""QAT of the routed experts of some layers of the MoE stack (``to_fake_quant(..., layers=...)``,
``--train-layers``): the chosen layers fake-quant, the others INT4-packed with no float copy, bit for bit the model
a whole-stack conversion gives on the chosen layers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_qat import _batch, _forward_and_loss

import k25jax
from k25jax.config import RunConfig, tiny
from k25jax.moe import Experts
from k25jax.quant import Int4Weight
from k25jax.train.fakequant import SubsetFakeQuantWeight, layer_slots
from k25jax.train.qat import QATError, quantize_experts, to_fake_quant, to_int4, trainable_filter, trainable_paths
from k25jax.train.step import OptimizerConfig, make_train_step, model_loss, split_model
from k25jax.train.trainer import FinetuneConfig

F32 = RunConfig(compute_dtype="float32")


def _int4_model(seed=1):
    model = k25jax.build_model(tiny(), F32, seed=seed)
    quantize_experts(model, "kimi")
    assert model.cfg.text.num_moe_layers == 2
    return model


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def test_layer_slots():
    chosen, slot = layer_slots(5, [3, 1, 3])
    assert chosen == (1, 3) and slot.tolist() == [-1, 0, -2, 1, -3]
    for bad in ([], [5], [-1]):
        with pytest.raises(ValueError, match="0..4"):
            layer_slots(5, bad)


@pytest.mark.parametrize(
    "scales",
    ["dynamic", pytest.param("frozen", marks=pytest.mark.slow), pytest.param("learned", marks=pytest.mark.slow)],
)
def test_step0_bitwise_and_frozen_layers_stay_packed(scales):
    """At step 0 the layer-subset model computes the INT4 model's logits and loss (and greedy tokens) bit for bit; the
    frozen layer's experts are INT4 words only, the masters exist for the chosen layer only."""
    model = _int4_model()
    batch = _batch(model.cfg.text.vocab_size, batch=4, length=32)
    want_logits, want_loss = _forward_and_loss(model, batch)
    subset = _copy(model)
    report = to_fake_quant(subset, grid="kimi", scales=scales, layers=[1])
    assert len(report.converted) == 3
    got_logits, got_loss = _forward_and_loss(subset, batch)
    assert np.array_equal(got_logits, want_logits) and got_loss == want_loss
    if scales == "frozen":  # the cached decode path (slow: two generate compiles)
        want_tokens = k25jax.generate(model, [[1, 2, 3, 4]], max_new_tokens=6, temperature=0)
        assert k25jax.generate(subset, [[1, 2, 3, 4]], max_new_tokens=6, temperature=0) == want_tokens

    graphdef, trainable, frozen = split_model(subset, trainable_filter(r"^text/"))
    experts = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(trainable) if "experts" in p}
    masters = {p: v for p, v in experts.items() if p.endswith("/master")}
    assert len(masters) == 3 and all(v.shape[0] == 1 and v.dtype == jnp.float32 for v in masters.values())
    assert set(experts) == set(masters) | (
        {p[: -len("master")] + "master_scales" for p in masters} if scales == "learned" else set()
    )
    held = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(frozen) if "experts" in p}
    floats = [p for p, v in held.items() if v.dtype == jnp.float32]
    assert floats == []  # no float copy of the frozen layer (scales are bf16, words int32)
    packed = [v for p, v in held.items() if p.endswith("/packed")]
    assert len(packed) == 3 and all(v.shape[0] == 1 and v.dtype == jnp.int32 for v in packed)


def test_gradients_equal_a_whole_stack_conversion():
    """The chosen layer's master gradients are the ones a whole-stack fake-quant model gets for that layer."""
    model = _int4_model()
    batch = _batch(model.cfg.text.vocab_size, batch=4, length=32)

    def grads(layers):
        m = _copy(model)
        to_fake_quant(m, grid="kimi", scales="dynamic", layers=layers)
        graphdef, trainable, frozen = split_model(m, trainable_filter("experts"))
        fn = jax.jit(jax.grad(lambda t: model_loss(nnx.merge(graphdef, t, frozen), batch)[0]))
        return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(fn(trainable))}

    whole, subset = grads(None), grads([1])
    assert set(whole) == set(subset)
    for path, g in subset.items():
        assert np.abs(g).max() > 0
        assert np.array_equal(g[0], whole[path][1]), path


def test_training_moves_only_the_chosen_layer_and_exports_bitwise():
    model = _int4_model()
    start = {n: np.asarray(getattr(model.text.moe_layers.mlp.experts, n).packed.get_value()) for n in Experts.WEIGHTS}
    batch = _batch(model.cfg.text.vocab_size, batch=4, length=32)
    to_fake_quant(model, grid="kimi", scales="dynamic", layers=[0])
    graphdef, trainable, frozen = split_model(model, trainable_filter(r"^text/"))
    config = OptimizerConfig(lr=1e-2, steps=4)
    tx = config.build()
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx, config.schedule())
    losses = []
    for _ in range(4):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3
    trained = nnx.merge(graphdef, trainable, frozen)
    fq_logits, _ = _forward_and_loss(trained, batch)
    assert len(to_int4(trained)) == 3
    experts = trained.text.moe_layers.mlp.experts
    for name in Experts.WEIGHTS:
        weight = getattr(experts, name)
        assert isinstance(weight, Int4Weight)
        words = np.asarray(weight.packed.get_value())
        assert words.shape == start[name].shape
        assert np.array_equal(words[1], start[name][1])  # the frozen layer: its release words, untouched
        assert not np.array_equal(words[0], start[name][0])  # the trained one moved
    int4_logits, _ = _forward_and_loss(trained, batch)
    assert np.array_equal(fq_logits, int4_logits)


def test_bad_layers_are_named():
    model = _int4_model()
    with pytest.raises(QATError, match=r"--train-layers: text/moe_layers/mlp/experts/gate_proj: layers \[2\]"):
        to_fake_quant(model, layers=[2])
    to_fake_quant(model, layers=[0])
    assert all(
        isinstance(m.gate_proj, SubsetFakeQuantWeight) for _, m in nnx.iter_modules(model) if isinstance(m, Experts)
    )
    assert trainable_paths(model, trainable_filter("experts/gate_proj/master")) == [
        "text/moe_layers/mlp/experts/gate_proj/master"
    ]
    with pytest.raises(QATError, match="already a fake-quant weight"):
        to_fake_quant(model, layers=[1])
    every = _int4_model()
    to_fake_quant(every, layers=[1, 0])  # every layer: the whole-stack weight type
    assert type(every.text.moe_layers.mlp.experts.gate_proj).__name__ == "FakeQuantWeight"


def _tensors(release) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(release)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(release, name)))
    return out


@pytest.mark.slow  # ~60 s: three short runs and an export; CI keeps the in-process checks above
def test_finetune_train_layers_resumes_and_exports(tmp_path):
    """``finetune(train_layers="1:2")`` on a kimi-grid release: the export's frozen-layer expert tensors are the
    input's byte for byte, the trained layer's moved, its logits are the trained forward's; resume is bitwise."""
    from test_finetune import _cfg, _losses, _write_samples

    from convert.to_release import export_model
    from k25jax.train.trainer import finetune, trained_model

    model = _int4_model(seed=4)
    source = export_model(model, tmp_path / "source", progress=False)
    finetune(
        FinetuneConfig(
            model="tiny-random",
            data=_write_samples(tmp_path / "t.jsonl", 4),
            out=str(tmp_path / "tok"),
            steps=0,
            export=str(tmp_path / "tok_export"),
        )
    )
    for name in ("tiktoken.model", "chat_template.jinja"):
        os.link(tmp_path / "tok_export" / name, os.path.join(source, name))
    train = _write_samples(tmp_path / "train.jsonl", 64)
    kw = dict(model=str(source), train_layers="1:2", save_every=2)
    whole = _cfg(tmp_path / "whole", train, steps=4, export=str(tmp_path / "export"), **kw)
    summary = finetune(whole)
    finetune(_cfg(tmp_path / "part", train, steps=2, **kw))
    finetune(_cfg(tmp_path / "part", train, steps=4, resume=True, **kw))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")

    before, after = _tensors(source), _tensors(summary["export"])
    assert sorted(before) == sorted(after)
    frozen = [n for n in before if ".layers.1.mlp.experts." in n]  # MoE layer 0 (layer 0 of the tiny model is dense)
    trained = [n for n in before if ".layers.2.mlp.experts." in n]
    assert frozen and trained
    assert all(np.array_equal(before[n], after[n]) for n in frozen)
    assert any(not np.array_equal(before[n], after[n]) for n in trained)
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, tiny().text.vocab_size)
    want = np.asarray(trained_model(whole)(ids))
    exported = k25jax.load_model(summary["export"], F32, progress=False)
    assert np.array_equal(np.asarray(exported(ids)), want)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_layers="1:3"), r"--train-layers 1:3: expected 0 <= A < B <= 2"),
        (dict(train_layers="x"), r"--train-layers 'x': expected A:B"),
        (dict(train_layers="0:1", qat=False), "--train-layers applies to QAT"),
        (dict(train_layers="0:1", lora_rank=2), "--train-layers applies to QAT"),
        (dict(train_layers="0:1", trainable="attn"), "selects no routed expert"),
    ],
)
def test_finetune_bad_train_layers_are_named(tmp_path, change, message):
    from test_finetune import _cfg, _write_samples

    from k25jax.train.trainer import finetune

    out = tmp_path / "run"
    with pytest.raises(QATError, match=message):
        finetune(_cfg(out, _write_samples(tmp_path / "train.jsonl", 8), **change))
    assert not out.exists() or not any(out.iterdir())


def test_train_layers_parsing():
    from k25jax.train.trainer import train_layers

    assert train_layers("1:3", 4) == range(1, 3) and train_layers([0, 2], 4) == range(0, 2)
    with pytest.raises(QATError, match="base-60|quoted"):
        train_layers(62, 4)  # what YAML makes of an unquoted 1:2


def test_cli_names_a_bad_train_layers_range(tmp_path, capsys):
    from test_finetune import _write_samples

    from k25jax.cli import main

    data = _write_samples(tmp_path / "train.jsonl", 8)
    argv = ["finetune", "--model", "tiny-random", "--data", data, "--out", str(tmp_path / "run"), "--train-layers"]
    assert main([*argv, "0:5"]) == 2
    assert "--train-layers 0:5: expected 0 <= A < B <= 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
