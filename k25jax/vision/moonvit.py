"""MoonViT-3D: the K2.5 vision encoder (architecture doc section 3).

Media items (images, and 4-frame video chunks) are packed along one patch axis ``P`` in the reference
processor's layout: ``pixel_values [P, 3, 14, 14]`` with ``grid_thw`` rows ``(t, h, w)`` (h, w in patches),
patches of an item ordered frames outermost, then rows, then columns. The encoder:

1. patch embed (a 14x14 stride-14 conv written as one contraction over ``3*14*14`` pixels);
2. adds the learned ``[64, 64, D]`` position table, resampled with torch-style bicubic when the item's grid
   differs from it, plus a fixed sin/cos time embedding over the frame index for items with ``t > 1``;
3. runs the pre-LN blocks (stacked on a ``layers`` axis, one ``jax.lax.scan``) with 2-D rope over the whole
   head dim and attention restricted to each item;
4. final LayerNorm, then 2x2 merge with the temporal mean: ``[sum_i h_i/2 * w_i/2, 4, D]``.

``grid_thw`` decides every shape, so it is host data (a tuple, list or numpy array), never traced.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.config import VisionConfig
from k25jax.layers import LayerNorm, normal_init, param, zeros_init
from k25jax.rope import apply_rope_interleaved
from k25jax.text import scan_layers, stacked
from k25jax.vision.attention import DEFAULT_BLOCK, segment_attention

Grid = tuple[tuple[int, int, int], ...]

BICUBIC_A = -0.75  # torch's Keys kernel parameter for mode="bicubic"
TIME_EMBED_BASE = 10000.0


# --------------------------------------------------------------------------------------------------------
# Host-side geometry (static: depends on grid_thw only)
# --------------------------------------------------------------------------------------------------------


def as_grid(grid_thw, cfg: VisionConfig | None = None) -> Grid:
    """``grid_thw`` (numpy / list / concrete array, ``[num_items, 3]``) -> a hashable tuple of ``(t, h, w)``.

    With ``cfg``, checks that each item can be merged 2x2 and that ``t`` is within the time embedding.
    """
    if isinstance(grid_thw, jax.core.Tracer):
        raise ValueError(
            "grid_thw must be concrete host values (numpy array, list or tuple), not a traced array: every "
            "vision shape depends on it. Under jit, pass it as a static argument (k25jax.vision.as_grid gives "
            "a hashable tuple)."
        )
    rows = np.asarray(grid_thw)
    if rows.ndim != 2 or rows.shape[1] != 3 or rows.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [num_items, 3] with rows (t, h, w), got shape {list(rows.shape)}")
    if not np.issubdtype(rows.dtype, np.integer):
        if not np.all(rows == np.round(rows)):
            raise ValueError(f"grid_thw must hold integers, got {rows.tolist()}")
        rows = rows.astype(np.int64)
    grid = tuple((int(t), int(h), int(w)) for t, h, w in rows)
    for i, (t, h, w) in enumerate(grid):
        if min(t, h, w) <= 0:
            raise ValueError(f"grid_thw row {i} is {[t, h, w]}: t, h and w must be positive")
        if cfg is None:
            continue
        kh, kw = cfg.merge_kernel_size
        if h % kh or w % kw:
            raise ValueError(
                f"grid_thw row {i} is {[t, h, w]}: h and w (in patches) must be multiples of the merge kernel "
                f"{kh}x{kw}; the preprocessor pads images to multiples of {kh * cfg.patch_size} pixels"
            )
        if t > cfg.pos_emb_time:
            raise ValueError(
                f"grid_thw row {i} is {[t, h, w]}: t = {t} frames exceeds the vision time embedding "
                f"(vision_config.init_pos_emb_time = {cfg.pos_emb_time}); split videos into chunks of at most "
                f"{cfg.pos_emb_time} frames"
            )
    return grid


def num_patches(grid: Grid) -> int:
    return sum(t * h * w for t, h, w in grid)


def num_merged_tokens(grid: Grid, merge: Sequence[int] = (2, 2)) -> list[int]:
    """Tokens each item contributes to the text after the 2x2 merge (the temporal axis is averaged away)."""
    return [(h // merge[0]) * (w // merge[1]) for _, h, w in grid]


@functools.lru_cache(maxsize=256)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out, in]`` float32 weights of torch's 1-D bicubic resampling (``F.interpolate`` semantics).

    ``align_corners=False`` (half-pixel centres, source ``(i + 0.5) * in / out - 0.5``), Keys kernel with
    ``a = -0.75``, taps ``floor - 1 .. floor + 2`` clamped to the border, no antialias. The 2-D resample is
    separable: ``M_h @ table @ M_w^T``. (``jax.image.resize`` uses a = -0.5 and antialiases when shrinking.)
    """
    a = BICUBIC_A
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    frac = src - base
    weights = np.zeros((out_size, in_size), np.float64)
    for offset in (-1, 0, 1, 2):
        d = np.abs(frac - offset)
        near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
        tap = np.clip(base.astype(np.int64) + offset, 0, in_size - 1)
        np.add.at(weights, (np.arange(out_size), tap), np.where(d <= 1, near, far))
    return weights.astype(np.float32)


