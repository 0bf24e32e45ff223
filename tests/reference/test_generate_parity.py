"""Greedy generation with the latent cache against transformers' greedy ``generate`` (the oracle).

The checkpoint is a tiny release-format directory written from a random ``Kimi_K25ForConditionalGeneration``
(text path; routed experts INT4-packed). Stop tokens are disabled on both sides so every run yields all tokens.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k25jax import load_model
from k25jax.generate import generate

import configs
import oracle

pytestmark = pytest.mark.reference

NEW_TOKENS = 32


def _hf_greedy(hf, prompt, new_tokens):
    out = hf.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = configs.grouped()
    hf = oracle.make_hf_kimi_model(cfg, seed=2)
    hf.generation_config.eos_token_id = None
    text_only = dataclasses.replace(cfg, vision=None)
    path = oracle.write_release(oracle.text_param_tree(hf, cfg), text_only, tmp_path / "release", num_shards=2)
    model = load_model(path, compute_dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 1024, n).tolist() for n in (11, 4, 23)]
    expected = [_hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    # All three prompts in one batch (different lengths), and the first one alone.
    ours = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    alone = generate(model, prompts[:1], max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    for b in range(len(prompts)):
        assert len(expected[b]) == NEW_TOKENS
        assert ours[b] == expected[b], f"prompt {b}: first mismatch at {_first_diff(ours[b], expected[b])}"
    assert alone[0] == expected[0]


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
