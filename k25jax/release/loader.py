"""Import a release directory into a k25jax model: host-side tensor by tensor, or straight onto a mesh.

Every tensor in the files is used exactly once: missing, unexpected, mis-shaped or mis-typed tensors raise
:class:`~k25jax.release.reader.ReleaseError` naming them (and their file). A float tensor stored in another float
dtype than the release uses (a correction bias saved as BF16 by ``save_pretrained`` of a bf16 model, say) is cast
to the release dtype as it is read: silently when the cast is exact, with one
:class:`~k25jax.release.reader.ReleaseCastWarning` naming the rounded tensors otherwise.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from k25jax.config import K25Config, RunConfig
from k25jax.model import K25, abstract_model
from k25jax.release.config import from_release_config
from k25jax.release.keymap import Entry, Source, release_entries
from k25jax.release.reader import (
    EXACT_FLOAT_CASTS,
    FLOAT_DTYPES,
    NUMPY_DTYPES,
    ReleaseCastWarning,
    ReleaseError,
    ReleaseReader,
)
from k25jax.sharding import local_bytes, local_shards, state_shardings

MAX_LISTED = 8


def _listing(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_tensors(reader: ReleaseReader, entries: list[Entry]) -> None:
    """Raise unless the files hold exactly the expected tensors with the expected shapes and dtypes."""
    expected = {s.name: s for e in entries for s in e.sources}
    missing = expected.keys() - reader.tensors.keys()
    if missing:
        raise ReleaseError(f"{reader.path}: missing tensors: {_listing(missing)}")
    unexpected = reader.tensors.keys() - expected.keys()
    if unexpected:
        files = sorted({reader.tensors[n].file for n in unexpected})
        raise ReleaseError(f"{reader.path}: unexpected tensors (in {', '.join(files)}): {_listing(unexpected)}")
    rounded = []
    for name, src in expected.items():
        info = reader.tensors[name]
        if info.shape != src.shape:
            raise ReleaseError(
                f"{os.path.join(reader.path, info.file)}: tensor {name} has shape {list(info.shape)}, "
                f"expected {list(src.shape)} from config.json"
            )
        if info.dtype == src.dtype:
            continue
        if info.dtype not in FLOAT_DTYPES or src.dtype not in FLOAT_DTYPES:  # integer data never converts
            raise ReleaseError(
                f"{os.path.join(reader.path, info.file)}: tensor {name} has dtype {info.dtype}, expected {src.dtype}"
            )
        if (info.dtype, src.dtype) not in EXACT_FLOAT_CASTS:
            rounded.append(f"{info.file}: tensor {name} ({info.dtype} -> {src.dtype})")
    if rounded:
        more = f" (and {len(rounded) - MAX_LISTED} more)" if len(rounded) > MAX_LISTED else ""
        warnings.warn(
            f"{reader.path}: float tensors stored in another dtype than the release uses are rounded to it on "
            f"load: {'; '.join(sorted(rounded)[:MAX_LISTED])}{more}",
            ReleaseCastWarning,
            stacklevel=2,
        )


def as_release_dtype(array: np.ndarray, source: Source) -> np.ndarray:
    """``array`` in the dtype the release uses for ``source`` (a float cast; :func:`check_tensors` vetted it)."""
    want = NUMPY_DTYPES[source.dtype]
    return array if array.dtype == want else array.astype(want)


def load_release(
    path: str | os.PathLike,
    run: RunConfig | None = None,
    *,
    progress: bool = True,
    config: K25Config | None = None,
) -> K25:
    """Load a release directory into a ready :class:`~k25jax.model.K25` (single host, unsharded).

    Args:
      path: release directory (``config.json`` + safetensors shards + index).
      run: how the model runs (:class:`~k25jax.config.RunConfig`: compute / parameter dtypes, kernels, ...).
      progress: show a progress bar over bytes read.

    INT4 experts land in :class:`~k25jax.quant.Int4Weight` parameters, repacked to the device layout tensor by
    tensor (never dequantized), so host memory and device memory hold ~0.56 bytes per expert value.
    """
    path = os.fspath(path)
    cfg = config or from_release_config(path)
    reader = ReleaseReader(path)
    entries = release_entries(cfg)
    check_tensors(reader, entries)

    model = abstract_model(cfg, run)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], int] = defaultdict(int)
    slots: dict[tuple[str, ...], int] = {}
    for e in entries:
        for t in e.targets:
            if t.path not in flat:
                raise KeyError(f"keymap target {'/'.join(t.path)} is not a parameter of the model")
            if t.path not in buffers:
                var = flat[t.path]
                buffers[t.path] = np.empty(var.shape, np.dtype(var.dtype))
                slots[t.path] = int(np.prod(var.shape[: len(t.index)], dtype=np.int64))

    by_source = {s.name: e for e in entries for s in e.sources}
    sources = {s.name: s for e in entries for s in e.sources}
    pending: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    total = sum(reader.file_bytes(f) for f in reader.files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="load release", disable=not progress) as bar:
        for file in reader.files:
            for name, array in reader.iter_file(file):
                entry = by_source[name]
                got = pending[id(entry)]
                got[name] = as_release_dtype(array, sources[name])
                if len(got) < len(entry.sources):
                    continue
                del pending[id(entry)]
                try:
                    values = entry.load([got[s.name] for s in entry.sources])
                except ValueError as err:
                    raise ReleaseError(f"{os.path.join(path, file)}: {err}") from None
                for target, value in zip(entry.targets, values, strict=True):
                    buf = buffers[target.path]
                    if value.shape != buf.shape[len(target.index) :]:
                        raise ReleaseError(
                            f"{os.path.join(path, file)}: tensor {name} maps to shape "
                            f"{list(value.shape)}, parameter {'/'.join(target.path)} expects "
                            f"{list(buf.shape[len(target.index) :])}"
                        )
                    buf[target.index] = value.astype(buf.dtype)
                    filled[target.path] += 1
            bar.update(reader.file_bytes(file))
    unfilled = [("/".join(p), filled[p], n) for p, n in slots.items() if filled[p] != n]
    if unfilled:  # cannot happen when check_tensors passed; kept as an internal consistency check
        raise ReleaseError(f"{path}: parameters left unfilled: {unfilled[:MAX_LISTED]}")
    unmapped = set(flat) - set(buffers)
    if unmapped:
        raise KeyError(f"model parameters with no release tensor: {sorted('/'.join(p) for p in unmapped)}")
    new_state = nnx.from_flat_state([(p, v.replace(jnp.asarray(buffers[p]))) for p, v in flat.items()])
    return nnx.merge(graphdef, new_state)


def host_arrays(model: K25) -> dict[tuple[str, ...], jax.Array]:
    """Flat ``{path: array}`` view of a model's parameters (handy in tests and converters)."""
    _, state = nnx.split(model)
    return {p: v.get_value() for p, v in nnx.to_flat_state(state)}