def resample_position_table(table: jax.Array, h: int, w: int) -> jax.Array:
    """The learned table ``[Ph, Pw, D]`` at grid ``(h, w)``: itself when equal, else bicubic. float32 ``[h, w, D]``."""
    table = table.astype(jnp.float32)
    if (h, w) == table.shape[:2]:
        return table
    mh = jnp.asarray(bicubic_matrix(h, table.shape[0]))
    mw = jnp.asarray(bicubic_matrix(w, table.shape[1]))
    return jnp.einsum(
        "hp,pqd,wq->hwd", mh, table, mw, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def time_embedding(frames: int, dim: int) -> jax.Array:
    """``[frames, dim]`` float32: ``[sin(f w_i) | cos(f w_i)]``, ``w_i = 10000^(-2i/dim)``, frame index f."""
    return time_embedding_at(jnp.arange(frames, dtype=jnp.int32), dim)


def time_embedding_at(frame: jax.Array, dim: int) -> jax.Array:
    """:func:`time_embedding` rows of the frame indices ``frame [N]``: ``[N, dim]`` float32."""
    inv_freq = 1.0 / (TIME_EMBED_BASE ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = frame.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def patch_rows_cols(grid: Grid) -> tuple[jax.Array, jax.Array]:
    """Row and column (in patches) of every packed patch, ``[P]`` int32 each (built on device, no constants)."""
    rows, cols = [], []
    for t, h, w in grid:
        within = jnp.arange(t * h * w, dtype=jnp.int32) % (h * w)
        rows.append(within // w)
        cols.append(within % w)
    return jnp.concatenate(rows), jnp.concatenate(cols)


def segment_ids(grid: Grid) -> jax.Array:
    """``[P]`` int32: the item index of every packed patch."""
    return jnp.concatenate([jnp.full((t * h * w,), i, jnp.int32) for i, (t, h, w) in enumerate(grid)])


def vision_rope(grid: Grid, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[P, head_dim/2]`` (float32) of the 2-D rope, for interleaved pairs over the whole head dim.

    Pair ``2k`` rotates by ``col * theta^(-4k/head_dim)`` and pair ``2k+1`` by ``row * theta^(-4k/head_dim)``
    (k < head_dim/4): the release's ``wqkv`` q/k rows are in this interleaved order, so they load unpermuted.
    """
    rows, cols = patch_rows_cols(grid)
    return rope_at(rows, cols, head_dim, theta)


def rope_at(rows: jax.Array, cols: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """:func:`vision_rope` of patches at ``rows``, ``cols`` (``[P]`` int, in patches)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / np.float32(2 * quarter)))
    inv_freq = jnp.asarray(inv_freq.astype(np.float32))
    col_angles = cols.astype(jnp.float32)[:, None] * inv_freq  # [P, quarter]
    row_angles = rows.astype(jnp.float32)[:, None] * inv_freq
    angles = jnp.stack([col_angles, row_angles], axis=-1).reshape(-1, 2 * quarter)  # pairs (col k, row k), ...
    return jnp.cos(angles), jnp.sin(angles)


LAYOUT_KEYS = (
    "vision_pixel_values",
    "vision_rows",
    "vision_cols",
    "vision_frames",
    "vision_has_time",
    "vision_segments",
    "vision_pos_weights",
    "vision_merge_index",
    "vision_merge_weight",
)


def _capacity(n: int, floor: int) -> int:
    """The next power of two >= ``max(n, floor)``: a handful of shapes, so a jitted step compiles a few times."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


PAD_SEGMENT = 16  # padding patches per padding segment in layout_arrays


def layout_arrays(
    items: Sequence[tuple[np.ndarray, Sequence[int]]],
    cfg: VisionConfig,
    *,
    patch_capacity: int | None = None,
    token_capacity: int | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays that let :meth:`MoonViT.encode_layout` / :meth:`MoonViT.merge_layout` run a list of media items
    with traced, fixed-capacity shapes (what a jitted train step needs: ``grid_thw`` decides every shape of
    :meth:`MoonViT.__call__`, so each distinct item list would compile it again).

    ``items``: ``(pixel_values [t*h*w, 3, ps, ps], (t, h, w))`` per item, in the order their merged tokens fill
    the text. Patches are packed as :meth:`MoonViT.__call__` packs them and padded to ``patch_capacity``
    (default: the next power of two, at least 16); merged tokens to ``token_capacity`` (at least 4). Padding
    patches form segments of their own (:data:`PAD_SEGMENT` patches each); padding tokens average nothing
    (weight 0). Keys: :data:`LAYOUT_KEYS`.
    """
    ps = cfg.patch_size
    kh, kw = cfg.merge_kernel_size
    grid = as_grid(np.asarray([g for _, g in items], np.int64).reshape(-1, 3), cfg) if items else ()
    patches = num_patches(grid)
    tokens = sum(num_merged_tokens(grid, (kh, kw)))
    P = _capacity(patches, 16) if patch_capacity is None else patch_capacity
    M = _capacity(tokens, 4) if token_capacity is None else token_capacity
    if patches > P or tokens > M:
        raise ValueError(f"{patches} patches / {tokens} merged tokens exceed the capacities {P} / {M}")
    T = cfg.pos_emb_time
    table = cfg.pos_emb_height * cfg.pos_emb_width
    out = {
        "vision_pixel_values": np.zeros((P, 3, ps, ps), np.float32),
        "vision_rows": np.zeros(P, np.int32),
        "vision_cols": np.zeros(P, np.int32),
        "vision_frames": np.zeros(P, np.int32),
        "vision_has_time": np.zeros(P, np.float32),
        "vision_segments": np.full(P, len(grid), np.int32),
        "vision_pos_weights": np.zeros((P, table), np.float32),
        "vision_merge_index": np.zeros((M, T, kh * kw), np.int32),
        "vision_merge_weight": np.zeros((M, T), np.float32),
    }
    start = token = 0
    for i, ((values, _), (t, h, w)) in enumerate(zip(items, grid, strict=True)):
        n = t * h * w
        values = np.asarray(values, np.float32)
        if values.shape != (n, 3, ps, ps):
            raise ValueError(f"media item {i}: pixel_values {list(values.shape)} do not match grid {[t, h, w]}")
        within = np.arange(n)
        span = slice(start, start + n)
        out["vision_pixel_values"][span] = values
        out["vision_rows"][span] = within % (h * w) // w
        out["vision_cols"][span] = within % w
        out["vision_frames"][span] = within // (h * w)
        out["vision_has_time"][span] = float(t > 1)
        out["vision_segments"][span] = i
        mh = bicubic_matrix(h, cfg.pos_emb_height) if h != cfg.pos_emb_height or w != cfg.pos_emb_width else None
        if mh is None:
            weights = np.eye(table, dtype=np.float32)  # the table itself, as resample_position_table keeps it
        else:
            mw = bicubic_matrix(w, cfg.pos_emb_width)
            weights = np.einsum("hp,wq->hwpq", mh, mw).reshape(h * w, table)
        out["vision_pos_weights"][span] = np.tile(weights, (t, 1))
        # merged token (r, c) of the item: sub-tokens (a, b) of every frame f, averaged over the t frames
        r, c, a, b = np.meshgrid(np.arange(h // kh), np.arange(w // kw), np.arange(kh), np.arange(kw), indexing="ij")
        in_frame = ((r * kh + a) * w + (c * kw + b)).reshape(-1, kh * kw)  # [h/kh * w/kw, kh*kw]
        m = in_frame.shape[0]
        for f in range(t):
            out["vision_merge_index"][token : token + m, f] = start + f * h * w + in_frame
            out["vision_merge_weight"][token : token + m, f] = 1.0 / t
        start += n
        token += m
    # Padding patches in segments of PAD_SEGMENT each (ids after the items'), so that a blockwise attention pairs
    # each padding block with itself only instead of all the padding with all of it.
    out["vision_segments"][start:] = len(grid) + np.arange(P - start) // PAD_SEGMENT
    return out


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class VisionBlock(nnx.Module):
    """``x += out(attn(norm0 x)); x += mlp_out(gelu_tanh(mlp_in(norm1 x)))``, biases throughout."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, H, K, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        self.dtype = dtype
        self.scale = K**-0.5
        self.attention_block = DEFAULT_BLOCK
        self.attn_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        # Fused q/k/v, [D, 3, H, K]; q and k head dims in interleaved rope order (as released).
        self.qkv_proj = param(
            rngs, (D, 3, H, K), ("vision_embed", None, "vision_heads", "head_dim"), param_dtype, what="wqkv"
        )
        self.qkv_bias = param(rngs, (3, H, K), (None, "vision_heads", "head_dim"), param_dtype, zeros_init, "wqkv.bias")
        self.out_proj = param(rngs, (H, K, D), ("vision_heads", "head_dim", "vision_embed"), param_dtype, what="wo")
        self.out_bias = param(rngs, (D,), ("vision_embed",), param_dtype, zeros_init, "wo.bias")
        self.mlp_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp_in = param(rngs, (D, F), ("vision_embed", "vision_mlp"), param_dtype, what="mlp.fc0")
        self.mlp_in_bias = param(rngs, (F,), ("vision_mlp",), param_dtype, zeros_init, "mlp.fc0.bias")
        self.mlp_out = param(rngs, (F, D), ("vision_mlp", "vision_embed"), param_dtype, what="mlp.fc1")
        self.mlp_out_bias = param(rngs, (D,), ("vision_embed",), param_dtype, zeros_init, "mlp.fc1.bias")

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        """``x [P, D]``; ``cos``/``sin [P, K/2]``; ``segments [P]`` item ids. Returns ``[P, D]``."""
        dt = self.dtype
        h = self.attn_norm(x).astype(dt)
        qkv = jnp.einsum("pd,dshk->pshk", h, self.qkv_proj[...].astype(dt)) + self.qkv_bias[...].astype(dt)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = apply_rope_interleaved(q, cos[:, None, :], sin[:, None, :])
        k = apply_rope_interleaved(k, cos[:, None, :], sin[:, None, :])
        o = segment_attention(q, k, v, segments, self.scale, self.attention_block)
        attn = jnp.einsum("phk,hkd->pd", o, self.out_proj[...].astype(dt)) + self.out_bias[...].astype(dt)
        x = x + attn.astype(x.dtype)
        h = self.mlp_norm(x).astype(dt)
        h = jnp.einsum("pd,df->pf", h, self.mlp_in[...].astype(dt)) + self.mlp_in_bias[...].astype(dt)
        h = jax.nn.gelu(h, approximate=True)
        h = jnp.einsum("pf,fd->pd", h, self.mlp_out[...].astype(dt)) + self.mlp_out_bias[...].astype(dt)
        return x + h.astype(x.dtype)


class MoonViT(nnx.Module):
    """The vision encoder. ``tower(pixel_values, grid_thw)`` -> merged patches ``[M, 4, D]``."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.cfg = cfg
        self.dtype = dtype
        D, ps = cfg.hidden_size, cfg.patch_size
        # Conv2d(3 -> D, kernel = stride = patch) on one patch is a contraction over (channel, row, col).
        self.patch_proj = param(
            rngs, (3, ps, ps, D), ("conv", "conv", "conv", "vision_embed"), param_dtype, what="patch_embed.proj"
        )
        self.patch_bias = param(rngs, (D,), ("vision_embed",), param_dtype, zeros_init, "patch_embed.proj.bias")
        self.pos_emb = param(
            rngs,
            (cfg.pos_emb_height, cfg.pos_emb_width, D),
            ("vision_pos", "vision_pos", "vision_embed"),
            param_dtype,
            normal_init(),
            "patch_embed.pos_emb",
        )
        self.blocks = stacked(
            lambda r: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.final_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def embed(self, pixel_values: jax.Array, grid: Grid) -> jax.Array:
        """Patch embedding plus position and time embeddings: ``[P, 3, ps, ps]`` -> ``[P, D]`` (compute dtype)."""
        dt = self.dtype
        x = jnp.einsum("pcij,cijd->pd", pixel_values.astype(dt), self.patch_proj[...].astype(dt))
        x = x + self.patch_bias[...].astype(dt)
        D = self.cfg.hidden_size
        positions = []
        for t, h, w in grid:
            pos = resample_position_table(self.pos_emb[...], h, w).reshape(1, h * w, D)
            if t > 1:  # images (and 1-frame chunks) get no time term
                pos = pos + time_embedding(t, D)[:, None, :]
            positions.append(jnp.broadcast_to(pos, (t, h * w, D)).reshape(t * h * w, D))
        return x + jnp.concatenate(positions).astype(dt)

    def encode(self, pixel_values: jax.Array, grid: Grid, *, remat: str = "none") -> jax.Array:
        """Embeddings, the blocks and the final LayerNorm: ``[P, D]``."""
        x = self.embed(pixel_values, grid)
        cos, sin = vision_rope(grid, self.cfg.head_dim, self.cfg.rope_theta)
        segments = segment_ids(grid)

        def step(block: VisionBlock, carry: jax.Array, _index) -> jax.Array:
            return block(carry, cos, sin, segments)

        x = scan_layers(self.blocks, x, step, remat=remat)
        return self.final_norm(x)

    def merge(self, x: jax.Array, grid: Grid) -> jax.Array:
        """2x2 merge with the temporal mean: ``[P, D]`` -> ``[M, kh*kw, D]``, sub-tokens row-major ``(kh, kw)``."""
        kh, kw = self.cfg.merge_kernel_size
        D = x.shape[-1]
        out, start = [], 0
        for t, h, w in grid:
            item = x[start : start + t * h * w].reshape(t, h // kh, kh, w // kw, kw, D)
            start += t * h * w
            pooled = jnp.mean(item.astype(jnp.float32), axis=0) if t > 1 else item[0]
            out.append(pooled.transpose(0, 2, 1, 3, 4).reshape((h // kh) * (w // kw), kh * kw, D).astype(x.dtype))
        return jnp.concatenate(out)

    def encode_layout(self, layout: dict, *, remat: str = "none") -> jax.Array:
        """:meth:`encode` of the items :func:`layout_arrays` laid out, with traced shapes: ``[P_cap, D]``.

        The same computation up to float rounding (the position table is resampled by one ``[P, Ph*Pw]``
        contraction instead of two separable ones); padding patches are computed and never read."""
        dt = self.dtype
        D = self.cfg.hidden_size
        x = jnp.einsum("pcij,cijd->pd", layout["vision_pixel_values"].astype(dt), self.patch_proj[...].astype(dt))
        x = x + self.patch_bias[...].astype(dt)
        table = self.pos_emb[...].astype(jnp.float32).reshape(-1, D)
        pos = jnp.einsum(
            "pq,qd->pd", layout["vision_pos_weights"], table, precision=jax.lax.Precision.HIGHEST
        ) + layout["vision_has_time"][:, None] * time_embedding_at(layout["vision_frames"], D)
        x = x + pos.astype(dt)
        cos, sin = rope_at(layout["vision_rows"], layout["vision_cols"], self.cfg.head_dim, self.cfg.rope_theta)
        segments = layout["vision_segments"]

        def step(block: VisionBlock, carry: jax.Array, _index) -> jax.Array:
            return block(carry, cos, sin, segments)

        x = scan_layers(self.blocks, x, step, remat=remat)
        return self.final_norm(x)

    def merge_layout(self, x: jax.Array, layout: dict) -> jax.Array:
        """:meth:`merge` for :meth:`encode_layout`'s output: ``[M_cap, kh*kw, D]`` (padding tokens are zeros)."""
        gathered = x[layout["vision_merge_index"]].astype(jnp.float32)  # [M, T, kh*kw, D]
        pooled = jnp.einsum("mtsd,mt->msd", gathered, layout["vision_merge_weight"])
        return pooled.astype(x.dtype)

    def __call__(self, pixel_values: jax.Array, grid_thw, *, remat: str = "none") -> jax.Array:
        """Encode packed media items.

        Args:
          pixel_values: ``[P, 3, ps, ps]`` normalised patches of all items, packed in item order.
          grid_thw: ``[num_items, 3]`` rows ``(t, h, w)`` (host data).
        Returns: ``[M, kh*kw, D]`` merged patches, ``M = sum_i (h_i/kh) * (w_i/kw)``, in the compute dtype.
        """
        grid = as_grid(grid_thw, self.cfg)
        ps = self.cfg.patch_size
        expected = (num_patches(grid), 3, ps, ps)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)} but grid_thw {[list(g) for g in grid]} needs "
                f"{list(expected)} (sum of t*h*w patches of 3x{ps}x{ps} pixels)"
            )
        return self.merge(self.encode(pixel_values, grid, remat=remat), grid)
