"""``k25jax finetune``: the whole fine-tuning run, from a model and chat data to checkpoints, metrics and an export.

:class:`FinetuneConfig` holds every setting (a YAML file under ``configs/qat/`` plus command-line flags on top);
:func:`finetune` runs it:

1. everything is checked before the first step: the model loads, the data (and eval data) read and tokenize
   (:class:`~k25jax.train.data.DataError` names the file and line), the trainable pattern matches something;
2. the routed experts whose masters the pattern trains become fake-quant weights (:mod:`k25jax.train.qat`); the
   rest stay INT4-packed; optimizer state exists for the trainable leaves only;
3. steps run jitted with the state donated; a tqdm bar shows loss, lr, grad norm and tokens/s; metrics go to
   ``OUT/metrics.jsonl`` and TensorBoard event files in ``OUT/tensorboard``; eval loss at intervals;
4. an orbax ``CheckpointManager`` in ``OUT/checkpoints`` keeps parameters, optimizer state, the data position,
   the RNG key and the step (written atomically by orbax); ``resume=True`` continues from the latest up to
   ``steps`` in total, bit for bit as if never interrupted;
5. a NaN or infinite loss stops the run with :class:`TrainingError`; the last good checkpoint stays;
6. ``export`` writes a complete release directory (config, index, shards, tokenizer and chat-template files) with
   the fake-quant experts as the INT4 weights they stand for, through the exporter registered under the
   ``k25jax.exporters`` entry point (the ``convert`` package's; the library never imports it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25jax.config import RunConfig
from k25jax.sharding import use_mesh
from k25jax.train import data as train_data
from k25jax.train.qat import QATError, to_fake_quant, to_int4, trainable_filter, trainable_paths
from k25jax.train.step import OptimizerConfig, make_eval_step, make_train_step, split_model


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
    lora_rank: int = 0
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
        if self.lora_rank:
            raise QATError("--lora-rank: LoRA runs through k25jax.train.lora (not wired into finetune yet)")


@dataclasses.dataclass
class RunState:
    """What one step changes, and what a checkpoint holds."""

    trainable: Any
    opt_state: Any
    rng: jax.Array
    step: int


def load_for_training(cfg: FinetuneConfig):
    """The model (``'tiny'`` or a release / checkpoint directory) and its tokenizer."""
    import k25jax
    from k25jax.tokenizer import Tokenizer

    run = cfg.run_config()
    if cfg.model == "tiny":
        return k25jax.build_model(k25jax.preset("tiny"), run, seed=cfg.seed), Tokenizer.tiny()
    if not os.path.isdir(cfg.model):
        raise QATError(f"--model {cfg.model}: no such directory (a release or k25jax checkpoint, or 'tiny')")
    return k25jax.load_model(cfg.model, run, progress=cfg.progress), Tokenizer.from_pretrained(cfg.model)


def prepare(model, cfg: FinetuneConfig):
    """Fake-quant the routed experts whose masters the trainable pattern selects (``.../experts/gate_proj/master``);
    return ``(graphdef, trainable, frozen, trainable paths)``. A pattern that trains nothing is an error."""
    import re

    from k25jax.moe import Experts
    from k25jax.train.qat import module_path

    regex = re.compile(cfg.trainable)
    chosen = [
        f"{module_path(path)}/{name}"
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Experts)
        for name in Experts.WEIGHTS
        if regex.search(f"{module_path(path)}/{name}/master")
    ]
    if chosen:
        exact = "|".join("^" + re.escape(p) + "$" for p in chosen)
        to_fake_quant(model, experts=exact, grid=cfg.qat_grid, scales=cfg.qat_scales, master_dtype=cfg.master_dtype)
    flt = trainable_filter(cfg.trainable)
    paths = trainable_paths(model, flt)
    if not paths:
        raise QATError(f"--trainable {cfg.trainable!r} matches no trainable parameter of model {cfg.model!r}")
    graphdef, trainable, frozen = split_model(model, flt)
    return graphdef, trainable, frozen, paths


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

    tree = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}
    meta = {"step": state.step, "settings": _fingerprint(cfg)}
    manager.save(
        state.step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            data=ocp.args.JsonSave(batches.get_state()),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.wait_until_finished()


def _restore(manager, state: RunState, batches, cfg: FinetuneConfig) -> RunState:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    tree = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
    got = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        ),
    )
    if got["meta"]["settings"] != _fingerprint(cfg):
        theirs, ours = got["meta"]["settings"], _fingerprint(cfg)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise TrainingError(f"--resume: the checkpoint in {cfg.out} was made with other settings: {differ}")
    batches.set_state(got["data"])
    restored = got["state"]
    return RunState(restored["trainable"], restored["opt_state"], jax.random.wrap_key_data(restored["rng"]), step)


def _fingerprint(cfg: FinetuneConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint (``steps`` may grow)."""
    keep = (
        "model data batch_size max_length lr warmup weight_decay clip_norm accumulate optimizer_state_dtype seed "
        "trainable qat_grid qat_scales master_dtype storage_dtype overlong dtype"
    ).split()
    return {k: getattr(cfg, k) for k in keep}


