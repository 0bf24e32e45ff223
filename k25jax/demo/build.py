"""Rebuild the shipped demo model from scratch: ``python -m k25jax.demo.build``.

The recipe, stage by stage (each stage's output is written atomically under ``--work`` and a finished stage is
skipped when the command is run again, so an interrupted build resumes; the training stage resumes from its last
checkpoint):

1. **data**: ``train.jsonl`` (:func:`k25jax.demo.tasks.generate` with seed 0) and ``held_out.jsonl`` (seed 1).
2. **tokenizer**: a byte-level BPE (``tiktoken.model``, :data:`NUM_RANKS` ranks + the 256 K2.5 special tokens)
   trained on the rendered text of the training samples with digits left out, so every digit stays a token of
   its own (the arithmetic traces work digit by digit).
3. **init**: a randomly initialised model of :func:`demo_config` (a small K2.5: MLA, one dense layer then MoE
   layers with 8 routed INT4 experts and a shared expert, a MoonViT tower and projector) written in the released
   format with that tokenizer and the chat template: the start of fine-tuning, loaded by the release loader.
4. **train**: ``k25jax finetune`` with ``configs/qat/demo.yaml``: INT4 QAT of the routed experts on the ``kimi``
   grid from the first step, everything else trained as the release stores it (bf16-rounded in the forward).
5. **export**: the trained model in the released format (compressed-tensors INT4 experts).
6. **polish**: a second ``k25jax finetune`` (``configs/qat/demo_polish.yaml``) that starts from that export, as a
   user fine-tunes a release, on fresh samples (seed 2) weighted towards what the first run leaves weakest:
   instant-mode arithmetic and comparison, images and video (:data:`POLISH_MIX`, :data:`POLISH_INSTANT`), the
   other tasks kept as rehearsal. Its export is copied to ``--out`` (default ``k25jax/assets/demo``, what
   ``--model tiny`` loads). ``--no-polish`` ships the first export instead.
7. **evaluate**: held-out accuracy (:mod:`k25jax.demo.evaluate`) to ``eval.json``, and the loss curve to
   ``loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time

from k25jax.config import K25Config, tiny
from k25jax.demo import tasks
from k25jax.demo.shipped import demo_dir

NUM_RANKS = 512  # BPE ranks; the vocabulary is these plus 256 special tokens
VOCAB = NUM_RANKS + 256
TOKENIZER_SAMPLES = 600  # training samples whose text the BPE is trained on (the text is very repetitive)
DEFAULT_WORK = os.path.join("runs", "demo")
DEFAULT_CONFIG = os.path.join("configs", "qat", "demo.yaml")
POLISH_CONFIG = os.path.join("configs", "qat", "demo_polish.yaml")
POLISH_SEED = 2  # the polish samples' seed (training used 0, the held-out split is 1)
# The polish stage's task weights and instant-mode share: more of what the first run leaves weakest.
POLISH_MIX: dict[str, float] = {
    "add": 0.17,
    "sub": 0.13,
    "compare": 0.14,
    "tool_call": 0.10,
    "no_tool": 0.03,
    "image": 0.20,
    "video": 0.23,
}
POLISH_INSTANT = 0.65


def demo_config() -> K25Config:
    """The demo model: the ``tiny`` preset's layout widened to a 1.4M-parameter K2.5 (4 layers, hidden 128, 8 routed
    experts top-2 + 1 shared, MLA with a 64-wide latent, YaRN rope to 1024 positions) with a 2-layer MoonViT tower,
    on the demo tokenizer's vocabulary (special ids right after its :data:`NUM_RANKS` ranks)."""
    base = tiny()
    hidden = 128
    text = dataclasses.replace(
        base.text,
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=4,
        q_lora_rank=hidden // 2,
        kv_lora_rank=hidden // 2,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=dataclasses.replace(base.text.rope_scaling, factor=4.0, original_max_position_embeddings=256),
    )
    vision = dataclasses.replace(
        base.vision, hidden_size=64, intermediate_size=128, mm_hidden_size=64, text_hidden_size=hidden
    )
    special = NUM_RANKS
    return dataclasses.replace(
        base,
        text=text,
        vision=vision,
        media_placeholder_token_id=special + 21,
        bos_token_id=special,
        eos_token_id=special + 1,
        pad_token_id=special + 255,
        name="demo",
    ).validate()


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------


