"""The QAT train step: next-token loss on assistant tokens, an optax AdamW chain, a jitted step with the state donated.

The step is a pure function of ``(trainable, opt_state, frozen, batch)``: the model is split once
(:func:`split_model`) into its graph definition, the trainable parameters (``trainable_filter``) and everything else,
so no graph is walked or hashed per step, and optimizer state exists only for the trainable leaves. Frozen INT4
experts ride in ``frozen`` packed, as the model holds them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping and gradient accumulation.

    ``steps`` is the total number of optimizer steps (the schedule's length); ``accumulate`` micro-batches make one
    step (``optax.MultiSteps``). Weight decay applies to parameters of rank >= 2 (matrices, expert stacks), not to
    norms and biases. ``state_dtype`` is the dtype of Adam's first moment (``"float32"`` or ``"bfloat16"``).
    """

    lr: float = 1e-4
    warmup: int = 0
    steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    accumulate: int = 1
    state_dtype: str = "float32"

    def schedule(self) -> optax.Schedule:
        warmup = max(0, min(self.warmup, self.steps))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else self.lr,
            peak_value=self.lr,
            warmup_steps=warmup,
            decay_steps=max(self.steps, warmup + 1),
            end_value=self.lr * self.end_lr_ratio,
        )

    def build(self) -> optax.GradientTransformation:
        decay_mask = lambda params: jax.tree.map(lambda a: a.ndim >= 2, params)  # noqa: E731
        chain = []
        if self.clip_norm:
            chain.append(optax.clip_by_global_norm(self.clip_norm))
        chain.append(
            optax.adamw(
                self.schedule(),
                b1=self.b1,
                b2=self.b2,
                eps=self.eps,
                weight_decay=self.weight_decay,
                mask=decay_mask,
                mu_dtype=jnp.dtype(self.state_dtype),
            )
        )
        tx = optax.chain(*chain)
        if self.accumulate > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulate)
        return tx


def split_model(model: nnx.Module, trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable_state, frozen_state)`` of ``model`` for the ``trainable`` nnx filter."""
    return nnx.split(model, trainable, ...)


def token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the masked tokens: ``logits [B, T, V]`` float32, ``targets [B, T]``,
    ``loss_mask [B, T]`` -> ``(loss, tokens)``.

    ``-log_softmax(x)[t] = log(sum(exp(x - m))) - (x_t - m)`` with ``jax.nn.log_softmax``'s arithmetic, but
    ``x_t - m`` picked by a one-hot select instead of a gather: the gather's gradient is a scatter into a zeroed
    ``[B, T, V]`` buffer, on CPU the slowest part of the loss; the select's is a ``where``."""
    shifted = logits.astype(jnp.float32)
    shifted = shifted - jax.lax.stop_gradient(jnp.max(shifted, axis=-1, keepdims=True))
    log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    vocab = jax.lax.broadcasted_iota(jnp.int32, shifted.shape, shifted.ndim - 1)
    picked = jnp.sum(jnp.where(vocab == targets[..., None].astype(jnp.int32), shifted, 0.0), axis=-1)
    nll = log_sum - picked
    mask = loss_mask.astype(jnp.float32)
    tokens = mask.sum()
    return (nll * mask).sum() / jnp.maximum(tokens, 1.0), tokens


def input_embeddings(model, batch: dict) -> jax.Array:
    """``[B, T, D]`` embeddings of a batch: the token table's, with the media features at ``<|media_pad|>``
    positions when the batch carries media (``media_index`` and the vision layout, ``k25jax.train.data``)."""
    if "media_index" in batch:
        from k25jax.vision.moonvit import LAYOUT_KEYS

        if getattr(model, "vision", None) is None:
            raise ValueError("the batch holds media but the model has no vision tower")
        return model.embed_with_layout(batch["input_ids"], batch["media_index"], {k: batch[k] for k in LAYOUT_KEYS})
    return getattr(model, "text", model).embed(batch["input_ids"])


def model_loss(model, batch: dict) -> tuple[jax.Array, dict]:
    """The loss of a ``K25`` (or ``TextModel``) on a packed batch (``k25jax.train.data`` contract)."""
    text = getattr(model, "text", model)
    logits = text(
        batch["input_ids"],
        positions=batch["positions"],
        inputs_embeds=input_embeddings(model, batch),
        segment_ids=batch["segment_ids"],
    )
    loss, tokens = token_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"tokens": tokens}


