"""Tiny test configurations that together cover the routing, rope and shape cases the parity tests need."""

from __future__ import annotations

import dataclasses

from k25jax.config import K25Config, TextConfig, YarnRope, tiny


def text_variant(base: K25Config, **changes) -> K25Config:
    return dataclasses.replace(base, text=dataclasses.replace(base.text, **changes)).validate()


def grouped() -> K25Config:
    """n_group 2 / topk_group 1, one dense layer, YaRN (original context 64), v_head_dim != qk_nope_head_dim."""
    return tiny()


def deep_dense() -> K25Config:
    """first_k_dense_replace 2, n_group 4 / topk_group 2, 3 experts per token, YaRN past a 16-token original."""
    return text_variant(
        tiny(),
        num_hidden_layers=4,
        first_k_dense_replace=2,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        v_head_dim=16,
        qk_nope_head_dim=8,
        rope_scaling=YarnRope(
            factor=8.0,
            original_max_position_embeddings=16,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=128,
    )


def k25_like() -> K25Config:
    """The K2.5 routing (n_group 1), mscale 0.707 (rope multiplier != 1), two shared experts."""
    return text_variant(
        tiny(),
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
        num_experts_per_tok=2,
        routed_scaling_factor=1.5,
        rope_scaling=YarnRope(
            factor=32.0,
            original_max_position_embeddings=32,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.707,
            mscale_all_dim=1.0,
        ),
    )


def no_q_lora() -> K25Config:
    """q_lora_rank null (direct q_proj), plain rope (no YaRN)."""
    return text_variant(tiny(), q_lora_rank=None, rope_scaling=None, rope_theta=10000.0)


ALL = {"grouped": grouped, "deep_dense": deep_dense, "k25_like": k25_like, "no_q_lora": no_q_lora}

__all__ = ["ALL", "TextConfig", "text_variant"]