def _done(path: str) -> bool:
    return os.path.exists(path)


def make_data(work: str, train: int, held_out: int, mix) -> tuple[str, str]:
    """``train.jsonl`` (seed 0) and ``held_out.jsonl`` (seed 1) under ``work``."""
    paths = os.path.join(work, "train.jsonl"), os.path.join(work, "held_out.jsonl")
    for path, n, seed in zip(paths, (train, held_out), (0, 1), strict=True):
        if not _done(path):
            tasks.write_jsonl(tasks.generate(n, seed, mix=mix), path)
    return paths


def tokenizer_corpus(samples) -> str:
    """The text the BPE learns from: each sample rendered with the chat format, special tokens and digits cut
    out (a merge never spans them, so digits stay single tokens)."""
    from k25jax import chat
    from k25jax.tokenizer import SPECIAL_OFFSETS

    specials = re.compile("|".join(re.escape(s) for s in sorted(SPECIAL_OFFSETS, key=len, reverse=True)))
    pieces = []
    for s in samples:
        text = chat.render(
            s["messages"], tools=s.get("tools"), thinking=s["meta"]["mode"] == "thinking", add_generation_prompt=False
        )
        pieces += [re.sub(r"[0-9]", " ", p) for p in specials.split(text) if p]
    return "\n".join(pieces)


def train_tokenizer(samples, path: str, num_ranks: int = NUM_RANKS) -> None:
    """BPE ranks for :func:`tokenizer_corpus` of ``samples`` written to ``path`` (``tiktoken.model``)."""
    from tiktoken._educational import bpe_train

    from k25jax.tokenizer import PATTERN, write_tiktoken_ranks

    ranks = bpe_train(tokenizer_corpus(samples), num_ranks, "(?V1)" + PATTERN, visualise=None)
    write_tiktoken_ranks(ranks, path + ".tmp")
    os.replace(path + ".tmp", path)


def make_init(work: str, train_path: str, seed: int) -> str:
    """The random-init release directory ``work/init`` (weights, config, tokenizer, chat template)."""
    from importlib import resources

    import k25jax
    from k25jax.train.trainer import exporter

    out = os.path.join(work, "init")
    if _done(os.path.join(out, "tiktoken.model")):
        return out
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model = k25jax.build_model(demo_config(), k25jax.RunConfig(compute_dtype="float32"), seed=seed)
    exporter()(model, partial, overwrite=True, progress=False)
    with resources.as_file(resources.files("k25jax") / "assets" / "chat_template.jinja") as p:
        shutil.copyfile(p, os.path.join(partial, "chat_template.jinja"))
    with open(train_path, encoding="utf-8") as f:
        samples = [json.loads(line) for _, line in zip(range(TOKENIZER_SAMPLES), f, strict=False)]
    train_tokenizer(samples, os.path.join(partial, "tiktoken.model"))  # written last: it marks the stage done
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def make_polish_data(work: str, n: int, text_only: bool) -> str:
    """``polish.jsonl`` under ``work``: ``n`` samples of :data:`POLISH_MIX` (seed :data:`POLISH_SEED`)."""
    path = os.path.join(work, "polish.jsonl")
    if not _done(path):
        mix = {t: w for t, w in POLISH_MIX.items() if not (text_only and t in ("image", "video"))}
        tasks.write_jsonl(tasks.generate(n, POLISH_SEED, mix=mix, instant=POLISH_INSTANT), path)
    return path


def run_stage(name: str, config: str, *, out: str, export: str, timings: dict, t0: float, **settings) -> None:
    """``finetune`` with the settings of ``config`` and ``settings`` (checkpoints and metrics in ``out``, the
    release written to ``export``), resuming from ``out``'s checkpoints if any; skipped when ``export`` is already
    written. Its wall time goes to ``timings[name + "_s"]``."""
    from k25jax.train.trainer import FinetuneConfig, finetune

    if _done(os.path.join(export, "config.json")):
        return
    cfg = FinetuneConfig.from_yaml(
        config, out=out, export=export, resume=os.path.isdir(os.path.join(out, "checkpoints")), **settings
    )
    t1 = time.time()
    summary = finetune(cfg)
    timings[name + "_s"] = round(time.time() - t1, 1)
    print(f"{name}: {json.dumps(summary.get('last', {}))[:300]} ({time.time() - t0:.0f} s)", flush=True)


