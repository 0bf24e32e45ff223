"""Loading models: from an orbax checkpoint written by ``k25jax convert``, or straight from a release directory.

A k25jax checkpoint is a plain orbax PyTree checkpoint of the model's parameter tree as a pure nested dict
(``nnx.to_pure_dict(nnx.state(model))``), with the release's ``config.json`` (and tokenizer files) beside it
and the marker file :data:`CHECKPOINT_MARKER` saying it is complete. With a mesh, orbax restores each array
straight onto its ``NamedSharding``: every process reads only the chunks covering its own devices' shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from k25jax.config import from_release_config
from k25jax.model import K25, abstract_model
from k25jax.sharding import state_shardings

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


def restore_checkpoint(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    strategy: str | Mapping = "inference",
    compute_dtype=jnp.bfloat16,
    param_dtype=None,
    kernels: str = "xla",
) -> K25:
    """Restore a k25jax checkpoint into a ready model, each array straight onto its sharding.

    Parameters are stored bf16 (INT4 experts as int32 words + bf16 scales, the correction bias float32);
    ``param_dtype`` (default: ``compute_dtype``) other than bf16 is a cast on read, per shard.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    cfg = from_release_config(path)
    model = abstract_model(cfg, dtype=compute_dtype, param_dtype=param_dtype, kernels=kernels)
    graphdef, state = nnx.split(model)
    target = restore_target(model, mesh, strategy)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
    )
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_model(
    path: str | os.PathLike,
    *,
    compute_dtype=jnp.bfloat16,
    param_dtype=None,
    progress: bool = True,
    kernels: str = "xla",
    mesh: Mesh | None = None,
    strategy: str | Mapping = "inference",
) -> K25:
    """Load a ready model from a k25jax checkpoint (``k25jax convert``) or a release directory.

    INT4 pack-quantized experts stay INT4 (:class:`~k25jax.quant.Int4Weight`, in the kernels' layout, never
    dequantized); plain experts stay plain. Other parameters default to the compute dtype. ``kernels``:
    ``"xla"`` | ``"pallas"`` (see :class:`~k25jax.model.K25`).

    With ``mesh`` (``k25jax.sharding.make_mesh``), every parameter lands on its ``NamedSharding`` under
    ``strategy``'s rules and each process reads only the slices its devices hold: from a checkpoint through
    orbax, from a release through ``safetensors`` reads of just those slices. Without a mesh the model is
    placed on the default device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_checkpoint(path):
        return restore_checkpoint(
            path, mesh=mesh, strategy=strategy, compute_dtype=compute_dtype, param_dtype=param_dtype, kernels=kernels
        )
    # The release reader lives in the converter package (the only place that knows release tensor names).
    from convert.from_release import load_release, load_release_sharded

    if mesh is not None:
        return load_release_sharded(
            path, mesh, strategy=strategy, dtype=compute_dtype, param_dtype=param_dtype, kernels=kernels
        )
    return load_release(path, dtype=compute_dtype, param_dtype=param_dtype, progress=progress, kernels=kernels)
