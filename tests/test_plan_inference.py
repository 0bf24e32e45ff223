"""``k25jax plan`` for inference: blockwise attention's activation terms, the long-context default block, and how
many sequences fit (``Plan.max_batch``), checked by re-planning."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from k25jax.attention import MLA, Positions
from k25jax.cli import main
from k25jax.config import k25, tiny
from k25jax.plan import LONG_CONTEXT, LONG_CONTEXT_BLOCK, activation_bytes, max_batch, plan
from k25jax.sharding import abstract_mesh

ATTENTION = ("attention scores (one block)", "online softmax: max, sum, accumulators")


def test_blockwise_terms_equal_the_formula():
    """Tiny config on expert=2 x tensor=2, batch 4 (2 rows per device), 2 heads per device, chunk 16 over 100
    cache slots, block 8: every attention term by hand from the absorbed blockwise form's buffers."""
    cfg = tiny()
    t = cfg.text
    H, C, R, K, d = 2, t.kv_lora_rank, t.qk_rope_head_dim, t.qk_head_dim, 2
    b, T, S, bq, bk = 2, 16, 100, 8, 8
    mesh = abstract_mesh(expert=2, tensor=2)
    acts = activation_bytes(cfg, mesh, 4, S, T, 123, attention_block=8)
    assert acts["one layer's local experts (sliced copy)"] == 123
    assert acts["attention scores (one block)"] == b * H * bq * bk * 12  # two f32 score products + f32 exp
    assert acts["online softmax: max, sum, accumulators"] == b * H * bq * (4 + 4 + 2 * C * 4) + b * T * H * C * (4 + d)
    assert acts["attention q / latents (+ blocked copies)"] == b * T * H * (K + C) * d + b * T * H * (C + R) * d
    assert acts["one layer's latents, blocked"] == b * S * (2 * C + R) * d
    plain = activation_bytes(cfg, mesh, 4, S, T, 123)
    assert plain["attention scores"] == b * H * T * S * (4 + d) and "attention scores (one block)" not in plain
    # the terms the attention form does not touch are the same
    for name in ("MoE rows", "residual + logits"):
        assert acts[name] == plain[name]
    # a block larger than the chunk and the cache is capped at both (one block: the whole scores)
    big = activation_bytes(cfg, mesh, 4, S, T, 0, attention_block=4096)
    assert big["attention scores (one block)"] == b * H * T * S * 12