def ship(export: str, out: str) -> str:
    """Copy the exported release to ``out`` (through ``out.partial``, so a crash leaves no half copy)."""
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(export, partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def plot_loss(metrics_paths: list[str], png: str, title: str = "demo model: INT4 QAT from scratch") -> None:
    """The training loss (and held-out loss where measured) per step, log scale; the runs one after another (the
    polish run's steps continue the first run's, a dotted line marks where it starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, offset, starts = [], 0, []
    for path in metrics_paths:
        if not os.path.exists(path):  # a stage whose export was given rather than trained here
            print(f"loss plot: {path} is missing, that run is left out", flush=True)
            continue
        run = [json.loads(line) for line in open(path, encoding="utf-8")]
        if rows:
            starts.append(offset)
        rows += [{**r, "step": r["step"] + offset} for r in run]
        offset = rows[-1]["step"] if rows else 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label="train loss")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o", ms=3, label="held-out loss")
    for x in starts:
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], " polish", va="top", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png + ".tmp.png", dpi=120)
    os.replace(png + ".tmp.png", png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k25jax.demo.build", description=__doc__.splitlines()[0])
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (data, init, checkpoints, results)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the fine-tuning settings")
    p.add_argument("--out", default=None, help="where the release is shipped (default: k25jax/assets/demo)")
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--held-out-samples", type=int, default=400)
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--seed", type=int, default=0, help="the initial weights' seed")
    p.add_argument("--text-only", action="store_true", help="leave out the image and video tasks")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--polish-config", default=POLISH_CONFIG, help="the polish stage's fine-tuning settings")
    p.add_argument("--polish-samples", type=int, default=40000)
    p.add_argument("--polish-steps", type=int, default=None, help="override the polish config's steps")
    p.add_argument("--no-polish", action="store_true", help="ship the first run's export (no polish stage)")
    p.add_argument(
        "--no-qat",
        action="store_true",
        help="the PTQ baseline: float experts, quantized on the kimi grid at export (implies --no-ship)",
    )
    p.add_argument("--no-ship", action="store_true", help="leave the package's demo release as it is")
    args = p.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.work, exist_ok=True)
    mix = tasks.TEXT_MIX if args.text_only else None
    train_path, held_out_path = make_data(args.work, args.train_samples, args.held_out_samples, mix)
    print(f"data: {train_path}, {held_out_path} ({time.time() - t0:.0f} s)", flush=True)
    init = make_init(args.work, train_path, args.seed)
    print(f"init: {init} ({time.time() - t0:.0f} s)", flush=True)
    run = os.path.join(args.work, "run")
    export = os.path.join(args.work, "export")
    timings = {}
    qat = not args.no_qat
    run_stage(
        "train", args.config, out=run, export=export, timings=timings, t0=t0,
        model=init, data=train_path, eval_data=held_out_path, steps=args.steps, qat=qat,
    )  # fmt: skip
    runs = [run]
    if not args.no_polish:
        polish_path = make_polish_data(args.work, args.polish_samples, args.text_only)
        polish_run, polish_export = os.path.join(args.work, "polish"), os.path.join(args.work, "polish_export")
        run_stage(
            "polish", args.polish_config, out=polish_run, export=polish_export, timings=timings, t0=t0,
            model=export, data=polish_path, eval_data=held_out_path, steps=args.polish_steps, qat=qat,
        )  # fmt: skip
        runs.append(polish_run)
        export = polish_export
    out = export
    if not (args.no_ship or args.no_qat):
        out = ship(export, args.out or demo_dir())
        print(f"shipped: {out} ({time.time() - t0:.0f} s)", flush=True)
    plot_loss([os.path.join(r, "metrics.jsonl") for r in runs], os.path.join(args.work, "loss.png"))
    from k25jax.demo import evaluate

    evaluate.main(
        ["--model", out, "--samples", str(args.eval_samples), "--json", os.path.join(args.work, "eval.json")]
        + (["--text-only"] if args.text_only else [])
    )
    timings["total_s"] = round(time.time() - t0, 1)
    with open(os.path.join(args.work, "build.json"), "w", encoding="utf-8") as f:
        json.dump({"argv": sys.argv[1:] if argv is None else argv, **timings}, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
