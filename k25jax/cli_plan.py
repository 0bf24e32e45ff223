"""``k25jax plan``: per-device memory of a sharded model for inference or training, and whether it fits."""

from __future__ import annotations

import argparse
import os


def _config(model: str):
    from k25jax import from_release_config, preset

    if os.path.isdir(model) or model.endswith(".json"):
        return from_release_config(model)
    try:
        return preset(model)
    except Exception as e:  # an unknown preset name: say what is accepted
        raise SystemExit(f"k25jax plan: --model {model!r}: not a release directory or config.json ({e})") from None


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (no device is used: the model and cache are abstract, the mesh too)."""
    import jax.numpy as jnp

    from k25jax.plan import plan
    from k25jax.sharding import ShardingError, parse_mesh

    dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    try:
        p = plan(
            _config(args.model),
            parse_mesh(args.mesh),
            batch=args.batch,
            context=args.context,
            train=args.train,
            device=args.device,
            dtype=dtypes[args.dtype],
            cache_dtype=dtypes[args.cache_dtype],
            prefill_chunk=args.prefill_chunk,
        )
    except (ShardingError, ValueError) as e:
        raise SystemExit(f"k25jax plan: {e}") from None
    print(p.report())
    return 0


def register_plan(sub) -> None:
    from k25jax.plan import DEVICES

    p = sub.add_parser("plan", help="per-device memory of a sharded model (parameters, cache, activations, ...)")
    p.add_argument("--model", default="k25", help="preset (k25, k26, tiny) or a release directory / config.json")
    p.add_argument("--mesh", default="expert=8", help="mesh sizes, e.g. expert=8,tensor=4 (unnamed axes are 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (global)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence (cache length / train length)")
    p.add_argument("--train", action="store_true", help="training: train rules (FSDP), gradients, AdamW state")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES), help="accelerator (memory per device)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter/compute dtype")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk length (generation's default)")
    p.set_defaults(func=cmd_plan)