def test_blockwise_estimate_against_the_compiled_mla():
    """One K2.5 MLA layer, absorbed blockwise over a 65,536-slot cache, a 512-token chunk, block 2048, bf16: the
    planner's attention terms against XLA's temporary bytes of the compiled layer (CPU; measured 1.31 GB)."""
    cfg = k25()
    t, S, T, block = cfg.text, 65536, 512, 2048
    abstract = nnx.eval_shape(lambda: MLA(t, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def layer(state, x, cache, cos, sin):
        positions = (S - T) + jnp.arange(T, dtype=jnp.int32)[None, :]
        return nnx.merge(graphdef, state)(
            x, Positions(positions, cos, sin, block=block), cache, layer=0, form="absorbed"
        )

    shape = jax.ShapeDtypeStruct
    half = shape((1, T, t.qk_rope_head_dim // 2), jnp.float32)
    cache = shape((1, 1, S, t.kv_lora_rank + t.qk_rope_head_dim), jnp.bfloat16)
    compiled = jax.jit(layer, donate_argnums=2).lower(
        state, shape((1, T, t.hidden_size), jnp.bfloat16), cache, half, half
    )
    measured = compiled.compile().memory_analysis().temp_size_in_bytes
    acts = activation_bytes(cfg, abstract_mesh(expert=8), 1, S, T, 0, attention_block=block)
    planned = sum(v for k, v in acts.items() if k.startswith(("attention", "online", "one layer's latents")))
    assert 0.8 < measured / planned < 1.25, (measured, planned)


def test_256k_context_fits_8_h200_blockwise_not_plain():
    cfg = k25()
    p = plan(cfg, {"expert": 8}, batch=1, context=262144, device="h200")
    assert p.attention_block == LONG_CONTEXT_BLOCK == 2048 and 262144 > LONG_CONTEXT
    assert p.fits and p.cache == 61 * 576 * 2 * 262144 + 4  # batch 1: the whole sequence on every device
    assert p.activations["attention scores (one block)"] == 64 * 512 * 2048 * 12
    assert any("blockwise, block 2048 (the default for contexts over 32768" in n for n in p.notes)
    plain = plan(cfg, {"expert": 8}, batch=1, context=262144, device="h200", attention_block=None)
    assert not plain.fits and plain.attention_block is None and plain.max_batch == 0
    assert plain.activations["attention scores"] == 64 * 512 * 262144 * (4 + 2)  # 51.54 GB
    assert plain.params == p.params and plain.cache == p.cache
    assert "0 sequences of 262144 tokens fit on these 8 devices" in plain.report()
    # an explicit block is taken as given; short contexts stay plain by default (the README's 32K figures)
    assert plan(cfg, {"expert": 8}, batch=1, context=262144, attention_block=512).attention_block == 512
    short = plan(cfg, {"expert": 8}, batch=8, context=32768, device="h200")
    assert short.attention_block is None and short.activations["attention scores"] == 64 * 512 * 32768 * 6


@pytest.mark.parametrize(
    "mesh, context, device, rows",
    [
        ({"expert": 8}, 262144, "h200", 1),
        ({"expert": 8, "tensor": 2}, 131072, "h200", 7),
        ({"expert": 8}, 32768, "h200", 3),
        ({"fsdp": 2, "expert": 4, "tensor": 2}, 200000, "h200", 2),
    ],
)
def test_max_batch_fits_and_one_more_does_not(mesh, context, device, rows):
    """``max_batch`` N: re-planning with batch N fits, with N + 1 does not, and no batch up to 2N + 16 beyond N fits
    (the batch splits over the axes that divide it, so the per-device bytes jump around)."""
    cfg = k25()
    p = plan(cfg, mesh, batch=1, context=context, device=device)
    n = p.max_batch
    assert n > 1 and p.max_batch_rows == rows
    at_n = plan(cfg, mesh, batch=n, context=context, device=device)
    assert at_n.fits and at_n.max_batch == n
    assert at_n.cache == rows * (61 * 576 * 2 * context + 4)
    assert not plan(cfg, mesh, batch=n + 1, context=context, device=device).fits
    assert max_batch(cfg, mesh, context=context, device=device) == n
    assert f"fits {n} sequences of {context} tokens (batch {n}, {rows} per device) on these" in p.report()


def test_max_batch_by_brute_force_on_a_mesh_of_8():
    """Every batch 1..64 of a 256K plan on expert=8: the ones that fit are exactly 1 and 8 (8: one per device)."""
    cfg = k25()
    fitting = [n for n in range(1, 65) if plan(cfg, {"expert": 8}, batch=n, context=262144).fits]
    assert fitting == [1, 8] and plan(cfg, {"expert": 8}, batch=1, context=262144).max_batch == 8


def test_bad_attention_block_names_the_flag(capsys):
    cfg = tiny()
    for bad in (0, -1, True, 2.5, "x"):
        with pytest.raises(ValueError, match="--attention-block"):
            plan(cfg, {"expert": 2}, batch=1, context=64, attention_block=bad)
    with pytest.raises(ValueError, match="--attention-block"):
        activation_bytes(cfg, abstract_mesh(expert=2), 1, 64, 16, 0, attention_block=0)
    with pytest.raises(ValueError, match="--attention-block with --train"):
        plan(cfg, {"expert": 2}, batch=1, context=64, train=True, attention_block=8)
    for bad in ("0", "-8", "big"):
        with pytest.raises(SystemExit):
            main(["plan", "--model", "tiny", "--mesh", "expert=2", "--attention-block", bad])
        assert "argument --attention-block: expected a positive number of tokens" in capsys.readouterr().err


def test_plan_command_256k(capsys):
    command = "plan --model k25 --mesh expert=8 --batch 1 --context 262144 --device h200"
    assert main(command.split()) == 0
    out = capsys.readouterr().out
    assert "attention scores (one block)                  0.81 GB" in out
    assert "fits (+" in out and "NOT" not in out
    assert "fits 8 sequences of 262144 tokens (batch 8, 1 per device) on these 8 devices" in out
    assert "note: attention: blockwise, block 2048" in out
    assert main([*command.split(), "--attention-block", "plain"]) == 0
    out = capsys.readouterr().out
    assert "attention scores                             51.54 GB" in out and "does NOT fit" in out
    assert main([*command.split(), "--attention-block", "4096"]) == 0
    out = capsys.readouterr().out
    assert "note: attention: blockwise, block 4096 (run with RunConfig(attention_block=4096))" in out
