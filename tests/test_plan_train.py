"""``k25jax plan --train`` (INT4 QAT): the planner's masters, frozen INT4 experts, other parameters, gradients and
AdamW state equal the buffers a real sharded tiny QAT setup holds, on every one of 8 fake CPU devices."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import k25jax
from k25jax.cli import main
from k25jax.config import k25, tiny
from k25jax.plan import (
    FQ_SCALES,
    INT4_FROZEN,
    MASTERS,
    OTHER_FROZEN,
    OTHER_TRAINABLE,
    TrainSetup,
    plan,
    qat_activation_bytes,
    qat_state_bytes,
    trained_expert_paths,
)
from k25jax.sharding import abstract_mesh, make_mesh, shard_model
from k25jax.train.qat import to_fake_quant, trainable_filter
from k25jax.train.step import OptimizerConfig, split_model

from configs import text_variant


def variant():
    # Expert width 64 = 2 INT4 groups, so the down projection's K splits over tensor=2.
    return text_variant(tiny(), moe_intermediate_size=64)


def held(tree) -> dict:
    """Bytes each device holds of the arrays of ``tree``."""
    out = {d: 0 for d in jax.devices()}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def real_qat_bytes(cfg, sizes: dict, setup: TrainSetup, dtype: str) -> dict[str, dict]:
    """Per-device bytes of a real QAT setup, made as ``k25jax.train`` makes it: experts whose master path the
    trainable pattern matches to fake-quant, placed by the train rules, split by ``trainable_filter``, AdamW init."""
    model = k25jax.build_model(cfg, k25jax.RunConfig(compute_dtype=dtype), seed=2)
    regex = re.compile(setup.trainable)
    chosen = [p for p in trained_expert_paths(model) if regex.search(p + "/master")]
    if chosen:
        exact = "|".join("^" + re.escape(p) + "$" for p in chosen)
        layers = range(*setup.train_layers) if setup.train_layers else None
        to_fake_quant(model, experts=exact, scales=setup.scales, master_dtype=setup.master_dtype, layers=layers)
    model = shard_model(model, make_mesh(**sizes), "train")
    _, trainable, frozen = split_model(model, trainable_filter(setup.trainable))
    tx = OptimizerConfig(state_dtype=setup.state_dtype, accumulate=setup.accumulate).build()
    opt_state = tx.init(trainable)  # as the trainer does: the moments take their parameters' shardings
    groups: dict[str, list] = {k: [] for k in (MASTERS, FQ_SCALES, INT4_FROZEN, OTHER_TRAINABLE, OTHER_FROZEN)}
    for state, is_trainable in ((trainable, True), (frozen, False)):
        for path, var in nnx.to_flat_state(state):
            name = "/".join(map(str, path))
            if name.endswith("/master"):
                groups[MASTERS].append(var.get_value())
            elif name.endswith("/master_scales"):  # a layer-subset weight: its packed / scales are frozen layers'
                groups[FQ_SCALES].append(var.get_value())
            elif name.endswith(("/packed", "/scales")) and "/experts/" in name:
                weight = name.rsplit("/", 1)[0]
                subset = setup.train_layers is not None
                groups[FQ_SCALES if weight in chosen and not subset else INT4_FROZEN].append(var.get_value())
            else:
                groups[OTHER_TRAINABLE if is_trainable else OTHER_FROZEN].append(var.get_value())
    out = {k: held(v) for k, v in groups.items() if v}
    out["gradients"] = held(trainable)  # a gradient per trainable element, in its dtype, placed like it
    out["optimizer"] = held(opt_state)
    out["counters"] = sum(a.nbytes for a in jax.tree.leaves(opt_state) if a.ndim == 0)
    return out


SETUPS = [
    (dict(fsdp=2, expert=2, tensor=2), TrainSetup(), "float32"),
    (
        dict(fsdp=2, expert=4),
        TrainSetup(trainable="experts", master_dtype="bfloat16", state_dtype="bfloat16"),
        "bfloat16",
    ),
    (dict(data=2, fsdp=2, expert=2), TrainSetup(trainable=r"experts/(gate|up)_proj|attn/q_", accumulate=2), "bfloat16"),
    (dict(fsdp=2, tensor=4), TrainSetup(trainable=r"^text/", scales="learned"), "float32"),
    (dict(fsdp=2, expert=2, tensor=2), TrainSetup(train_layers=(1, 2)), "float32"),
    (dict(fsdp=2, expert=4), TrainSetup(trainable="experts", train_layers=(0, 1), scales="learned"), "bfloat16"),
]


@pytest.mark.parametrize("sizes, setup, dtype", SETUPS)
def test_planner_equals_real_qat_buffers(sizes, setup, dtype):
    cfg = variant()
    if sizes.get("tensor") == 4:  # expert width 128 = 4 groups: the down projection's K splits 4 ways
        cfg = text_variant(tiny(), moe_intermediate_size=128)
    params, grads, optimizer = qat_state_bytes(cfg, abstract_mesh(**sizes), setup, jnp.dtype(dtype))
    real = real_qat_bytes(cfg, sizes, setup, dtype)
    print(sizes, setup.trainable, params, grads, optimizer)
    assert set(params) == set(real) - {"gradients", "optimizer", "counters"}
    for category, planned in params.items():
        assert set(real[category].values()) == {planned}, (category, set(real[category].values()), planned)
    assert set(real["gradients"].values()) == {grads}
    # The moments are exact on every device. The step counters (int32 scalars) of an eager init sit on one device;
    # the planner counts them on every device, as the jitted step's outputs are placed (replicated).
    counters = real["counters"]
    assert 0 < counters <= 16  # adam and schedule counts (+ MultiSteps' when accumulating)
    assert max(real["optimizer"].values()) == optimizer
    assert set(real["optimizer"].values()) == {optimizer, optimizer - counters}
    if setup.trainable != "experts":
        assert params[OTHER_TRAINABLE] > 0
    assert params[MASTERS] > 0


def test_train_layers_halves():
    """``--train-layers`` (real buffers above): half of the 2 MoE layers gives half the masters (and their gradients
    and moments) plus half the INT4 bytes of a run that trains no experts."""
    cfg, mesh = variant(), abstract_mesh(fsdp=2, expert=2, tensor=2)
    full_p, full_g, full_o = qat_state_bytes(cfg, mesh, TrainSetup(), jnp.float32)
    half_p, half_g, half_o = qat_state_bytes(cfg, mesh, TrainSetup(train_layers=(1, 2)), jnp.float32)
    none_p, none_g, none_o = qat_state_bytes(
        cfg, mesh, TrainSetup(trainable=r"^text/(?!moe_layers/mlp/experts)"), jnp.float32
    )
    assert cfg.text.num_moe_layers == 2 and MASTERS not in none_p
    assert half_p[MASTERS] * 2 == full_p[MASTERS] and half_p[FQ_SCALES] * 2 == full_p[FQ_SCALES]
    assert half_p[INT4_FROZEN] * 2 == none_p[INT4_FROZEN]
    assert half_p[OTHER_TRAINABLE] == full_p[OTHER_TRAINABLE] == none_p[OTHER_TRAINABLE]
    assert half_g * 2 - full_g == none_g and half_o * 2 - full_o == none_o
    with pytest.raises(ValueError, match="--train-layers 1:3"):
        qat_state_bytes(cfg, mesh, TrainSetup(train_layers=(1, 3)))


def test_full_k25_scores_plain_vs_blockwise():
    """K2.5 at 32K: the plain form's one-layer score term is 2 (fwd + bwd) x b H T^2 x 10 bytes; blockwise it is
    one block, the row statistics, the blocked q, k, v, o and float32 dq, dk, dv (linear in T)."""
    cfg = k25()
    mesh = abstract_mesh(fsdp=8, expert=8)
    T, H = 32768, 64
    plain = qat_activation_bytes(cfg, mesh, 8, T, remat="full")
    block = qat_activation_bytes(cfg, mesh, 8, T, remat="full", attention_block=512)
    scores = plain["one layer's backward: attention"] - block["one layer's backward: attention"]
    linear = T * H * (2 * 192 + 2 * 128) * 2 + T * H * (2 * 192 + 128) * 4
    assert scores == 2 * (H * T * T * 10 - (H * T * 8 + H * 512 * 512 * 10 + linear))
    assert plain["saved for backward (61 layers)"] == 61 * T * 7168 * 2


def test_readme_plans(capsys):
    """The README's QAT plans: K2.5 at 32K context fits on 64 x H200 with the experts of 6 layers trainable, and
    on 256 x H200 with all of them."""
    cfg = k25()

    def qat_plan(mesh, batch, device, **setup):
        return plan(cfg, mesh, batch=batch, context=32768, train=True, device=device, qat=TrainSetup(**setup))

    bf16 = dict(master_dtype="bfloat16", state_dtype="bfloat16", attention_block=512)
    setups = {  # name: (mesh, batch, device, QAT setup)
        "some": (
            dict(fsdp=2, expert=8, tensor=4),
            2,
            "h200",
            dict(trainable="experts", train_layers=(54, 60), state_dtype="bfloat16", attention_block=512),
        ),
        "every": (dict(fsdp=8, expert=8, tensor=4), 8, "h200", bf16),
        "v5p": (dict(fsdp=8, expert=16, tensor=8), 8, "v5p", bf16),
    }
    plans = {name: qat_plan(mesh, batch, device, **setup) for name, (mesh, batch, device, setup) in setups.items()}
    for name, p in plans.items():
        assert p.fits, (name, p.report())
    some, every, v5p = plans["some"], plans["every"], plans["v5p"]
    assert every.params[MASTERS] == 60 * 384 * 3 * 7168 * 2048 * 2 // 256  # bf16 masters of every expert, 1/256
    plain = plan(cfg, dict(fsdp=8, expert=8), batch=64, context=32768, train=True, device="h200", qat=TrainSetup())
    assert not plain.fits and plain.activations["one layer's backward: attention"] > 1e12
    # the README's table
    assert [round(p.total / 1e9, 2) for p in (plain, some, every, v5p)] == [2068.68, 124.46, 126.19, 84.37]
    assert round(some.params[MASTERS] / 1e9, 2) == 6.34 and round(some.params[INT4_FROZEN] / 1e9, 2) == 8.03
    command = "plan --train --mesh fsdp=2,expert=8,tensor=4 --batch 2 --trainable experts --train-layers 54:60 "
    command += "--optimizer-state-dtype bfloat16 --attention-block 512"
    assert main(command.split()) == 0
    out = capsys.readouterr().out
    assert f"{some.total / 1e9:10.2f} GB" in out and "fits" in out
    assert "experts of MoE layers 54:60 (6 of 60)" in out