def _as_device(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _batch_placer(mesh):
    """Host batches -> device arrays, split over the mesh's batch axes (train rules) when there is a mesh."""
    if mesh is None:
        return _as_device
    from jax.sharding import NamedSharding

    from k25jax.sharding import logical_spec

    def place(batch: dict) -> dict:
        return {
            k: jax.device_put(v, NamedSharding(mesh, logical_spec(("batch", "seq"), v.shape, mesh, "train")))
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


def finetune(cfg: FinetuneConfig) -> dict:
    """Run ``cfg`` (module doc). Returns a summary: steps run, last loss, eval loss, paths written."""
    from tqdm.auto import tqdm

    cfg.check()
    model, tokenizer = load_for_training(cfg)
    batches = train_data.make_batches(
        cfg.data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed, overlong=cfg.overlong
    )
    eval_samples = None
    if cfg.eval_data:
        eval_samples = train_data.load_samples(cfg.eval_data)  # read (and rejected) before the first step
        train_data.make_batches(eval_samples, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=0)
    mesh = None
    if cfg.mesh:
        from k25jax.sharding import make_mesh, mesh_sizes, shard_model

        mesh = make_mesh(**mesh_sizes(cfg.mesh, jax.device_count()))
        model = shard_model(model, mesh, "train")
    graphdef, trainable, frozen, paths = prepare(model, cfg)
    optimizer = cfg.optimizer()
    tx = optimizer.build()
    schedule = optimizer.schedule()
    state = RunState(trainable, tx.init(trainable), jax.random.key(cfg.seed), 0)
    os.makedirs(cfg.out, exist_ok=True)
    manager = _checkpointer(cfg.out, cfg.keep_checkpoints)
    if cfg.resume and manager.latest_step() is not None:
        state = _restore(manager, state, batches, cfg)
    elif not cfg.resume and manager.latest_step() is not None:
        raise TrainingError(f"{cfg.out} already holds checkpoints (up to step {manager.latest_step()}): pass --resume")
    step_fn = make_train_step(graphdef, tx, schedule, storage_dtype=cfg.storage_dtype)
    evaluator = make_eval_step(graphdef, storage_dtype=cfg.storage_dtype)
    log = MetricsLog(cfg.out, resume=cfg.resume)
    stats = batches.stats
    summary: dict[str, Any] = {"trainable": len(paths), "data": dataclasses.asdict(stats), "start_step": state.step}
    last = {}
    bar = tqdm(total=cfg.steps, initial=state.step, desc="finetune", disable=not cfg.progress, unit="step")
    place = _batch_placer(mesh)
    try:
        while state.step < cfg.steps:
            batch = place(next(batches))
            t0 = time.perf_counter()
            with use_mesh(mesh):
                trainable, opt_state, metrics = step_fn(state.trainable, state.opt_state, frozen, batch)
            values = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - t0
            if not math.isfinite(values["loss"]):
                raise TrainingError(
                    f"step {state.step + 1}: the loss is {values['loss']}; stopping (the last good checkpoint in "
                    f"{os.path.join(cfg.out, 'checkpoints')} is step {manager.latest_step()})"
                )
            state = RunState(trainable, opt_state, jax.random.fold_in(state.rng, state.step), state.step + 1)
            values["tokens_per_s"] = float(np.sum(batch["segment_ids"] > 0)) / max(seconds, 1e-9)
            if eval_samples is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                eval_batches = train_data.make_batches(
                    eval_samples, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=0, num_epochs=1
                )
                values["eval_loss"] = evaluate(evaluator, state.trainable, frozen, eval_batches)
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
    finally:
        bar.close()
        log.close()
        manager.close()
    summary.update(steps=state.step, last=last, checkpoints=os.path.join(cfg.out, "checkpoints"))
    if cfg.export:
        trained = nnx.merge(graphdef, _stored(state.trainable, cfg), frozen)
        summary["export"] = export_release(trained, cfg, tokenizer)
    return summary


def trained_model(cfg: FinetuneConfig):
    """The model at the latest checkpoint of ``cfg.out`` as its forward computed (fake-quant experts, the other
    trainable parameters rounded to the storage dtype): what ``export`` writes."""
    model, tokenizer = load_for_training(cfg)
    graphdef, trainable, frozen, _ = prepare(model, cfg)
    optimizer = cfg.optimizer().build()
    manager = _checkpointer(cfg.out, cfg.keep_checkpoints)
    if manager.latest_step() is None:
        raise TrainingError(f"{cfg.out}: no checkpoint")
    state = RunState(trainable, optimizer.init(trainable), jax.random.key(cfg.seed), 0)
    batches = train_data.make_batches(
        cfg.data, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed
    )
    state = _restore(manager, state, batches, dataclasses.replace(cfg, resume=True))
    manager.close()
    return nnx.merge(graphdef, _stored(state.trainable, cfg), frozen)


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


def export_release(model, cfg: FinetuneConfig, tokenizer) -> str:
    """Write ``model`` (fake-quant experts as their INT4 weights) as a release directory at ``cfg.export``, with
    the source's tokenizer and chat-template files (the embedded ones for ``tiny``)."""
    from importlib import resources

    to_int4(model)
    out = exporter()(model, cfg.export, overwrite=True, progress=cfg.progress)
    if cfg.model == "tiny":
        assets = resources.files("k25jax") / "assets"
        with resources.as_file(assets / "tiny_tiktoken.model") as p:
            shutil.copyfile(p, os.path.join(out, "tiktoken.model"))
        with resources.as_file(assets / "chat_template.jinja") as p:
            shutil.copyfile(p, os.path.join(out, "chat_template.jinja"))
    else:
        for name in sorted(os.listdir(cfg.model)):
            src = os.path.join(cfg.model, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in SIDE_FILES_SKIPPED:
                if not os.path.exists(os.path.join(out, name)):
                    shutil.copyfile(src, os.path.join(out, name))
    return out
