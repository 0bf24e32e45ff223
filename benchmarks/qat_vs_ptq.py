"""QAT vs PTQ on a small learnable task: how much of the post-training-quantization gap INT4 QAT recovers.

The model: the tiny preset with the routed experts as its only MLPs (no dense first layer, no shared expert, expert
width 64), so what is learnt lives in the weights INT4 rounds. The shared start: that model trained in float for
``--base-steps`` on the task (products of integers below ``--top``, answer only: "What is 7*8?" -> "56"); QAT is
the last phase of training, as Moonshot ran it for K2-Thinking. Then three arms, same data, steps and optimizer
(``--trainable`` selects the same non-expert parameters in each; they differ in how the routed experts train),
each evaluated on held-out samples **as deployed in INT4** (kimi grid):

- ``float``: the experts fine-tuned as float weights; its float held-out loss is the reference, and quantizing its
  experts afterwards is ``ptq``;
- ``qat``: the experts as fake-quant weights (``--scales``: ``learned`` LSQ scales by default, or ``dynamic``
  ``amax / 7`` recomputed every step, straight-through gradient), exported to INT4;
- ``lora``: rank-r adapters on the INT4-quantized start, deployed merged and re-quantized on the kimi grid (the
  adapters-beside deployment is the unquantized ``lora_beside`` number).

Reported: held-out loss of each arm and the share of the PTQ gap QAT recovers, ``(PTQ - QAT) / (PTQ - float)``,
per seed and as the median (above 100%: the QAT model in INT4 beats the float one).

    python benchmarks/qat_vs_ptq.py [--seeds 0 1 2] [--scales learned|dynamic] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import k25jax  # noqa: E402
from k25jax.config import RunConfig  # noqa: E402
from k25jax.tokenizer import Tokenizer  # noqa: E402
from k25jax.train import data as train_data  # noqa: E402
from k25jax.train import lora  # noqa: E402
from k25jax.train.qat import (  # noqa: E402
    expert_weights,
    quantize_experts,
    to_fake_quant,
    to_float_experts,
    to_int4,
    trainable_filter,
)
from k25jax.train.step import (  # noqa: E402
    OptimizerConfig,
    make_train_step,
    split_model,
    storage_rounded,
)
from k25jax.train.trainer import held_out_loss  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def write_task(path: str, n: int, seed: int, top: int = 10, ops: str = "+-") -> str:
    """Sums, differences or products (``ops``) of integers below ``top``, answer only: "What is 7+8?" -> "15"."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, top, 2))
            op = ops[int(rng.integers(0, len(ops)))]
            a, b = (a, b) if op != "-" or a >= b else (b, a)
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            messages = [
                {"role": "user", "content": f"What is {a}{op}{b}?"},
                {"role": "assistant", "content": str(answer)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def train(model, train_path, tokenizer, args, seed, *, trainable: str, lr: float, steps: int):
    graphdef, params, frozen = split_model(model, trainable_filter(trainable))
    config = OptimizerConfig(lr=lr, steps=steps, warmup=steps // 10)
    tx = config.build()
    step = make_train_step(graphdef, tx, config.schedule(), storage_dtype="bfloat16")
    batches = train_data.make_batches(train_path, tokenizer, batch_size=args.batch, max_length=args.length, seed=seed)
    opt_state = tx.init(params)
    loss = float("nan")
    for _ in range(steps):
        batch = {k: jax.numpy.asarray(v) for k, v in next(batches).items()}
        params, opt_state, metrics = step(params, opt_state, frozen, batch)
        loss = float(metrics["loss"])
    return nnx.merge(graphdef, storage_rounded(params, "bfloat16"), frozen), loss


def add_outlier_channels(model, factor: float, seed: int) -> None:
    """Scale one input row per INT4 group (32 rows along K) of every routed-expert weight by ``factor``, at a seeded
    random position in the group, before any training: trained LLM weight matrices carry such outlier input
    channels, and they are what makes round-to-nearest INT4 costly (the group's scale follows its largest value, so
    the other 31 round on a grid ``factor`` times coarser). The tiny models here do not grow them in a few hundred
    steps."""
    rng = np.random.default_rng(1_000 + seed)
    for _, _, _, weight, _ in expert_weights(model):
        value = weight[...]
        k = value.shape[-2]
        gain = np.ones(k, np.float32)
        gain[np.arange(0, k, 32) + rng.integers(0, 32, k // 32)] = factor
        weight[...] = value * jax.numpy.asarray(gain)[:, None]


def model_config(args):
    """The tiny preset, with the MoE made the model's only MLP when asked (no dense first layer, no shared
    expert), so that what is learnt lives in the INT4 experts."""
    cfg = k25jax.preset("tiny")
    text = dataclasses.replace(
        cfg.text,
        n_shared_experts=args.shared_experts,
        first_k_dense_replace=args.dense_layers,
        moe_intermediate_size=args.expert_width,
    )
    return dataclasses.replace(cfg, text=text)


def run_seed(seed: int, args, workdir: str) -> dict:
    """One seed: the shared base (pre-trained, INT4 "release"), then the three arms fine-tuned from it."""
    tokenizer = Tokenizer.tiny()
    task = os.path.join(workdir, f"{{}}{seed}.jsonl")
    base_path = write_task(task.format("base"), args.train_samples, 20_000 + seed, args.top, args.base_ops)
    train_path = write_task(task.format("train"), args.train_samples, seed, args.top, args.ops)
    eval_path = write_task(task.format("eval"), args.eval_samples, 10_000 + seed, args.top, args.ops)

    def held_out(model) -> float:
        return held_out_loss(model, eval_path, tokenizer, batch_size=args.batch, max_length=args.length)

    t0 = time.perf_counter()
    base = k25jax.build_model(model_config(args), RunConfig(compute_dtype="float32"), seed=seed)
    to_float_experts(base)
    if args.outliers != 1:
        add_outlier_channels(base, args.outliers, seed)
    if args.base_steps:  # the shared start: a float model trained on the base task (QAT as the last phase)
        base, _ = train(
            base, base_path, tokenizer, args, seed, trainable=r"^text/", lr=args.base_lr, steps=args.base_steps
        )
    graphdef, state = nnx.split(base)

    def start():
        return nnx.merge(graphdef, jax.tree.map(jax.numpy.copy, state))

    model = start()
    quantize_experts(model, "kimi")
    out = {
        "seed": seed,
        "start_float": held_out(start()),
        "start": held_out(model),
    }
    fit = dict(trainable=args.trainable, lr=args.lr, steps=args.steps)
    model, _ = train(start(), train_path, tokenizer, args, seed, **fit)
    out["float"] = held_out(model)
    quantize_experts(model, "kimi")
    out["ptq"] = held_out(model)
    model = start()
    to_fake_quant(model, grid="kimi", scales=args.scales)
    model, _ = train(model, train_path, tokenizer, args, seed, **fit)
    to_int4(model)
    out["qat"] = held_out(model)
    if args.lora_rank:
        model = start()
        quantize_experts(model, "kimi")
        lora.apply_lora(model, rank=args.lora_rank, seed=seed)
        model, _ = train(model, train_path, tokenizer, args, seed, **fit)
        out["lora_beside"] = held_out(model)
        lora.merge_lora(model, grid="kimi")
        out["lora"] = held_out(model)
    gap = out["ptq"] - out["float"]
    out["recovered"] = (out["ptq"] - out["qat"]) / gap if gap > 0 else float("nan")
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps of each arm")
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate of each arm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--top", type=int, default=10, help="operands are integers below this")
    ap.add_argument("--ops", default="*", help="the fine-tuning skill: operators of its questions")
    ap.add_argument("--base-ops", default="*", help="what the base model is pre-trained on (default: the skill)")
    ap.add_argument("--scales", default="learned", choices=["dynamic", "frozen", "learned"], help="QAT scale mode")
    ap.add_argument("--base-steps", type=int, default=300, help="pre-training steps of the base (0: random init)")
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument(
        "--outliers",
        type=float,
        default=1.0,
        help="scale one input row per INT4 group of the experts by this before training (1: none); see "
        "add_outlier_channels",
    )
    ap.add_argument("--shared-experts", type=int, default=0, help="shared experts (the tiny preset has 1)")
    ap.add_argument("--dense-layers", type=int, default=0, help="dense MLP layers before the MoE ones (tiny: 1)")
    ap.add_argument("--expert-width", type=int, default=64, help="routed-expert intermediate size (tiny: 32)")
    ap.add_argument(
        "--trainable",
        default=r"^text/",
        help="regex of the parameters each arm fine-tunes (default: the whole text model; the arms differ only in "
        "how the routed experts train: float, fake-quant, or LoRA adapters on the frozen INT4 weights)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            r = run_seed(seed, args, workdir)
            results.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    cols = [c for c in ("start", "float", "ptq", "qat", "lora", "lora_beside") if all(c in r for r in results)]
    print("\nheld-out loss (INT4 as deployed; float = no quantization), median over seeds", args.seeds)
    print(" | ".join(f"{c} {statistics.median(r[c] for r in results):.4f}" for c in cols))
    share = [r["recovered"] for r in results]
    defined = [s for s in share if s == s]  # NaN where PTQ cost nothing (PTQ <= float): no gap to recover
    median = f"{statistics.median(defined):.1%} over {len(defined)} seeds with a gap" if defined else "n/a"
    pooled_gap = sum(r["ptq"] - r["float"] for r in results)
    pooled = sum(r["ptq"] - r["qat"] for r in results) / pooled_gap if pooled_gap > 0 else float("nan")
    print(
        f"share of the PTQ gap QAT recovers: median {median}; pooled over seeds {pooled:.1%} (per seed: "
        + ", ".join("no gap" if s != s else f"{s:.1%}" for s in share)
        + ")"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
