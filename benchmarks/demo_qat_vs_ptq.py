"""QAT vs PTQ on the demo task: the same last phase of training run twice from the shipped demo model, once with
INT4 quantization-aware training and once in float with post-training quantization at export.

Both arms start from the same release (default: the shipped demo model, ``k25jax/assets/demo``: INT4 experts on the
kimi grid), read the same fresh samples (``--data-seed`` 3, the polish mix of :mod:`k25jax.demo.build`; training
used seeds 0 and 2, the held-out split is seed 1) in the same order, with the settings of
``configs/qat/demo_polish.yaml`` except ``--steps``, ``--lr`` and ``--warmup``. They differ in the routed experts:

- ``qat``: fake-quant experts (kimi grid, dynamic scales, straight-through gradient), exported to INT4;
- ``ptq``: ``finetune --no-qat``: float experts (the exact dequantization of the start), quantized on the kimi
  grid at export.

Each export is then measured **as deployed** (INT4 experts, loaded from its release directory with the release
loader): held-out loss on ``--held-out`` samples and greedy accuracy on the first ``--eval-samples`` of them
(:func:`k25jax.demo.evaluate.evaluate`); the start model is measured the same way, and the PTQ arm's float model
before quantization by its last in-training held-out loss. The share of the PTQ gap that QAT recovers is
``(PTQ - QAT) / (PTQ - float)`` (held-out loss), reported only where PTQ lost anything (``ptq_gap`` > 0).

The runs resume from their checkpoints and an arm whose export exists is not trained again.

    python benchmarks/demo_qat_vs_ptq.py [--steps 800] [--lr 3e-4] [--work runs/demo_qat_vs_ptq]
        [--model DIR] [--arms qat ptq] [--eval-samples 200]
Results: ``benchmarks/results/demo_qat_vs_ptq.json`` and ``.png`` (training loss of both arms, held-out points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from k25jax.demo import build, evaluate, tasks  # noqa: E402
from k25jax.demo.shipped import demo_dir  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def train_arm(arm: str, args, data: str, held_out: str) -> tuple[str, float]:
    """Fine-tune one arm (resuming, or skipped when its export exists); its export directory and wall seconds."""
    from k25jax.train.trainer import FinetuneConfig, finetune

    out, export = os.path.join(args.work, arm), os.path.join(args.work, f"{arm}_export")
    if os.path.exists(os.path.join(export, "config.json")):
        return export, 0.0
    cfg = FinetuneConfig.from_yaml(
        args.config,
        model=args.model,
        data=data,
        eval_data=held_out,
        out=out,
        export=export,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=max(args.steps // 4, 1),
        qat=arm == "qat",
        resume=os.path.isdir(os.path.join(out, "checkpoints")),
    )
    t = time.time()
    finetune(cfg)
    return export, time.time() - t


def measure(model_dir: str, held_out: str, samples: list[dict], batch_size: int) -> dict:
    """Held-out loss and greedy accuracy of a release directory as the release loader reads it."""
    from k25jax.cli_generate import load_model_and_tokenizer, run_config
    from k25jax.train.trainer import held_out_loss

    model, tokenizer = load_model_and_tokenizer(model_dir, run_config(model_dir, "float32"))
    loss = held_out_loss(model, held_out, tokenizer, batch_size=16, max_length=512)
    result = evaluate.evaluate(model, tokenizer, samples, batch_size=batch_size, progress=False)
    return {"held_out_loss": float(loss), "accuracy": result["accuracy"], "counts": result["counts"]}


def metrics_rows(arm_dir: str) -> list[dict]:
    path = os.path.join(arm_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows_by_arm: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, rows in rows_by_arm.items():
        steps = [r["step"] for r in rows if "loss" in r]
        loss = [r["loss"] for r in rows if "loss" in r]
        if steps:
            ax.plot(steps, loss, lw=0.7, alpha=0.6, label=f"{arm} train loss")
        ev = [r for r in rows if "eval_loss" in r]
        if ev:
            label = f"{arm} held-out ({'INT4 fake-quant' if arm == 'qat' else 'float, before PTQ'})"
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("demo task: QAT vs float fine-tune (+ PTQ at export)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="the start release directory (default: the shipped demo model)")
    p.add_argument("--work", default=os.path.join("runs", "demo_qat_vs_ptq"))
    p.add_argument("--config", default=build.POLISH_CONFIG)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--train-samples", type=int, default=16000)
    p.add_argument("--data-seed", type=int, default=3)
    p.add_argument("--held-out", type=int, default=400, help="held-out samples (seed 1) for the loss")
    p.add_argument("--eval-samples", type=int, default=200, help="the first N held-out samples graded greedily")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--arms", nargs="+", default=["qat", "ptq"], choices=["qat", "ptq"])
    p.add_argument("--json", default=os.path.join(RESULTS, "demo_qat_vs_ptq.json"))
    args = p.parse_args(argv)
    args.model = args.model or demo_dir()
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()

    data = os.path.join(args.work, "train.jsonl")
    if not os.path.exists(data):
        samples = tasks.generate(args.train_samples, args.data_seed, mix=build.POLISH_MIX, instant=build.POLISH_INSTANT)
        tasks.write_jsonl(samples, data)
    held_out = os.path.join(args.work, "held_out.jsonl")
    if not os.path.exists(held_out):
        tasks.write_jsonl(tasks.generate(args.held_out, evaluate.HELD_OUT_SEED), held_out)
    graded = tasks.generate(args.eval_samples, evaluate.HELD_OUT_SEED)

    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "arms": {}}
    exports = {}
    for arm in args.arms:
        exports[arm], seconds = train_arm(arm, args, data, held_out)
        result["arms"][arm] = {"train_s": round(seconds, 1)}
        print(f"{arm}: trained in {seconds:.0f} s ({time.time() - t0:.0f} s)", flush=True)
    result["start"] = measure(args.model, held_out, graded, args.batch_size)
    print(f"start: held-out loss {result['start']['held_out_loss']:.4f}", flush=True)
    for arm, export in exports.items():
        result["arms"][arm].update(measure(export, held_out, graded, args.batch_size))
        rows = metrics_rows(os.path.join(args.work, arm))
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        result["arms"][arm]["last_in_training_eval_loss"] = evals[-1] if evals else None
        print(f"{arm}: held-out loss as deployed {result['arms'][arm]['held_out_loss']:.4f}", flush=True)
    if {"qat", "ptq"} <= set(exports):
        ptq, qat = result["arms"]["ptq"]["held_out_loss"], result["arms"]["qat"]["held_out_loss"]
        flt = result["arms"]["ptq"]["last_in_training_eval_loss"]
        gap = ptq - flt if flt is not None else None
        result["ptq_gap"] = gap  # what quantizing the float arm cost (INT4 minus float held-out loss)
        # the share QAT recovers means something only where PTQ lost anything
        result["ptq_gap_recovered"] = (ptq - qat) / gap if gap is not None and gap > 0 else None
        result["qat_minus_ptq"] = qat - ptq
    result["total_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    rows = {arm: metrics_rows(os.path.join(args.work, arm)) for arm in args.arms}
    plot(rows, os.path.splitext(args.json)[0] + ".png")
    modes = sorted(result["start"]["accuracy"])
    names = ["start"] + list(exports)
    for mode in modes:
        print(f"\n{mode}: " + " | ".join(names))
        for k in sorted(result["start"]["accuracy"][mode]):
            if k.endswith(":no_tool_calls"):
                continue
            row = [result["start"]] + [result["arms"][a] for a in exports]
            cells = [f"{100 * r['accuracy'][mode].get(k, float('nan')):.1f}%" for r in row]
            print(f"  {k}: " + " | ".join(cells))
    print(json.dumps({k: v for k, v in result.items() if k not in ("start", "arms")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
