"""The benchmarks' model: a small K2.5-architecture model (vision tower, Kimi layout, INT4 experts on the kimi
grid) written as a release directory, then loaded from it by k25jax and by transformers as users load it.

Shared by ``generate_bench.py`` and ``engine_bench.py``. Import jax only after the thread flags are set
(``cpu_threads.threads_from_argv``); this module imports jax / torch inside its functions.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, "tests"), ROOT):  # this checkout's k25jax and convert/, and the test oracle
    if _p not in sys.path:
        sys.path.insert(0, _p)


def small_config():
    """``tiny()`` widened (still CPU-sized): D 256, 6 layers, 8 heads, 32 experts top-4, vision tower kept (its
    projector now maps to D 256), Kimi layout."""
    from k25jax.config import tiny

    base = tiny()
    text = dataclasses.replace(
        base.text,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,  # = YaRN factor 16 x original 64, as in tiny()
    )
    vision = dataclasses.replace(base.vision, text_hidden_size=text.hidden_size)
    return dataclasses.replace(base, text=text, vision=vision, name="small").validate()


def config(name: str):
    """``small`` (default) or ``tiny`` (``k25jax.config.tiny()`` as it is)."""
    from k25jax.config import tiny

    cfg = small_config() if name == "small" else tiny().validate()
    assert cfg.layout == "kimi_k25" and cfg.vision is not None
    assert cfg.vision.text_hidden_size == cfg.text.hidden_size  # the projector feeds the text model
    return cfg


def describe(cfg) -> str:
    t, v = cfg.text, cfg.vision
    return (
        f"{cfg.name}: D {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads, "
        f"{t.n_routed_experts} experts top-{t.num_experts_per_tok} (INT4, kimi grid), vocab {t.vocab_size}, "
        f"vision tower {v.num_hidden_layers} layers D {v.hidden_size} -> projector D {v.text_hidden_size}"
    )


def write_release(name: str, out_dir: str, seed: int = 0) -> float:
    """Build the model, put its routed experts on the kimi INT4 grid, export it to ``out_dir``; seconds taken."""
    import k25jax
    from convert.to_release import export_model
    from k25jax.config import RunConfig
    from k25jax.train.qat import quantize_experts

    start = time.perf_counter()
    model = k25jax.build_model(config(name), RunConfig(compute_dtype="float32"), seed=seed)
    quantize_experts(model, "kimi")
    # transformers' Kimi_K25Model looks up id 0 for <|media_pad|> ids in a text-only forward (it zeroes
    # multimodal ids first); k25jax looks up the pad's own row. A random model does emit the pad id now and
    # then, so give that row the values of row 0: both sides then embed a generated pad alike.
    pad = model.cfg.media_placeholder_token_id
    table = model.text.embed_tokens
    table.value = table.value.at[pad].set(table.value[0])
    export_model(model, out_dir, progress=False)
    return time.perf_counter() - start


def load_k25jax(out_dir: str):
    """``k25jax.load_model`` as users call it, float32 compute (so tokens compare with transformers float32)."""
    import k25jax
    from k25jax.config import RunConfig

    return k25jax.load_model(out_dir, RunConfig(compute_dtype="float32"), progress=False)


def load_transformers(out_dir: str):
    """The same release in transformers: ``Kimi_K25ForConditionalGeneration``, float32, eager attention, EOS off."""
    import oracle

    hf = oracle.hf_model_from_release(out_dir)
    hf.generation_config.eos_token_id = None
    return hf
