"""``k25jax finetune``: the whole fine-tuning run, from a model and chat data to checkpoints, metrics and an export.

:class:`FinetuneConfig` holds every setting (a YAML file under ``configs/qat/`` plus command-line flags on top);
:func:`finetune` runs it:

1. everything is checked before the first step: the model loads, the data (and eval data) read and tokenize
   (:class:`~k25jax.train.data.DataError` names the file and line), the trainable pattern matches something;
2. the routed experts whose masters the pattern trains become fake-quant weights (:mod:`k25jax.train.qat`); the
   rest stay INT4-packed; optimizer state exists for the trainable leaves only. With ``lora_rank`` the experts stay
   INT4 instead and only LoRA adapters on them train (:mod:`k25jax.train.lora`); the pattern then selects adapters;
3. steps run jitted with the state donated; a tqdm bar shows loss, lr, grad norm and tokens/s; metrics go to
   ``OUT/metrics.jsonl`` and TensorBoard event files in ``OUT/tensorboard``; eval loss at intervals; the router's
   per-expert load each step (max / mean, experts never chosen); the correction bias is frozen unless
   ``router_bias_update`` > 0 (the aux-loss-free update, :func:`~k25jax.train.step.router_bias_step`);
4. an orbax ``CheckpointManager`` in ``OUT/checkpoints`` keeps parameters, optimizer state, the data position,
   the RNG key and the step (written atomically by orbax); ``resume=True`` continues from the latest up to
   ``steps`` in total, bit for bit as if never interrupted;
5. a NaN or infinite loss stops the run with :class:`TrainingError`; the last good checkpoint stays;
6. ``export`` writes a complete release directory (config, index, shards, tokenizer and chat-template files) with
   the fake-quant experts as the INT4 weights they stand for, through the exporter registered under the
   ``k25jax.exporters`` entry point (the ``convert`` package's; the library never imports it). A LoRA run writes
   its adapters there (``lora_export="adapters"``: to apply to the untouched release with
   :func:`~k25jax.train.lora.load_adapters`) or merges them into re-quantized INT4 experts and writes the release
   (``"merge"``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.config import RunConfig
from k25jax.demo.shipped import RANDOM, TINY_NAMES, resolve
from k25jax.sharding import use_mesh
from k25jax.train import data as train_data
from k25jax.train.qat import (
    ROUTER_BIAS,
    QATError,
    chosen_experts,
    exact_paths,
    module_path,
    quantize_experts,
    to_fake_quant,
    to_float_experts,
    to_int4,
    trainable_filter,
    trainable_paths,
)
from k25jax.train.step import (
    OptimizerConfig,
    load_stats,
    make_eval_step,
    make_train_step,
    model_loss_with_load,
    router_bias_step,
)


class TrainingError(RuntimeError):
    """A run that cannot go on (a NaN loss, a checkpoint that does not fit the settings)."""


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (``configs/qat/*.yaml`` keys are these field names)."""

    model: str = "tiny"
    data: str = ""
    out: str = ""
    steps: int = 100
    batch_size: int = 8
    eval_data: str | None = None
    max_length: int = 512
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    accumulate: int = 1
    clip_norm: float | None = 1.0
    optimizer_state_dtype: str = "float32"
    seed: int = 0
    trainable: str = r"^text/"
    train_layers: str | list | None = None  # "A:B" / [A, B]: only MoE layers A <= i < B's experts train (QAT)
    lora_rank: int = 0  # > 0: LoRA of this per-expert rank on the INT4 routed experts, only the adapters train
    lora_alpha: float | None = None  # None: the rank (scale alpha / rank = 1)
    lora_experts: str = r".*"  # which routed-expert weights get adapters (regex over their paths)
    lora_export: str = "adapters"  # "adapters": beside the untouched release; "merge": re-quantized into it
    router_bias_update: float = 0.0  # 0: correction bias frozen; u > 0: bias_e += u * sign(mean load - load_e)
    qat: bool = True  # False: the chosen experts train as float weights, quantized on qat_grid at export (PTQ)
    qat_grid: str = "kimi"
    storage_dtype: str | None = "bfloat16"  # the release's float dtype: the forward sees parameters rounded to it
    qat_scales: str = "dynamic"
    master_dtype: str = "float32"
    overlong: str = "drop"
    dtype: str = "float32"
    kernels: str = "xla"
    mesh: str | None = None
    remat: str = "none"
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    export: str | None = None
    progress: bool = True

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> FinetuneConfig:
        """The settings of a YAML file, then ``overrides`` (flags given on the command line) on top."""
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise QATError(f"{path}: a fine-tuning config is a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QATError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(
            lr=self.lr,
            warmup=self.warmup,
            steps=self.steps,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            accumulate=self.accumulate,
            state_dtype=self.optimizer_state_dtype,
        )

    def run_config(self) -> RunConfig:
        return RunConfig(compute_dtype=self.dtype, kernels=self.kernels, remat=self.remat, sharding="train")

    def check(self) -> None:
        """Settings errors, named, before anything is loaded."""
        for name in ("data", "out"):
            if not getattr(self, name):
                raise QATError(f"--{name} is required")
        if self.steps < 0:
            raise QATError(f"--steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "max_length", "accumulate", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise QATError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise QATError(f"--lora-rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if self.lora_export not in LORA_EXPORTS:
            raise QATError(f"--lora-export {self.lora_export!r} is not one of {LORA_EXPORTS}")
        if not (self.router_bias_update >= 0 and math.isfinite(self.router_bias_update)):
            raise QATError(f"--router-bias-update must be >= 0 (0: bias frozen), got {self.router_bias_update}")
        if self.lora_rank and self.router_bias_update and self.export and self.lora_export == "adapters":
            raise QATError(
                "--router-bias-update with --lora-export adapters: the updated correction biases live in the "
                "release, which an adapters export leaves untouched; use --lora-export merge"
            )


LORA_EXPORTS = ("adapters", "merge")


@dataclasses.dataclass
class RunState:
    """What one step changes, and what a checkpoint holds (``router``: the correction biases, only when they
    update)."""

    trainable: Any
    opt_state: Any
    rng: jax.Array
    step: int
    router: Any = None

    def frozen_parts(self, frozen):
        """The step's ``frozen`` argument: ``frozen``, or ``(router, frozen)`` when the router biases update."""
        return frozen if self.router is None else (self.router, frozen)


def load_for_training(cfg: FinetuneConfig):
    """The model (a release / checkpoint directory, ``'tiny'``: the shipped demo release, ``'tiny-random'``: the
    random-init tiny preset with seed ``cfg.seed``) and its tokenizer."""
    import k25jax
    from k25jax.tokenizer import Tokenizer

    run = cfg.run_config()
    if cfg.model == RANDOM:
        return k25jax.build_model(k25jax.preset("tiny"), run, seed=cfg.seed), Tokenizer.tiny()
    try:
        path = resolve(cfg.model)
    except FileNotFoundError as err:
        raise QATError(str(err)) from None
    if not os.path.isdir(path):
        raise QATError(f"--model {cfg.model}: no such directory (a release or k25jax checkpoint, 'tiny' or '{RANDOM}')")
    return k25jax.load_model(path, run, progress=cfg.progress), Tokenizer.from_pretrained(path)


@dataclasses.dataclass
class Prepared:
    """The model split for training: ``nnx.merge(graphdef, trainable, *([router] if router else []), frozen)``."""

    graphdef: nnx.GraphDef
    trainable: Any
    router: Any  # the MoE layers' correction biases, split apart when they update; else None (inside frozen)
    frozen: Any
    paths: list[str]
    lora: Any = None  # the LoRAReport of a LoRA run

    def merge(self, trainable, router=None):
        parts = [trainable] + ([router] if router is not None else []) + [self.frozen]
        return nnx.merge(self.graphdef, *parts)


def _router_bias(path, value) -> bool:
    return isinstance(value, nnx.Param) and module_path(path).endswith(ROUTER_BIAS)


def prepare(model, cfg: FinetuneConfig, mesh=None) -> Prepared:
    """Fake-quant the routed experts whose masters the trainable pattern selects (``.../experts/gate_proj/master``),
    or, with ``lora_rank``, put LoRA adapters on the (INT4, frozen) routed experts and train only those the pattern
    selects (``.../experts/gate_proj/a``); split the model. A pattern that trains nothing is an error. ``mesh``: the
    mesh ``model`` is placed on (the new adapters are placed by their logical axes too)."""
    lora = None
    if cfg.lora_rank and cfg.train_layers:
        raise QATError("--train-layers applies to QAT; with --lora-rank every layer's experts get adapters")
    if cfg.lora_rank:
        from k25jax.train.lora import apply_lora, lora_filter

        lora = apply_lora(model, experts=cfg.lora_experts, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
        if mesh is not None:
            from k25jax.sharding import shard_model

            model = shard_model(model, mesh, "train")  # the placed arrays stay where they are
        flt = lora_filter(cfg.trainable)
    else:
        _fake_quant_chosen(model, cfg)
        flt = trainable_filter(cfg.trainable)
    paths = trainable_paths(model, flt)
    if not paths:
        what = "LoRA adapter" if lora else "trainable parameter"
        raise QATError(f"--trainable {cfg.trainable!r} matches no {what} of model {cfg.model!r}")
    if cfg.router_bias_update:
        graphdef, trainable, router, frozen = nnx.split(model, flt, _router_bias, ...)
        if not jax.tree.leaves(router):
            raise QATError(f"--router-bias-update: model {cfg.model!r} has no MoE layer")
    else:
        (graphdef, trainable, frozen), router = nnx.split(model, flt, ...), None
    return Prepared(graphdef, trainable, router, frozen, paths, lora)


def _fake_quant_chosen(model, cfg: FinetuneConfig) -> None:
    chosen = chosen_experts(model, cfg.trainable)
    layers = train_layers(cfg.train_layers, model.cfg.text.num_moe_layers) if cfg.train_layers else None
    if layers is not None and not cfg.qat:
        raise QATError("--train-layers applies to QAT; --no-qat trains whole expert stacks as float weights")
    if layers is not None and not chosen:
        raise QATError(f"--train-layers {cfg.train_layers}: --trainable {cfg.trainable!r} selects no routed expert")
    if chosen:
        exact = exact_paths(chosen)
        if not cfg.qat:  # the PTQ baseline: plain float experts (their dequantized values), quantized at export
            to_float_experts(model, cfg.master_dtype, experts=exact)
            return
        to_fake_quant(
            model,
            experts=exact,
            grid=cfg.qat_grid,
            scales=cfg.qat_scales,
            master_dtype=cfg.master_dtype,
            layers=layers,
        )


def train_layers(text, moe_layers: int) -> range:
    """``"A:B"`` (or ``[A, B]`` in a YAML config) -> ``range(A, B)``, checked against the model's ``moe_layers``
    (the error names ``--train-layers``)."""
    if isinstance(text, int):  # YAML 1.1 reads an unquoted 1:20 as the base-60 number 80
        raise QATError(f'train_layers: {text} is a number; write the range quoted ("A:B") or as a list [A, B]')
    if isinstance(text, list | tuple) and len(text) == 2:
        text = f"{text[0]}:{text[1]}"
    a, sep, b = str(text).partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise QATError(f"--train-layers {text!r}: expected A:B (the experts of MoE layers A <= i < B train)")
    a, b = int(a), int(b)
    if not 0 <= a < b <= moe_layers:
        raise QATError(f"--train-layers {text}: expected 0 <= A < B <= {moe_layers} (the model's MoE layers)")
    return range(a, b)


def update_router(router, load: jax.Array, rate: float):
    """The router state (the MoE stack's ``correction_bias [L, E]``) after :func:`~k25jax.train.step.router_bias_step`
    with the step's ``load [L, E]``."""
    flat = nnx.to_flat_state(router)
    if len(flat) != 1 or tuple(flat[0][1].shape) != tuple(load.shape):
        shapes = {module_path(p): tuple(v.shape) for p, v in flat}
        raise TrainingError(f"--router-bias-update: one correction bias of shape {tuple(load.shape)}, got {shapes}")
    ((path, var),) = flat
    return nnx.from_flat_state([(path, var.replace(router_bias_step(var.get_value(), load, rate)))])


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line, flushed) plus TensorBoard scalars."""

    def __init__(self, out: str, resume: bool):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(out, "metrics.jsonl")
        self.file = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115
        self.board = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, int | float):  # per-layer lists stay in the JSON lines
                self.board.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.board.close()


def _checkpointer(out: str, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(out), "checkpoints"), options=options)


def _save(manager, state: RunState, batches, cfg: FinetuneConfig) -> None:
    import orbax.checkpoint as ocp

    meta = {"step": state.step, "settings": _fingerprint(cfg)}
    manager.save(
        state.step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_tree(state)),
            data=ocp.args.JsonSave(batches.get_state()),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.wait_until_finished()


def _restore(manager, state: RunState, batches, cfg: FinetuneConfig) -> RunState:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    # The settings first: a checkpoint of other settings (another trainable set, QAT off) has another state tree,
    # and restoring that would fail inside orbax without saying which setting differs.
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["settings"] != _fingerprint(cfg):
        theirs, ours = meta["settings"], _fingerprint(cfg)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise TrainingError(f"--resume: the checkpoint in {cfg.out} was made with other settings: {differ}")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _tree(state))
    got = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    )
    batches.set_state(got["data"])
    restored = got["state"]
    rng = jax.random.wrap_key_data(restored["rng"])
    return RunState(restored["trainable"], restored["opt_state"], rng, step, restored.get("router"))


def _tree(state: RunState) -> dict:
    tree = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}
    if state.router is not None:
        tree["router"] = state.router
    return tree


def _fingerprint(cfg: FinetuneConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint (``steps`` may grow)."""
    keep = (
        "model data batch_size max_length lr warmup weight_decay clip_norm accumulate optimizer_state_dtype seed "
        "trainable qat_grid qat_scales master_dtype storage_dtype overlong dtype"
    ).split()
    # Added only when on, so checkpoints written before these settings existed still resume.
    if not cfg.qat:
        keep += ["qat"]
    if cfg.lora_rank:
        keep += ["lora_rank", "lora_alpha", "lora_experts"]
    if cfg.train_layers:
        keep += ["train_layers"]
    if cfg.router_bias_update:
        keep += ["router_bias_update"]
    return {k: getattr(cfg, k) for k in keep}


def _vision(model):
    """The vision config a batch's media layout needs (None for a text-only model)."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "vision", None)


def _as_device(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _batch_placer(mesh):
    """Host batches -> device arrays, split over the mesh's batch axes (train rules) when there is a mesh."""
    if mesh is None:
        return _as_device
    from jax.sharding import NamedSharding

    from k25jax.sharding import logical_spec

    def place(batch: dict) -> dict:
        # [B, T] arrays split over the batch axes; a media batch's vision layout (patch-major) is replicated
        return {
            k: jax.device_put(
                v,
                NamedSharding(
                    mesh,
                    logical_spec(
                        (None,) * v.ndim if k.startswith("vision_") else ("batch", "seq"), v.shape, mesh, "train"
                    ),
                ),
            )
            for k, v in batch.items()
        }

    return place


def evaluate(evaluator, trainable, frozen, batches) -> float:
    """Token-weighted mean loss over one pass of ``batches``."""
    total, tokens = 0.0, 0.0
    for batch in batches:
        out = evaluator(trainable, frozen, _as_device(batch))
        n = float(out["tokens"])
        total += float(out["loss"]) * n
        tokens += n
    return total / max(tokens, 1.0)


def held_out_loss(
    model, data, tokenizer, *, batch_size: int = 8, max_length: int = 512, storage_dtype: str | None = None
) -> float:
    """The token-weighted mean loss of ``model`` on the assistant tokens of ``data`` (a path or samples, as
    ``finetune`` reads them), one pass in order: e.g. a QAT and a PTQ export compared on held-out samples."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(r".*"), ...)
    batches = train_data.make_batches(
        data, tokenizer, batch_size=batch_size, max_length=max_length, seed=0, num_epochs=1, vision=_vision(model)
    )
    return evaluate(make_eval_step(graphdef, storage_dtype=storage_dtype), trainable, frozen, batches)


def finetune(cfg: FinetuneConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run ``cfg`` (module doc). Returns a summary: steps run, last loss, eval loss, paths written.

    ``on_step(step, values)``, when given, is called after every step with the values written to
    ``metrics.jsonl`` (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``eval_loss`` at eval steps, ...): a live
    loss curve in a notebook, early stopping (raise to stop; the checkpoints already saved stay)."""
    from tqdm.auto import tqdm

    cfg.check()
    model, tokenizer = load_for_training(cfg)
    vision = _vision(model)
    batches = train_data.make_batches(
        cfg.data,
        tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
        overlong=cfg.overlong,
        vision=vision,
    )
    eval_samples = None
    if cfg.eval_data:
        eval_samples = train_data.load_samples(cfg.eval_data)  # read (and rejected) before the first step
        train_data.make_batches(
            eval_samples, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=0, vision=vision
        )
    mesh = None
    if cfg.mesh:
        from k25jax.sharding import make_mesh, mesh_sizes, shard_model

        mesh = make_mesh(**mesh_sizes(cfg.mesh, jax.device_count()))
        model = shard_model(model, mesh, "train")
    prepared = prepare(model, cfg, mesh)
    graphdef, frozen = prepared.graphdef, prepared.frozen
    optimizer = cfg.optimizer()
    tx = optimizer.build()
    schedule = optimizer.schedule()
    state = RunState(prepared.trainable, tx.init(prepared.trainable), jax.random.key(cfg.seed), 0, prepared.router)
    os.makedirs(cfg.out, exist_ok=True)
    manager = _checkpointer(cfg.out, cfg.keep_checkpoints)
    if cfg.resume and manager.latest_step() is not None:
        state = _restore(manager, state, batches, cfg)
    elif not cfg.resume and manager.latest_step() is not None:
        raise TrainingError(f"{cfg.out} already holds checkpoints (up to step {manager.latest_step()}): pass --resume")
    step_fn = make_train_step(graphdef, tx, schedule, loss_fn=model_loss_with_load, storage_dtype=cfg.storage_dtype)
    update_bias = jax.jit(functools.partial(update_router, rate=cfg.router_bias_update))
    evaluator = make_eval_step(graphdef, storage_dtype=cfg.storage_dtype)
    log = MetricsLog(cfg.out, resume=cfg.resume)
    stats = batches.stats
    summary: dict[str, Any] = {
        "trainable": len(prepared.paths),
        "data": dataclasses.asdict(stats),
        "start_step": state.step,
    }
    if prepared.lora is not None:
        summary["lora"] = {"targets": prepared.lora.targets, "adapter_params": prepared.lora.adapter_params}
    last = {}
    bar = tqdm(total=cfg.steps, initial=state.step, desc="finetune", disable=not cfg.progress, unit="step")
    place = _batch_placer(mesh)
    try:
        while state.step < cfg.steps:
            batch = place(next(batches))
            t0 = time.perf_counter()
            with use_mesh(mesh):
                trainable, opt_state, metrics = step_fn(
                    state.trainable, state.opt_state, state.frozen_parts(frozen), batch
                )
            load = metrics.pop("expert_load", None)
            values = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - t0
            if not math.isfinite(values["loss"]):
                raise TrainingError(
                    f"step {state.step + 1}: the loss is {values['loss']}; stopping (the last good checkpoint in "
                    f"{os.path.join(cfg.out, 'checkpoints')} is step {manager.latest_step()})"
                )
            router = state.router
            if load is not None:
                if router is not None:
                    with use_mesh(mesh):
                        router = update_bias(router, load)
                values.update(load_stats(jax.device_get(load)))
            state = RunState(trainable, opt_state, jax.random.fold_in(state.rng, state.step), state.step + 1, router)
            values["tokens_per_s"] = float(np.sum(batch["segment_ids"] > 0)) / max(seconds, 1e-9)
            if eval_samples is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                eval_batches = train_data.make_batches(
                    eval_samples,
                    tokenizer,
                    batch_size=cfg.batch_size,
                    max_length=cfg.max_length,
                    seed=0,
                    num_epochs=1,
                    vision=vision,
                )
                values["eval_loss"] = evaluate(evaluator, state.trainable, state.frozen_parts(frozen), eval_batches)
            log.write(state.step, values)
            last = values
            bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                lr=f"{values.get('lr', 0):.2e}",
                gnorm=f"{values['grad_norm']:.3f}",
                tok_s=f"{values['tokens_per_s']:.0f}",
            )
            bar.update(1)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                _save(manager, state, batches, cfg)
            if on_step is not None:  # after the step's checkpoint: a callback that raises keeps it
                on_step(state.step, dict(values))
    finally:
        bar.close()
        log.close()
        manager.close()
    summary.update(steps=state.step, last=last, checkpoints=os.path.join(cfg.out, "checkpoints"))
    if cfg.export:
        trained = prepared.merge(_stored(state.trainable, cfg), state.router)
        summary["export"] = (
            export_lora(trained, cfg, tokenizer) if cfg.lora_rank else export_release(trained, cfg, tokenizer)
        )
    return summary