def model_loss_with_load(model, batch: dict) -> tuple[jax.Array, dict]:
    """:func:`model_loss` (the same loss) plus ``aux["expert_load"] [L, E]`` int32: the batch's real tokens
    (``segment_ids > 0``) routed to each expert of each MoE layer (:meth:`k25jax.text.TextModel.forward_with_load`)."""
    text = getattr(model, "text", model)
    segment_ids = batch["segment_ids"]
    h, load = text.forward_with_load(
        input_embeddings(model, batch), batch["positions"], segment_ids=segment_ids, valid=segment_ids > 0
    )
    loss, tokens = token_loss(text.logits(h), batch["targets"], batch["loss_mask"])
    aux = {"tokens": tokens}
    if load is not None:
        aux["expert_load"] = load
    return loss, aux


def router_bias_step(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """The aux-loss-free balancing update (DeepSeek-V3): per MoE layer ``bias_e += rate * sign(mean(load) -
    load_e)``, so an expert chosen more often than the mean loses ``rate`` of selection bias and a less chosen one
    gains it. ``bias [L, E]`` float32, ``load [L, E]`` token counts."""
    load = load.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return (bias + jnp.float32(rate) * jnp.sign(mean - load)).astype(bias.dtype)


def load_stats(load) -> dict:
    """Router load statistics of ``load [L, E]`` token counts (host numpy): ``expert_load_max_mean`` (the largest
    per-layer ``max / mean`` load ratio, 1.0 is perfectly balanced), ``experts_unused`` (experts no token chose,
    summed over layers), and per layer the lists ``expert_load_max_mean_per_layer``, ``experts_unused_per_layer``."""
    load = np.asarray(load, np.float64)
    ratio = load.max(-1) / np.maximum(load.mean(-1), 1e-9)
    unused = (load == 0).sum(-1)
    return {
        "expert_load_max_mean": float(ratio.max()),
        "experts_unused": int(unused.sum()),
        "expert_load_max_mean_per_layer": [round(float(r), 4) for r in ratio],
        "experts_unused_per_layer": [int(u) for u in unused],
    }


def _round_ste(w: jax.Array, dtype) -> jax.Array:
    """``w`` rounded to ``dtype`` and back, with a straight-through gradient. Bit-exact: ``r - w`` is exact for ``r``
    within a factor 2 of ``w`` (Sterbenz), so ``w + (r - w) == r``."""
    r = w.astype(dtype).astype(w.dtype)
    return w + jax.lax.stop_gradient(r - w)


def storage_rounded(trainable, storage_dtype):
    """The trainable parameters as the release will store them: every float leaf rounded to ``storage_dtype``
    (bf16 for Kimi releases) except fake-quant masters (their export is the INT4 grid itself). The forward sees
    these, the optimizer updates the full-precision values: so the exported release computes exactly what was
    trained. ``storage_dtype=None``: unchanged."""
    if storage_dtype is None:
        return trainable
    dtype = jnp.dtype(storage_dtype)

    def leaf(path, value):
        if path and path[-1] == "master" or not jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == dtype:
            return value
        return _round_ste(value, dtype)

    flat = nnx.to_flat_state(trainable)
    return nnx.from_flat_state([(p, v.replace(leaf(p, v.get_value()))) for p, v in flat])


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule=None,
    loss_fn=model_loss,
    storage_dtype=None,
):
    """A jitted ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``; the trainable
    parameters and optimizer state are donated; ``frozen`` is one ``nnx.State`` or a tuple of them. Metrics:
    ``loss``, ``grad_norm``, ``lr``, ``tokens`` (and ``expert_load [L, E]`` with :func:`model_loss_with_load`). With
    ``storage_dtype`` the forward uses :func:`storage_rounded` parameters."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch):
        def loss_of(params):
            return loss_fn(_merge(graphdef, storage_rounded(params, storage_dtype), frozen), batch)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": aux["tokens"]}
        if "expert_load" in aux:
            metrics["expert_load"] = aux["expert_load"]
        if schedule is not None:
            metrics["lr"] = schedule(jnp.maximum(_count(opt_state) - 1, 0))  # the rate this step used
        return trainable, opt_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn=model_loss, storage_dtype=None):
    """A jitted ``eval(trainable, frozen, batch) -> {"loss", "tokens"}``."""

    @jax.jit
    def evaluate(trainable, frozen, batch):
        loss, aux = loss_fn(_merge(graphdef, storage_rounded(trainable, storage_dtype), frozen), batch)
        return {"loss": loss, "tokens": aux["tokens"]}

    return evaluate


def _merge(graphdef: nnx.GraphDef, params, frozen) -> nnx.Module:
    """The model of ``params`` and ``frozen``: one ``nnx.State``, or a tuple of them (the trainer passes the
    router's correction biases apart when it updates them)."""
    return nnx.merge(graphdef, params, *(frozen if isinstance(frozen, tuple) else (frozen,)))


def _count(opt_state: Any) -> jax.Array:
    """The optimizer's step count (the schedule's argument), found in the optax state."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(leaf, optax.ScaleByAdamState):
            return leaf.count
    return jnp.zeros((), jnp.int32)
