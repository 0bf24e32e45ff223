"""Loading models: from an orbax checkpoint written by ``k25jax convert``, or straight from a release directory.

A k25jax checkpoint is a plain orbax PyTree checkpoint of the model's parameter tree as a pure nested dict
(``nnx.to_pure_dict(nnx.state(model))``), with the release's ``config.json`` (and tokenizer files) beside it
and the marker file :data:`CHECKPOINT_MARKER` saying it is complete. With a mesh, orbax restores each array
straight onto its ``NamedSharding``: every process reads only the chunks covering its own devices' shards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import jax
from flax import nnx, traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from k25jax.config import RunConfig
from k25jax.model import K25, abstract_model
from k25jax.release.config import from_release_config
from k25jax.release.loader import load_release, load_release_sharded
from k25jax.sharding import local_bytes, state_shardings

CHECKPOINT_MARKER = "k25jax_checkpoint.json"  # present only in a complete checkpoint
FORMAT_VERSION = 1


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CHECKPOINT_MARKER))


def restore_target(model: K25, mesh: Mesh | None = None, strategy: str | Mapping = "inference") -> dict:
    """The orbax restore target for an (abstract) model: a pure dict of ``jax.ShapeDtypeStruct`` with shardings.

    Without a mesh every array goes whole to the first device.
    """
    state = nnx.state(model)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    else:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh, strategy))
    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(state), shardings
    )


RESTORE_GROUP_BYTES = 4 << 30  # arrays are restored in groups of about this many bytes, for the progress bar


def restore_checkpoint(
    path: str | os.PathLike, run: RunConfig | None = None, *, mesh: Mesh | None = None, progress: bool = True
) -> K25:
    """Restore a k25jax checkpoint into a ready model, each array straight onto its sharding.

    Parameters are stored bf16 (INT4 experts as int32 words + bf16 scales, the correction bias float32);
    ``run.param_dtype`` (default: the compute dtype) other than bf16 is a cast on read, per shard; with a mesh the
    arrays are placed by ``run.sharding``'s rules. Arrays are
    restored in groups of about :data:`RESTORE_GROUP_BYTES` (orbax partial restores; each group's arrays in
    parallel) so that ``progress`` can show the bytes this process has read.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    path = os.path.abspath(os.fspath(path))
    cfg = from_release_config(path)
    run = run or RunConfig()
    model = abstract_model(cfg, run)
    graphdef, state = nnx.split(model)
    target = restore_target(model, mesh, run.sharding)
    leaves = [(p, a, local_bytes(a.shape, a.dtype, a.sharding)) for p, a in traverse_util.flatten_dict(target).items()]
    groups, size = [[]], 0
    for leaf in leaves:
        if size >= RESTORE_GROUP_BYTES:
            groups, size = [*groups, []], 0
        groups[-1].append(leaf)
        size += leaf[2]
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored: dict = {}
    with tqdm(total=sum(n for *_, n in leaves), unit="B", unit_scale=True, desc="restore", disable=not progress) as bar:
        for group in groups:
            item = traverse_util.unflatten_dict({p: a for p, a, _ in group})
            args = ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=len(groups) > 1,
            )
            with _ReadTicker(bar, sum(n for *_, n in group), enabled=progress):
                restored.update(traverse_util.flatten_dict(checkpointer.restore(path, args=args)))
    restored = traverse_util.unflatten_dict(restored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


class _ReadTicker:
    """Advances ``bar`` by up to ``nbytes`` while a group restores, from the bytes this process has read so far
    (``/proc/self/io``, Linux; elsewhere the bar moves once per group), then completes it exactly on exit. One
    stacked expert array of K2.5 is 169 GB: without this the bar would stand still for minutes."""

    def __init__(self, bar, nbytes: int, enabled: bool = True, interval: float = 0.5):
        self.bar, self.nbytes, self.interval = bar, nbytes, interval
        self.shown, self.lock, self.stop = 0, threading.Lock(), threading.Event()
        self.start = _bytes_read() if enabled else None
        self.thread = threading.Thread(target=self._run, daemon=True) if self.start is not None else None

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            now = _bytes_read()
            if now is None:
                return
            with self.lock:
                target = min(now - self.start, self.nbytes - 1)  # the last byte waits for the restore to return
                if target > self.shown:
                    self.bar.update(target - self.shown)
                    self.shown = target

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if exc[0] is None:
            with self.lock:
                self.bar.update(self.nbytes - self.shown)
        return False


def _bytes_read() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def load_model(
    path: str | os.PathLike, run: RunConfig | None = None, *, mesh: Mesh | None = None, progress: bool = True
) -> K25:
    """Load a ready model from a k25jax checkpoint (``k25jax convert``) or a release directory.

    ``run`` (:class:`~k25jax.config.RunConfig`, default bf16 compute and XLA kernels) says how the model runs.
    INT4 pack-quantized experts stay INT4 (:class:`~k25jax.quant.Int4Weight`, in the kernels' layout, never
    dequantized); plain experts stay plain. Other parameters are stored in ``run.param_dtype`` (default: the
    compute dtype).

    With ``mesh`` (``k25jax.sharding.make_mesh``), every parameter lands on its ``NamedSharding`` under
    ``run.sharding``'s rules and each process reads only the slices its devices hold: from a checkpoint through
    orbax, from a release through ``safetensors`` reads of just those slices. Without a mesh the model is
    placed on the default device. ``"tiny"`` is the shipped demo release (``k25jax/assets/demo``).
    """
    from k25jax.demo.shipped import resolve

    path = resolve(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_checkpoint(path):
        return restore_checkpoint(path, run, mesh=mesh, progress=progress)
    if mesh is not None:
        return load_release_sharded(path, mesh, run, progress=progress)
    return load_release(path, run, progress=progress)