def trained_model(cfg: FinetuneConfig):
    """The model at the latest checkpoint of ``cfg.out`` as its forward computed (fake-quant experts, the other
    trainable parameters rounded to the storage dtype; a LoRA run's adapters on the INT4 experts, as
    :func:`~k25jax.train.lora.load_adapters` re-applies them): what ``export`` writes."""
    model, tokenizer = load_for_training(cfg)
    prepared = prepare(model, cfg)
    trainable = prepared.trainable
    optimizer = cfg.optimizer().build()
    manager = _checkpointer(cfg.out, cfg.keep_checkpoints)
    if manager.latest_step() is None:
        raise TrainingError(f"{cfg.out}: no checkpoint")
    state = RunState(trainable, optimizer.init(trainable), jax.random.key(cfg.seed), 0, prepared.router)
    batches = train_data.make_batches(
        cfg.data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, vision=_vision(model)
    )
    state = _restore(manager, state, batches, dataclasses.replace(cfg, resume=True))
    manager.close()
    return prepared.merge(_stored(state.trainable, cfg), state.router)


def _stored(trainable, cfg: FinetuneConfig):
    """The trainable parameters as the forward saw them (rounded to the storage dtype)."""
    from k25jax.train.step import storage_rounded

    return storage_rounded(trainable, cfg.storage_dtype)