# --- straight onto a mesh -----------------------------------------------------------------------------------


def slot_map(entries: list[Entry]) -> dict[tuple[str, ...], dict[tuple[int, ...], tuple[Entry, int]]]:
    """``{param path: {stacked index: (entry, position of the param among the entry's targets)}}``."""
    out: dict = defaultdict(dict)
    for e in entries:
        for pos, t in enumerate(e.targets):
            out[t.path][t.index] = (e, pos)
    return out


def read_region(
    reader: ReleaseReader, slots: dict, shape: tuple[int, ...], region: tuple[slice, ...], dtype
) -> np.ndarray:
    """The block ``region`` (one slice per dim) of the parameter whose slots are ``slots``, read from the files.

    Each stacked slot in the region is read whole (then cut), except for row-mapped entries (plain transposes
    and copies, :attr:`~k25jax.release.keymap.Entry.row_axis`), of which only the needed source rows are read.
    """
    n = len(next(iter(slots)))
    bounds = [r.indices(size)[:2] for r, size in zip(region, shape, strict=True)]
    out = np.empty([b - a for a, b in bounds], dtype)
    for slot in itertools.product(*(range(a, b) for a, b in bounds[:n])):
        entry, pos = slots[slot]
        trailing = [slice(a, b) for a, b in bounds[n:]]
        if entry.row_axis is not None and trailing[entry.row_axis] != slice(0, shape[n + entry.row_axis]):
            rows = bounds[n + entry.row_axis]
            arrays = [as_release_dtype(reader.read(entry.sources[0].name, rows), entry.sources[0])]
            trailing[entry.row_axis] = slice(None)
        else:
            arrays = [as_release_dtype(reader.read(s.name), s) for s in entry.sources]
        try:
            value = entry.load(arrays)[pos]
        except ValueError as err:
            raise ReleaseError(f"{os.path.join(reader.path, reader.tensors[entry.key].file)}: {err}") from None
        out[tuple(i - a for i, (a, _) in zip(slot, bounds, strict=False))] = value[tuple(trailing)].astype(dtype)
    return out


def load_release_sharded(
    path: str | os.PathLike,
    mesh: Mesh,
    run: RunConfig | None = None,
    *,
    config: K25Config | None = None,
    progress: bool = True,
) -> K25:
    """Load a release directory straight onto ``mesh``: each parameter on its ``NamedSharding``.

    Per parameter, every distinct shard that this process's devices hold is assembled on the host from just
    the slices it needs (:func:`read_region`) and put on those devices; host memory holds one shard at a time.
    ``progress`` shows the bytes this process has placed.
    """
    path = os.fspath(path)
    cfg = config or from_release_config(path)
    entries = release_entries(cfg)
    model = abstract_model(cfg, run)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    shardings = {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, mesh, model.run.sharding))}
    slots = slot_map(entries)
    unmapped = set(flat) - set(slots)
    if unmapped:
        raise KeyError(f"model parameters with no release tensor: {sorted('/'.join(p) for p in unmapped)}")
    total = sum(local_bytes(var.shape, var.dtype, shardings[p]) for p, var in flat.items())
    arrays = {}
    with (
        ReleaseReader(path) as reader,
        tqdm(total=total, unit="B", unit_scale=True, desc="load release", disable=not progress) as bar,
    ):
        check_tensors(reader, entries)
        for p, var in flat.items():
            shape, pieces = tuple(var.shape), []
            for key, devices in local_shards(shape, shardings[p]).items():
                host = read_region(reader, slots[p], shape, tuple(slice(a, b) for a, b in key), np.dtype(var.dtype))
                pieces += [jax.device_put(host, d) for d in devices]
                bar.update(host.nbytes)
                del host
            arrays[p] = jax.make_array_from_single_device_arrays(shape, shardings[p], pieces)
    new_state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in flat.items()])
    return nnx.merge(graphdef, new_state)
