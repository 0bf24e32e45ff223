"""The checkpoint on disk: a plain orbax PyTree checkpoint, written array slice by array slice with tensorstore.

Orbax saves a pytree as one array per leaf plus JSON metadata. Saving through orbax needs every array whole in
memory (a stacked expert weight of K2.5 is 169 GB), so the converter writes the same on-disk format itself:

- the tree is the model's parameter tree as a pure nested dict (``nnx.to_pure_dict(state)``: ``text`` ->
  ``moe_layers`` -> ``mlp`` -> ``experts`` -> ``gate_proj`` -> ``packed``); leaf ``a/b/c`` is stored in the
  directory ``a.b.c`` (orbax's parameter name);
- each leaf is a zarr v2 array (uncompressed; orbax's non-OCDBT layout, ``use_ocdbt: false``,
  ``use_zarr3: false``): a ``.zarray`` JSON file and one file per chunk ``i.j.k`` holding the raw
  little-endian bytes of that block in the array's order (edge chunks padded to the full chunk shape). The
  converter writes chunk files itself (:func:`write_chunks`: temporary file + rename, so a chunk is whole or
  absent) because tensorstore's writer cost ~6x more system time per byte on the dev box; tensorstore and
  orbax read them (``tests/test_convert.py`` restores with orbax's public checkpointers);
- chunks are in C order. (zarr's Fortran order would make a chunk of an ``[in, out]`` weight byte-identical to
  the release's ``[out, in]`` tensor and the conversion a plain copy, but tensorstore then transposes while
  decoding and restores of those arrays ran 3-5x slower on the dev box; restores are the frequent operation,
  so the converter transposes once instead, with :func:`k25jax.transpose.transpose2d`);
- ``_METADATA`` (the tree: key paths and per-leaf value metadata), ``array_metadatas/process_0`` and
  ``_CHECKPOINT_METADATA`` are written as orbax 0.12 writes them (pyproject.toml pins orbax-checkpoint to 0.12.x,
  the range tested; ``tests/test_orbax_format.py`` checks the installed version is in it).

Chunks are aligned to what the converter writes at once: one chunk per stacked slot (layer, expert) at most,
further split along the dims a sharding would split (vocabulary, heads, MLP widths: the dims the sharding
rules map to mesh axes) down to :data:`CHUNK_BYTES`, so a restore onto a mesh reads little beyond its shards.
Uncompressed, because INT4 words and bf16 weights hardly compress and the CPU time would cap the throughput.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from k25jax.sharding import INFERENCE_RULES, TRAIN_RULES

TMP_SUFFIX = ".k25tmp"  # a chunk being written; renamed when whole
RELEASE_INDEX = "release_index.json"  # the source release's index, kept for export
CHUNK_BYTES = 16 << 20  # target size of one chunk file (the 7.3 MB INT4 expert slot of K2.5 is one chunk)

_ZARR_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float32): "<f4",
    np.dtype(np.float16): "<f2",
    np.dtype(np.int32): "<i4",
    np.dtype(np.int8): "|i1",
    np.dtype(np.uint8): "|u1",
}
_FROM_ZARR = {v: k for k, v in _ZARR_DTYPES.items()}


@dataclass(frozen=True)
class ArraySpec:
    """One leaf of the checkpoint: its tree path, shape, dtype, chunk shape and number of stacked index dims."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    index_dims: int = 0  # leading dims indexed per slot (layer, expert): chunked one by one

    @property
    def name(self) -> str:
        """Orbax's parameter name: the directory of the array."""
        return ".".join(self.path)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def chunk_grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    def chunk_keys(self, region: tuple[slice, ...]) -> list[str]:
        """File names of the chunks a chunk-aligned ``region`` (one slice per dim) covers."""
        ranges = []
        for s, c, size in zip(region, self.chunks, self.shape, strict=True):
            start, stop, _ = s.indices(size)
            ranges.append(range(start // c, -(-stop // c)))
        keys = [""]
        for i, r in enumerate(ranges):
            keys = [f"{k}{'.' if i else ''}{j}" for k in keys for j in r]
        return keys


def _shard_priority(axis: str | None) -> int:
    """Lower = split first: dims some sharding strategy maps to a mesh axis."""
    if axis is not None and INFERENCE_RULES.get(axis) is not None:
        return 0
    if axis is not None and TRAIN_RULES.get(axis) is not None:
        return 1
    return 2


def choose_chunks(
    shape: tuple[int, ...], dtype, index_dims: int, axes: tuple[str | None, ...] | None = None, cap: int = CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunk shape: 1 along the ``index_dims`` leading dims, the slot halved along its shardable dims to ``cap``."""
    axes = tuple(axes) if axes else (None,) * len(shape)
    chunks = [1] * index_dims + list(shape[index_dims:])
    itemsize = np.dtype(dtype).itemsize
    while math.prod(chunks) * itemsize > cap:
        candidates = [d for d in range(index_dims, len(shape)) if chunks[d] % 2 == 0 and chunks[d] >= 16]
        if not candidates:
            break
        d = min(candidates, key=lambda d: (_shard_priority(axes[d]), -chunks[d]))
        chunks[d] //= 2
    return tuple(max(1, c) for c in chunks)


def zarr_dtype(dtype) -> str:
    try:
        return _ZARR_DTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no zarr encoding in k25jax checkpoints") from None


def zarr_metadata(spec: ArraySpec) -> dict:
    return {
        "chunks": list(spec.chunks),
        "compressor": None,
        "dimension_separator": ".",
        "dtype": zarr_dtype(spec.dtype),
        "fill_value": None,
        "filters": None,
        "order": "C",
        "shape": list(spec.shape),
        "zarr_format": 2,
    }


def tensorstore_spec(root: str, spec: ArraySpec) -> dict:
    return {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(root, spec.name) + "/"},
        "metadata": zarr_metadata(spec),
    }


def write_zarray(root: str, spec: ArraySpec) -> None:
    """Create the array directory and its ``.zarray`` (idempotent; an existing different one is an error)."""
    folder = os.path.join(root, spec.name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".zarray")
    meta = zarr_metadata(spec)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) == meta:
                return
        raise ValueError(f"{path}: array metadata differs from what this conversion writes")
    with open(path + TMP_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(meta, f, sort_keys=True, separators=(",", ":"))
    os.replace(path + TMP_SUFFIX, path)


def _raw_bytes(block: np.ndarray) -> memoryview:
    """The C-order bytes of ``block`` (no copy when it is contiguous)."""
    return memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))


def write_chunks(root: str, spec: ArraySpec, region: tuple[slice, ...], value: np.ndarray) -> list[str]:
    """Write the chunk files covering the chunk-aligned ``region`` (one slice per dim) from ``value``.

    ``value`` has the region's shape (any strides). Each chunk goes to a temporary file renamed into place.
    Returns the chunk file paths.
    """
    folder = os.path.join(root, spec.name)
    bounds = [s.indices(n)[:2] for s, n in zip(region, spec.shape, strict=True)]
    grids = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, spec.chunks, strict=True)]
    value = value.reshape([b - a for a, b in bounds])
    written = []
    for idx in itertools.product(*grids):
        lo = [i * c for i, c in zip(idx, spec.chunks, strict=True)]
        hi = [min(n, a + c) for a, c, n in zip(lo, spec.chunks, spec.shape, strict=True)]
        block = value[tuple(slice(a - b0, h - b0) for a, h, (b0, _) in zip(lo, hi, bounds, strict=True))]
        if block.shape != spec.chunks:  # an edge chunk: zarr v2 stores it padded to the full chunk shape
            full = np.zeros(spec.chunks, block.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        path = os.path.join(folder, ".".join(str(i) for i in idx))
        _write_file(path, _raw_bytes(block))
        written.append(path)
    return written


DIRECT_ALIGN = 4096  # O_DIRECT needs the memory address, file offset and length aligned to the block size
_direct = {"ok": hasattr(os, "O_DIRECT")}


def _address(data: memoryview) -> int:
    return np.frombuffer(data, np.uint8).ctypes.data if len(data) else 0


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _write_file(path: str, data: memoryview) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename.

    Block-aligned data goes with ``O_DIRECT`` (straight from our buffer to the disk: on the dev box 2.4x the
    throughput of page-cache writes plus fsync, and no dirty pages piling up); the unaligned rest, or all of it
    where the filesystem refuses ``O_DIRECT``, through the page cache.
    """
    tmp = path + TMP_SUFFIX
    head = len(data) - len(data) % DIRECT_ALIGN
    direct = _direct["ok"] and head and _address(data) % DIRECT_ALIGN == 0
    if direct:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:
            _direct["ok"] = direct = False
        else:
            try:
                _write_all(fd, data[:head], 0)
            except OSError:  # e.g. EINVAL: the filesystem takes O_DIRECT opens but not writes
                _direct["ok"] = direct = False
            finally:
                os.close(fd)
    start = head if direct else 0
    if start < len(data) or not direct:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (0 if direct else os.O_TRUNC), 0o644)
        try:
            _write_all(fd, data[start:], start)
        finally:
            os.close(fd)
    os.replace(tmp, path)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data starts on a :data:`DIRECT_ALIGN` boundary."""
    raw = np.empty(nbytes + DIRECT_ALIGN, np.uint8)
    skip = -raw.ctypes.data % DIRECT_ALIGN
    return raw[skip : skip + nbytes]


def read_array_specs(root: str, names: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], ArraySpec]:
    """The arrays of a checkpoint from their ``.zarray`` files (no data read)."""
    out = {}
    for path in names:
        name = ".".join(path)
        meta_path = os.path.join(root, name, ".zarray")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: unreadable array metadata ({e})") from None
        dtype = _FROM_ZARR.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"{meta_path}: dtype {meta.get('dtype')!r} is not one k25jax writes")
        out[path] = ArraySpec(path, tuple(meta["shape"]), dtype, tuple(meta["chunks"]))
    return out


def tree_paths(root: str) -> list[tuple[str, ...]]:
    """The leaf key paths recorded in a checkpoint's orbax ``_METADATA``."""
    meta_path = os.path.join(root, "_METADATA")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        return [tuple(k["key"] for k in leaf["key_metadata"]) for leaf in meta["tree_metadata"].values()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: unreadable orbax tree metadata ({e})") from None


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_orbax_metadata(root: str, specs: Iterable[ArraySpec], init_ns: int) -> list[str]:
    """Write orbax's metadata files for ``specs`` (as orbax 0.12.8 writes them); return the files written."""
    specs = list(specs)
    tree = {}
    for s in specs:
        tree[str(tuple(s.path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in s.path],  # 2: a dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(s.chunks)},
        }
    files = {
        "_METADATA": {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        },
        os.path.join("array_metadatas", "process_0"): {
            "array_metadatas": [
                {
                    "array_metadata": {
                        "param_name": s.name,
                        "write_shape": list(s.chunks),
                        "chunk_shape": list(s.chunks),
                        "ext_metadata": None,
                    }
                }
                for s in specs
            ]
        },
        "_CHECKPOINT_METADATA": {
            "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": init_ns,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        },
    }
    for rel, obj in files.items():
        _write_json(os.path.join(root, rel), obj)
    return list(files)