EXPORTERS = "k25jax.exporters"  # entry-point group: a function (model, out, *, overwrite, progress) -> path
SIDE_FILES_SKIPPED = ("config.json", "model.safetensors.index.json")


def exporter():
    """The release writer registered under the ``k25jax.exporters`` entry point (``convert.to_release``)."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=EXPORTERS), key=lambda e: e.name)
    if not found:
        raise TrainingError(
            "--export needs a release writer: none is registered under the 'k25jax.exporters' entry point "
            "(install k25jax with its convert package: pip install -e .)"
        )
    return found[0].load()


def export_lora(model, cfg: FinetuneConfig, tokenizer) -> str:
    """A LoRA run's export at ``cfg.export``: ``lora_export="adapters"`` writes the adapters
    (:func:`~k25jax.train.lora.save_adapters`; the release itself is untouched, ``load_adapters`` re-applies them to
    it bit for bit); ``"merge"`` merges them into the experts re-quantized on ``qat_grid``
    (:func:`~k25jax.train.lora.merge_lora`, not exact) and writes that release (:func:`export_release`)."""
    from k25jax.train.lora import merge_lora, save_adapters

    if cfg.lora_export == "adapters":
        base = cfg.model if cfg.model in TINY_NAMES else os.path.abspath(cfg.model)
        return save_adapters(model, cfg.export, base_model=base)
    merge_lora(model, cfg.qat_grid)
    return export_release(model, cfg, tokenizer)


def export_release(model, cfg: FinetuneConfig, tokenizer) -> str:
    """Write ``model`` (fake-quant experts as their INT4 weights) as a release directory at ``cfg.export``, with
    the source's tokenizer and chat-template files (the embedded ones for ``tiny-random``)."""
    from importlib import resources

    to_int4(model)
    quantize_experts(model, cfg.qat_grid, float_only=True)  # a qat=False run's float experts: post-training
    out = exporter()(model, cfg.export, overwrite=True, progress=cfg.progress)
    if cfg.model == RANDOM:
        assets = resources.files("k25jax") / "assets"
        with resources.as_file(assets / "tiny_tiktoken.model") as p:
            shutil.copyfile(p, os.path.join(out, "tiktoken.model"))
        with resources.as_file(assets / "chat_template.jinja") as p:
            shutil.copyfile(p, os.path.join(out, "chat_template.jinja"))
    else:
        source = resolve(cfg.model)
        for name in sorted(os.listdir(source)):
            src = os.path.join(source, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in SIDE_FILES_SKIPPED:
                if not os.path.exists(os.path.join(out, name)):
                    shutil.copyfile(src, os.path.join(out, name))
    return out
