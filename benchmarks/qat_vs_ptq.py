"""QAT vs PTQ on a small learnable task: how much of the post-training-quantization gap INT4 QAT recovers.

Same start (the tiny preset, random init, routed experts INT4 on the ``kimi`` grid: the "release"), same data,
same steps and optimizer, three arms, each evaluated on held-out samples **as deployed in INT4**:

- ``float``: the experts dequantized to float32 and fine-tuned as plain weights; its float held-out loss is the
  ceiling, and quantizing its experts afterwards on the kimi grid is ``ptq``;
- ``qat``: the experts as fake-quant weights (dynamic scales, straight-through gradient), exported to INT4;
- ``lora`` (when ``k25jax.train.lora`` is present): rank-r adapters on the frozen INT4 experts, deployed merged and
  re-quantized on the kimi grid (the adapters-beside deployment is the unquantized ``lora_beside`` number).

Only the routed experts train by default (``--trainable``), so what the task teaches lives where INT4 rounding
bites: a float fine-tune moves the experts by less than one INT4 step, and quantizing afterwards mostly rounds the
change away. Reported: held-out loss of each arm and the share of the PTQ gap
QAT recovers, ``(PTQ - QAT) / (PTQ - float)``, per seed and as the median.

    python benchmarks/qat_vs_ptq.py [--seeds 0 1 2] [--steps 150] [--out results.json]
"""

from __future__ import annotations

import argparse
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
from k25jax.train.qat import quantize_experts, to_fake_quant, to_float_experts, to_int4, trainable_filter  # noqa: E402
from k25jax.train.step import OptimizerConfig, make_eval_step, make_train_step, split_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def write_task(path: str, n: int, seed: int, top: int = 10) -> str:
    """Additions and subtractions of integers below ``top``, answer only: "What is 7+8?" -> "15"."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, top, 2))
            op = "+" if rng.random() < 0.5 else "-"
            a, b = (a, b) if op == "+" or a >= b else (b, a)
            answer = a + b if op == "+" else a - b
            messages = [
                {"role": "user", "content": f"What is {a}{op}{b}?"},
                {"role": "assistant", "content": str(answer)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def held_out_loss(model, batches) -> float:
    graphdef, trainable, frozen = split_model(model, trainable_filter(r"^text/"))
    evaluate = make_eval_step(graphdef)
    total = tokens = 0.0
    for batch in batches:
        out = evaluate(trainable, frozen, {k: jax.numpy.asarray(v) for k, v in batch.items()})
        total += float(out["loss"]) * float(out["tokens"])
        tokens += float(out["tokens"])
    return total / tokens


def train(model, train_path, tokenizer, args, seed):
    graphdef, trainable, frozen = split_model(model, trainable_filter(args.trainable))
    config = OptimizerConfig(lr=args.lr, steps=args.steps, warmup=args.steps // 10)
    tx = config.build()
    step = make_train_step(graphdef, tx, config.schedule(), storage_dtype="bfloat16")
    batches = train_data.make_batches(train_path, tokenizer, batch_size=args.batch, max_length=args.length, seed=seed)
    opt_state = tx.init(trainable)
    from k25jax.train.step import storage_rounded

    for _ in range(args.steps):
        batch = {k: jax.numpy.asarray(v) for k, v in next(batches).items()}
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
    return nnx.merge(graphdef, storage_rounded(trainable, "bfloat16"), frozen), float(metrics["loss"])


def run_seed(seed: int, args, workdir: str) -> dict:
    tokenizer = Tokenizer.tiny()
    train_path = write_task(os.path.join(workdir, f"train{seed}.jsonl"), args.train_samples, seed, args.top)
    eval_path = write_task(os.path.join(workdir, f"eval{seed}.jsonl"), args.eval_samples, 10_000 + seed, args.top)

    def evaluation():
        return train_data.make_batches(
            eval_path, tokenizer, batch_size=args.batch, max_length=args.length, seed=0, num_epochs=1
        )

    def start():
        model = k25jax.build_model(k25jax.preset("tiny"), RunConfig(compute_dtype="float32"), seed=seed)
        quantize_experts(model, "kimi")
        return model

    out = {"seed": seed, "start": held_out_loss(start(), evaluation())}
    t0 = time.perf_counter()
    model = start()
    to_float_experts(model)
    model, _ = train(model, train_path, tokenizer, args, seed)
    out["float"] = held_out_loss(model, evaluation())
    quantize_experts(model, "kimi")
    out["ptq"] = held_out_loss(model, evaluation())
    model = start()
    to_fake_quant(model, grid="kimi", scales="dynamic")
    model, _ = train(model, train_path, tokenizer, args, seed)
    to_int4(model)
    out["qat"] = held_out_loss(model, evaluation())
    try:
        from k25jax.train import lora
    except ImportError:
        lora = None
    if lora is not None and hasattr(lora, "apply_lora"):
        model = start()
        lora.apply_lora(model, rank=args.lora_rank, seed=seed)
        model, _ = train(model, train_path, tokenizer, args, seed)
        out["lora_beside"] = held_out_loss(model, evaluation())
        if hasattr(lora, "merge_lora"):
            lora.merge_lora(model, grid="kimi")
            out["lora"] = held_out_loss(model, evaluation())
    gap = out["ptq"] - out["float"]
    out["recovered"] = (out["ptq"] - out["qat"]) / gap if gap > 0 else float("nan")
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--top", type=int, default=10, help="operands are integers below this")
    ap.add_argument(
        "--trainable",
        default=r"experts/|lora",
        help="regex of trained parameters (default: the routed experts only, so the task lives where INT4 bites)",
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
    print(
        f"share of the PTQ gap QAT recovers: median {statistics.median(share):.1%} (per seed: "
        + ", ".join(f"{s:.1%}" for s in share)
        + ")"
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
