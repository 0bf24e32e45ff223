"""The whole K2.5 model: the text stack, plus the vision tower and projector when configured, and builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.config import K25Config, RunConfig
from k25jax.moe import Experts
from k25jax.quant import GROUP
from k25jax.text import TextModel
from k25jax.vision.merger import Projector
from k25jax.vision.moonvit import MoonViT


class K25(nnx.Module):
    """Kimi K2.5. ``model(input_ids)`` returns float32 logits ``[B, T, V]``.

    With images or video chunks: ``model(input_ids, pixel_values=..., grid_thw=...)``, where ``input_ids``
    holds, for every media item in order, ``(h/2)*(w/2)`` ``<|media_pad|>`` tokens
    (``k25jax.vision.expand_media_pads``) whose embeddings are replaced by the projector outputs.

    ``run`` (:class:`~k25jax.config.RunConfig`) says how it runs: compute and parameter dtypes, the INT4 kernels
    (``"xla"`` dequantize-then-dot, ``"pallas"`` the Pallas kernels, interpreted on CPU), the routed-expert
    strategy, remat, cache dtype and sharding rules. It is static model structure; see :meth:`set_run`.
    """

    def __init__(self, cfg: K25Config, run: RunConfig | None = None, *, rngs: nnx.Rngs):
        run = run or RunConfig()
        self.cfg = cfg
        self.run = run
        self.text = TextModel(cfg.text, run, rngs=rngs)
        v = cfg.vision
        dt, pdt = run.compute, run.params
        self.vision = None if v is None else MoonViT(v, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.projector = None if v is None else Projector(v, dtype=dt, param_dtype=pdt, rngs=rngs)
        if cfg.quantization is not None:  # the release's experts are INT4: so are ours, from here to the matmul
            if cfg.quantization.group_size != GROUP:
                raise ValueError(
                    f"quantization_config group_size {cfg.quantization.group_size}: INT4 experts on device "
                    f"support group_size {GROUP} (the released models' value) only"
                )
            for module in [m for _, m in nnx.iter_modules(self) if isinstance(m, Experts)]:
                module.to_int4()

    @property
    def dtype(self):
        """The compute dtype (``run.compute_dtype``)."""
        return self.run.compute

    def set_run(self, run: RunConfig | None = None, **changes) -> K25:
        """Change how the model runs from here on: ``model.set_run(kernels="pallas")`` or ``set_run(run)``.

        The run config is static model structure (part of the nnx graph definition, held by every module that
        reads it), so after this **every jitted function that takes the model retraces and recompiles in full** on
        its next call (not only the expert op), and a function that closed over the model keeps what it traced.
        The parameter dtype cannot change here (it is how the arrays are stored: rebuild or reload the model).
        """
        new = (run or self.run).replace(**changes)
        if new.params != self.run.params:
            raise ValueError(
                f"set_run: param_dtype {self.run.params} -> {new.params} would not convert the stored parameters; "
                "load or build the model with the new RunConfig instead"
            )
        for _, module in nnx.iter_modules(self):
            if isinstance(getattr(module, "run", None), RunConfig):
                module.run = new
        return self

    def vision_features(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        """Projector outputs ``[M, D]`` (compute dtype) for packed media items, in item order.

        Args:
          pixel_values: ``[P, 3, 14, 14]`` normalised patches (``k25jax.vision.preprocess_image`` /
            ``preprocess_video`` layout), items concatenated in the order they appear in the text.
          grid_thw: ``[num_items, 3]`` rows ``(t, h, w)``, host data (numpy / list / tuple).
        """
        if self.vision is None:
            raise ValueError(f"model {self.cfg.name!r} has no vision tower (its config has no vision_config)")
        return self.projector(self.vision(jnp.asarray(pixel_values), grid_thw, remat=self.run.remat))

    def embed_with_layout(self, input_ids: jax.Array, media_index: jax.Array, layout: dict) -> jax.Array:
        """Token embeddings ``[B, T, D]`` with media features at the positions where ``media_index [B, T] >= 0``
        (the merged token each takes), the media laid out by :func:`k25jax.vision.moonvit.layout_arrays`: the
        training path, whose shapes do not depend on the media (``embed_inputs`` computes the same up to
        rounding)."""
        if self.vision is None:
            raise ValueError(f"model {self.cfg.name!r} has no vision tower (its config has no vision_config)")
        embeds = self.text.embed(input_ids)
        merged = self.vision.merge_layout(self.vision.encode_layout(layout, remat=self.run.remat), layout)
        features = self.projector(merged).astype(embeds.dtype)
        picked = jnp.take(features, jnp.maximum(media_index, 0), axis=0)
        return jnp.where((media_index >= 0)[..., None], picked, embeds)

    def embed_inputs(self, input_ids: jax.Array, pixel_values=None, grid_thw=None) -> jax.Array:
        """Token embeddings ``[B, T, D]`` with the ``<|media_pad|>`` positions replaced by vision features.

        The placeholders are filled in row-major order (batch row, then position) with the features of the
        items in ``grid_thw`` order. Without ``pixel_values`` this is the plain embedding lookup. When
        ``input_ids`` is concrete, a placeholder count that differs from the feature count raises ValueError.
        """
        embeds = self.text.embed(input_ids)
        if pixel_values is None:
            if grid_thw is not None:
                raise ValueError("grid_thw was given without pixel_values")
            return embeds
        if grid_thw is None:
            raise ValueError("pixel_values needs grid_thw ([num_items, 3] rows (t, h, w))")
        features = self.vision_features(pixel_values, grid_thw)
        return merge_media(embeds, input_ids, features, self.cfg.media_placeholder_token_id)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        grid_thw=None,
    ) -> jax.Array:
        """float32 logits ``[B, T, V]``; see :meth:`embed_inputs` for ``pixel_values`` / ``grid_thw``."""
        if pixel_values is None and grid_thw is None:
            return self.text(input_ids, positions=positions, attention_mask=attention_mask)
        embeds = self.embed_inputs(input_ids, pixel_values, grid_thw)
        return self.text(input_ids, positions=positions, inputs_embeds=embeds, attention_mask=attention_mask)


def merge_media(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, placeholder_id: int) -> jax.Array:
    """Replace the embeddings at ``placeholder_id`` positions, in row-major order, by ``features [M, D]``.

    ``embeds [B, T, D]``, ``input_ids [B, T]``. Raises ValueError when ``input_ids`` is concrete and holds a
    number of placeholders other than ``M`` (under tracing the count cannot be checked: the caller must).
    """
    is_pad = input_ids == placeholder_id
    if not isinstance(input_ids, jax.core.Tracer):
        count = int(np.sum(np.asarray(is_pad)))
        if count != features.shape[0]:
            raise ValueError(
                f"input_ids hold {count} <|media_pad|> placeholder tokens (id {placeholder_id}) but the media items "
                f"give {features.shape[0]} vision features; expand each item's placeholder to (h/2)*(w/2) tokens "
                "with k25jax.vision.expand_media_pads"
            )
    flat = is_pad.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features.astype(embeds.dtype), index, axis=0).reshape(embeds.shape)
    return jnp.where(is_pad[..., None], gathered, embeds)


def build_model(cfg: K25Config, run: RunConfig | None = None, *, seed: int = 0) -> K25:
    """A randomly initialised model (normal(0, 0.02) matrices, unit norms; INT4 experts quantize that init)."""
    return K25(cfg, run, rngs=nnx.Rngs(seed))


def abstract_model(cfg: K25Config, run: RunConfig | None = None) -> K25:
    """The model with ``jax.ShapeDtypeStruct`` leaves: no memory, seconds even at full size."""
    return nnx.eval_shape(lambda: K25(cfg, run, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
    """Number of parameter elements (an INT4 weight counts its unpacked elements)."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "logical_size")):
        logical = getattr(leaf, "logical_size", None)  # INT4 words count 8 each, their scales 0
        total += int(_size(leaf) if logical is None else logical)
    return total


def _size(x) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n
