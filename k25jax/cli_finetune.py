"""``k25jax finetune``: INT4 QAT fine-tuning on chat data (:mod:`k25jax.train.trainer`)."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2

# flag -> FinetuneConfig field, for the flags that override a YAML config
FLAGS = {
    "model": str,
    "data": str,
    "out": str,
    "eval_data": str,
    "steps": int,
    "batch_size": int,
    "max_length": int,
    "lr": float,
    "warmup": int,
    "seed": int,
    "trainable": str,
    "train_layers": str,
    "lora_rank": int,
    "lora_alpha": float,
    "lora_experts": str,
    "lora_export": str,
    "router_bias_update": float,
    "qat": bool,
    "qat_grid": str,
    "qat_scales": str,
    "master_dtype": str,
    "overlong": str,
    "mesh": str,
    "export": str,
    "dtype": str,
    "kernels": str,
    "remat": str,
    "eval_every": int,
    "save_every": int,
}


def cmd_finetune(args: argparse.Namespace) -> int:
    from k25jax.train.data import DataError
    from k25jax.train.qat import QATError
    from k25jax.train.trainer import FinetuneConfig, TrainingError, finetune

    overrides = {name: getattr(args, name) for name in FLAGS}
    overrides["resume"] = True if args.resume else None
    try:
        if args.config:
            cfg = FinetuneConfig.from_yaml(args.config, **overrides)
        else:
            cfg = FinetuneConfig(**{k: v for k, v in overrides.items() if v is not None})
        summary = finetune(cfg)
    except (DataError, QATError, TrainingError, FileNotFoundError, ValueError) as err:
        print(f"k25jax finetune: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    last = summary.get("last", {})
    print(
        f"finetune: {summary['steps']} steps (from {summary['start_step']}), {summary['trainable']} trainable arrays"
        + (f", last loss {last['loss']:.4f}" if "loss" in last else "")
        + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
    )
    data = summary["data"]
    print(
        f"data: {data['samples']} samples, {data['tokens']} tokens ({data['assistant_tokens']} trained), "
        f"{data['dropped']} dropped and {data['truncated']} truncated as longer than --max-length"
    )
    if "lora" in summary:
        lora = summary["lora"]
        print(f"lora: {lora['adapter_params']} adapter parameters on {len(lora['targets'])} expert weights")
    print(f"checkpoints: {summary['checkpoints']}")
    if "export" in summary:
        print(f"export: {summary['export']}")
    return 0


def register_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="INT4 QAT fine-tuning on chat data (JSONL / parquet / datasets directory)")
    p.add_argument("--config", default=None, help="a YAML of settings (configs/qat/*.yaml); flags override it")
    p.add_argument(
        "--model",
        default=None,
        help="release directory, k25jax checkpoint, 'tiny' (demo release, default), 'tiny-random'",
    )
    p.add_argument("--data", default=None, help="training samples: {'messages': [...], 'tools': [...]} per line")
    p.add_argument("--out", default=None, help="run directory: checkpoints/, metrics.jsonl, tensorboard/")
    p.add_argument("--eval-data", default=None, help="held-out samples; eval loss every --eval-every steps")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (--resume continues up to this)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--trainable", default=None, help="regex over parameter paths (default '^text/')")
    p.add_argument(
        "--lora-rank", type=int, default=None, help="> 0: train only LoRA adapters of this rank on the INT4 experts"
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--lora-experts", default=None, help="regex over routed-expert weight paths to adapt (default all)")
    p.add_argument(
        "--lora-export",
        choices=["adapters", "merge"],
        default=None,
        help="--export of a LoRA run: the adapters beside the untouched release (default), or merged and re-quantized",
    )
    p.add_argument(
        "--router-bias-update",
        type=float,
        default=None,
        help="aux-loss-free balancing rate u: bias += u * sign(mean load - load) per step (default 0: bias frozen)",
    )
    p.add_argument(
        "--no-qat",
        dest="qat",
        action="store_const",
        const=False,
        default=None,
        help="train the chosen routed experts as float weights and quantize them on --qat-grid at export "
        "(post-training quantization: the baseline QAT is measured against)",
    )
    p.add_argument(
        "--train-layers",
        default=None,
        metavar="A:B",
        help="QAT the routed experts of MoE layers A <= i < B only; the other layers' experts stay INT4-packed "
        "(default: every layer)",
    )
    p.add_argument("--qat-grid", choices=["kimi", "compressed-tensors"], default=None)
    p.add_argument("--qat-scales", choices=["dynamic", "frozen", "learned"], default=None)
    p.add_argument("--master-dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--overlong", choices=["drop", "truncate"], default=None, help="samples over --max-length")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=2,expert=2,tensor=2 (train sharding rules)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--export", default=None, help="write a release directory here at the end")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="compute dtype (default float32)")
    p.add_argument("--kernels", default=None, help="INT4 kernels of frozen experts: xla (default) or pallas")
    p.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.set_defaults(func=cmd_finetune)
