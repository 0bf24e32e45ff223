"""``k25jax plan``: per-device memory of a sharded model for inference or training, and whether it fits."""

from __future__ import annotations

import argparse
import dataclasses
import os


def _config(model: str):
    from k25jax import from_release_config, preset
    from k25jax.demo.shipped import DEMO, RANDOM, resolve

    if model == RANDOM:
        return preset("tiny")
    if model == DEMO:
        try:
            return from_release_config(resolve(model))
        except FileNotFoundError as err:
            raise SystemExit(f"k25jax plan: {err}") from None
    if os.path.isdir(model) or model.endswith(".json"):
        return from_release_config(model)
    try:
        return preset(model)
    except Exception as e:  # an unknown preset name: say what is accepted
        raise SystemExit(f"k25jax plan: --model {model!r}: not a release directory or config.json ({e})") from None


def _layers(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected A:B (MoE layers A <= i < B), got {text!r}")
    return int(a), int(b)


def _block(text: str) -> int | str | None:
    """``--attention-block``: a positive number of tokens, ``plain`` (the plain forms) or ``auto``."""
    if text in ("auto", "plain"):
        return None if text == "plain" else text
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, 'plain' or 'auto', got {text!r}")
    return int(text)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (no device is used: the model and cache are abstract, the mesh too)."""
    import jax.numpy as jnp

    from k25jax.plan import TrainSetup, plan
    from k25jax.sharding import ShardingError, parse_mesh

    dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    qat = None
    if args.train:
        fields = {
            "trainable": "trainable",
            "train_layers": "train_layers",
            "master_dtype": "master_dtype",
            "state_dtype": "optimizer_state_dtype",
            "scales": "qat_scales",
            "accumulate": "accumulate",
            "remat": "remat",
            "attention_block": "attention_block",
        }  # TrainSetup field: flag
        qat = TrainSetup(**{field: getattr(args, flag) for field, flag in fields.items()})
        if qat.attention_block == "auto":  # training: plain unless a block is given
            qat = dataclasses.replace(qat, attention_block=None)
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
            qat=qat,
            **({} if args.train else {"attention_block": args.attention_block}),
        )
    except (ShardingError, ValueError) as e:
        raise SystemExit(f"k25jax plan: {e}") from None
    print(p.report())
    return 0


def register_plan(sub) -> None:
    from k25jax.config import REMAT_POLICIES
    from k25jax.plan import DEVICES, LONG_CONTEXT, LONG_CONTEXT_BLOCK
    from k25jax.train.fakequant import SCALE_MODES

    p = sub.add_parser("plan", help="per-device memory of a sharded model (parameters, cache, activations, ...)")
    p.add_argument(
        "--model",
        default="k25",
        help="preset (k25, k26), tiny (demo release), tiny-random, a release directory or config.json",
    )
    p.add_argument("--mesh", default="expert=8", help="mesh sizes, e.g. expert=8,tensor=4 (unnamed axes are 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (global)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence (cache length / train length)")
    p.add_argument(
        "--train",
        action="store_true",
        help="INT4 QAT training (train rules: FSDP): fake-quant masters, frozen INT4 experts, gradients, AdamW state",
    )
    p.add_argument("--device", default="h200", choices=sorted(DEVICES), help="accelerator (memory per device)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter/compute dtype")
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk length (generation's default)")
    p.add_argument(
        "--attention-block",
        type=_block,
        default="auto",
        metavar="N|plain|auto",
        help="RunConfig.attention_block the plan assumes: blockwise attention with N-token blocks, or the plain forms "
        f"(whole scores). auto (default): inference plans block {LONG_CONTEXT_BLOCK} for contexts over {LONG_CONTEXT}, "
        "plain otherwise; training plans plain",
    )
    t = p.add_argument_group("training (--train)")
    t.add_argument(
        "--trainable",
        default=r"^text/",
        help="trainable_filter regex (k25jax finetune --trainable); experts whose .../master path it matches are "
        "fake-quant masters, the others stay INT4 (default: ^text/, every text parameter and expert)",
    )
    t.add_argument(
        "--train-layers",
        type=_layers,
        default=None,
        metavar="A:B",
        help="only MoE layers A <= i < B have trainable experts, the others stay INT4 (k25jax finetune --train-layers)",
    )
    t.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"], help="fake-quant masters")
    t.add_argument(
        "--optimizer-state-dtype", default="float32", choices=["float32", "bfloat16"], help="AdamW m (v: param dtype)"
    )
    t.add_argument("--qat-scales", default="dynamic", choices=list(SCALE_MODES), help="fake-quant scale mode")
    t.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (MultiSteps buffer)")
    t.add_argument("--remat", default="full", choices=list(REMAT_POLICIES), help="RunConfig.remat (default full)")
    p.set_defaults(func=cmd_plan)
