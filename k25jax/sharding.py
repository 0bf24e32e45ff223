"""The logical-axis vocabulary: every parameter and constrained activation names its dims with these.

This is the only file that names mesh axes. Model code speaks logical names (``"embed"``, ``"experts"``,
...); a rules table per strategy maps them to mesh axes.
"""

from __future__ import annotations

# Logical axes of parameters. Each parameter's metadata ``out_sharding`` is a tuple of these (or None for
# a dim that is never sharded).
PARAM_AXES = {
    "layers": "stacked layer index of a scanned stack",
    "vocab": "vocabulary (embedding rows, lm_head columns)",
    "embed": "model width D",
    "q_lora": "query latent Q (q_lora_rank)",
    "kv_lora": "key/value latent C (kv_lora_rank), also C + R for kv_a_proj",
    "heads": "attention heads H",
    "head_dim": "per-head width (qk nope/rope, v)",
    "mlp": "dense / shared-expert SwiGLU width F",
    "experts": "routed experts E",
    "expert_mlp": "routed-expert SwiGLU width F",
    "expert_embed": "model width D as seen by routed experts",
    "router": "router output (all experts; never sharded)",
    "norm": "a norm's scale vector (replicated)",
    "quant_groups": "INT4 group index along a quantized input dim",
    "vision_embed": "vision tower width",
    "vision_mlp": "vision MLP width",
    "vision_heads": "vision attention heads",
    "conv": "convolution kernel dims (replicated)",
}

# Logical axes of activations, for sharding constraints.
ACTIVATION_AXES = {
    "batch": "batch B",
    "seq": "query positions T",
    "kv_seq": "key positions S / cache length",
    "act_embed": "activation width D",
    "act_heads": "activation heads H",
    "act_vocab": "logits vocabulary",
    "tokens": "flattened tokens (B*T, or B*T*k after routing)",
    "kv_latent": "latent KV cache width C + R ([normed c_kv | roped k_pe] per cached token)",
}

# Logical axes of the latent KV cache ``[L, B, S, C + R]`` (k25jax/cache.py), stacked per layer stack like
# the parameters.
CACHE_AXES = ("layers", "batch", "kv_seq", "kv_latent")

LOGICAL_AXES = {**PARAM_AXES, **ACTIVATION_AXES}


def check_axes(axes: tuple[str | None, ...], shape: tuple[int, ...], what: str) -> None:
    """Raise if ``axes`` does not name one known logical axis (or None) per dim of ``shape``."""
    if len(axes) != len(shape):
        raise ValueError(f"{what}: {len(axes)} logical axes {axes} for a rank-{len(shape)} shape {shape}")
    for a in axes:
        if a is not None and a not in LOGICAL_AXES:
            raise ValueError(f"{what}: unknown logical axis {a!r}; known: {sorted(LOGICAL_AXES)}")
