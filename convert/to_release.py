"""``k25jax export``: a checkpoint (or an in-memory model) -> the released format, streamed.

The output is what Moonshot ships: ``config.json``, ``model-000NN-of-000MM.safetensors`` shards and
``model.safetensors.index.json``; routed experts compressed-tensors pack-quantized (``weight_packed`` int32,
``weight_scale`` bf16, ``weight_shape``), the correction bias float32, everything else bf16.

Each shard's header is computed up front from the keymap (names, dtypes, shapes are known before any data), so
tensors are written with ``pwrite`` at their offsets as they are produced, entry by entry, big ones in row blocks:
memory stays at one entry (or block) whatever the model size. (``safetensors.save_file`` needs a whole shard in
memory, hence this writer of the documented format; ``safetensors.safe_open`` reads the result in the tests.)

Shard layout: a checkpoint made by ``k25jax convert`` remembers the release's layout (file names, the tensors of
each file in data order, the header ``__metadata__``), and export reproduces it, header bytes included, so the
files of an unmodified release come back byte for byte. Otherwise tensors are packed in keymap order into shards
of at most ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import numpy as np
import tensorstore as ts
from flax import nnx
from tqdm.auto import tqdm

from convert.destination import Destination
from convert.orbax_format import RELEASE_INDEX, read_array_specs, tensorstore_spec
from k25jax import quant
from k25jax.checkpoint import CHECKPOINT_MARKER, is_checkpoint
from k25jax.config import K25Config, QuantConfig
from k25jax.model import K25
from k25jax.release.config import from_release_config, to_release_config
from k25jax.release.keymap import Entry, Source, release_entries
from k25jax.release.reader import DTYPE_BYTES, INDEX_NAME, NUMPY_DTYPES

DEFAULT_SHARD_BYTES = 5 << 30
BLOCK_BYTES = 16 << 20  # row block size for streaming big tensors
WORKERS = 3  # entries produced and written at once (numpy copies and pwrite release the GIL)
BUDGET = 512 << 20  # bytes of entries in flight


class ExportError(ValueError):
    """An export cannot proceed. The message names the checkpoint array or parameter at fault."""


@dataclass(frozen=True)
class ShardPlan:
    file: str
    metadata: dict | None
    tensors: tuple[Source, ...]  # in data order


def source_nbytes(s: Source) -> int:
    return DTYPE_BYTES[s.dtype] * int(np.prod(s.shape, dtype=np.int64))


def plan_shards(entries: list[Entry], recorded: dict | None, max_shard_bytes: int) -> list[ShardPlan]:
    """The recorded layout of the source release when it names exactly our tensors, else packed in keymap order."""
    sources = {s.name: s for e in entries for s in e.sources}
    if recorded:
        names = [n for shard in recorded.values() for n in shard["tensors"]]
        if sorted(names) == sorted(sources):
            return [
                ShardPlan(f, shard.get("metadata"), tuple(sources[n] for n in shard["tensors"]))
                for f, shard in recorded.items()
            ]
    groups: list[list[Source]] = [[]]
    size = 0
    for e in entries:
        group_bytes = sum(source_nbytes(s) for s in e.sources)
        if groups[-1] and size + group_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1] += e.sources
        size += group_bytes
    n = len(groups)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", {"format": "pt"}, tuple(g)) for i, g in enumerate(groups)
    ]


def header_bytes(plan: ShardPlan) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of a shard (padded with spaces to 8 bytes) and each tensor's absolute offset."""
    header, offsets, pos = {}, {}, 0
    if plan.metadata is not None:
        header["__metadata__"] = plan.metadata
    for s in plan.tensors:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + source_nbytes(s)]}
        offsets[s.name] = pos
        pos += source_nbytes(s)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {k: start + v for k, v in offsets.items()}


# --- where the parameter values come from --------------------------------------------------------------------

SlotReader = Callable[[tuple[str, ...], tuple, tuple], np.ndarray]  # (path, stacked index, trailing region)


def checkpoint_reader(ckpt: str, cfg: K25Config, entries: list[Entry]) -> tuple[SlotReader, dict]:
    """Read slots of a k25jax checkpoint's arrays with tensorstore (only the chunks a slot covers).

    Returns the reader and, per array, the chunk shape of one slot (row blocks follow it).
    """
    from convert.to_orbax import checkpoint_specs

    expected = checkpoint_specs(cfg, entries)
    try:
        found = read_array_specs(ckpt, expected)
    except ValueError as e:
        raise ExportError(str(e)) from None
    for path, spec in expected.items():
        got = found[path]
        if (got.shape, got.dtype) != (spec.shape, spec.dtype):
            raise ExportError(
                f"{os.path.join(ckpt, spec.name)}: array is {got.dtype}{list(got.shape)}, "
                f"config.json implies {spec.dtype}{list(spec.shape)}"
            )
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    stores = {p: ts.open(tensorstore_spec(ckpt, s), open=True, context=context, read=True) for p, s in found.items()}
    stores = {p: f.result() for p, f in stores.items()}

    def read(path, index, region):
        return stores[path][(*index, *region)].read().result()

    return read, {p: found[p].chunks[s.index_dims :] for p, s in expected.items()}


HOST_COPY_BYTES = 64 * 2**20  # model_reader: arrays up to this size are sliced on the host


def model_reader(model: K25, cfg: K25Config) -> SlotReader:
    """Read slots of an in-memory model; float experts of a quantized ``cfg`` are quantized (release rule)."""
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    group = cfg.quantization.group_size if cfg.quantization else None
    cache: dict = {}  # (weight path, slot) -> [device words, device scales, parts not yet taken]
    lock = threading.Lock()
    host: dict = {}  # path -> the whole array on the host, for arrays of at most HOST_COPY_BYTES

    def sliced(path, key):
        """``flat[path][key]`` as a numpy array. A small, fully addressable array is copied to the host once and
        sliced there: slicing it on the device compiles an XLA program per slice shape (~50 ms each; 40 of them
        in a demo-model export). Large or sharded arrays are sliced on the device, so only the slot travels."""
        value = flat[path]
        if getattr(value, "is_fully_addressable", True) and value.nbytes <= HOST_COPY_BYTES:
            with lock:
                whole = host.get(path)
                if whole is None:
                    whole = host[path] = np.asarray(jax.device_get(value))
            return whole[key]
        return np.asarray(jax.device_get(value[key]))

    def int4_slot(base, index, part: int):
        with lock:
            hit = cache.get((base, index))
        if hit is None:
            w = np.asarray(sliced(base, index), np.float32)  # [K, N] = [in, out]
            q, scale = quant.quantize_release(np.ascontiguousarray(w.T), group, scale_dtype=NUMPY_DTYPES["BF16"])
            hit = [*quant.release_to_device(quant.pack_release(q), scale), 2]
            with lock:
                hit = cache.setdefault((base, index), hit)
        with lock:
            hit[2] -= 1
            if hit[2] == 0:  # both the words and the scales were taken: forget it
                cache.pop((base, index), None)
        return hit[part]

    def read(path, index, region):
        if path not in flat and path[-1] in ("packed", "scales") and path[:-1] in flat and group:
            return int4_slot(path[:-1], index, 0 if path[-1] == "packed" else 1)[region]
        if path not in flat:
            raise ExportError(f"model has no parameter {'/'.join(path)} (config {cfg.name!r} expects it)")
        return sliced(path, (*index, *region))

    return read


# --- the writer ----------------------------------------------------------------------------------------------


def _entry_order(entries: list[Entry], where: dict[str, tuple[int, int]]) -> list[Entry]:
    return sorted(entries, key=lambda e: min(where[s.name] for s in e.sources))


def write_release(
    read: SlotReader,
    cfg: K25Config,
    out: str | os.PathLike,
    *,
    config: dict | None = None,
    side_files: dict[str, str] | None = None,
    recorded: dict | None = None,
    index_file: str | None = None,
    row_blocks: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write the release of ``cfg`` with parameter values from ``read`` into ``out`` (built in ``out.partial``).

    ``recorded``: the source release's shard layout (kept when it names exactly the tensors of ``cfg``; then
    ``index_file``, the source's index, is copied verbatim). ``side_files``: ``{name: path}`` copied along.
    """
    entries = release_entries(cfg)
    plans = plan_shards(entries, recorded, max_shard_bytes)
    kept_layout = recorded is not None and [p.file for p in plans] == list(recorded)
    dest = Destination(out, INDEX_NAME, "release", overwrite=overwrite)
    dest.open({"export": True})
    try:
        where, fds, weight_map, total = {}, {}, {}, 0
        for i, plan in enumerate(plans):
            head, offsets = header_bytes(plan)
            path = os.path.join(dest.partial, plan.file)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            size = len(head) + sum(source_nbytes(s) for s in plan.tensors)
            os.ftruncate(fd, size)
            os.pwrite(fd, head, 0)
            fds[plan.file] = fd
            total += size - len(head)
            for s in plan.tensors:
                where[s.name] = (i, offsets[s.name])
                weight_map[s.name] = plan.file
        files = [p.file for p in plans]

        def write_entry(e: Entry) -> int:
            n = 0
            for name, offset, data in _entry_bytes(e, read, row_blocks):
                _pwrite_all(fds[files[where[name][0]]], data, where[name][1] + offset)
                n += len(data)
            return n

        with (
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress) as bar,
            ThreadPoolExecutor(WORKERS, thread_name_prefix="k25jax-export") as workers,
        ):
            pending: deque = deque()  # (future, bytes): at most BUDGET bytes of entries in flight
            in_flight = 0
            for e in _entry_order(entries, where):
                size = sum(source_nbytes(s) for s in e.sources)
                while pending and in_flight + size > BUDGET:
                    future, n = pending.popleft()
                    bar.update(future.result())
                    in_flight -= n
                pending.append((workers.submit(write_entry, e), size))
                in_flight += size
            for future, _ in pending:
                bar.update(future.result())
        for fd in fds.values():
            os.fsync(fd)
            os.close(fd)
        fds.clear()
        _write_json(os.path.join(dest.partial, "config.json"), config or to_release_config(cfg), indent=2)
        for name, src in (side_files or {}).items():
            if name not in ("config.json", INDEX_NAME):
                shutil.copyfile(src, os.path.join(dest.partial, name))
        if kept_layout and index_file and os.path.exists(index_file):
            shutil.copyfile(index_file, os.path.join(dest.partial, INDEX_NAME))
        else:
            total_size = sum(source_nbytes(s) for p in plans for s in p.tensors)
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(os.path.join(dest.partial, INDEX_NAME), index, indent=2)
        dest.commit([], [os.path.join(dest.partial, n) for n in os.listdir(dest.partial) if not n.startswith(".")])
        return dest.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
        dest.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _as_bytes(array: np.ndarray, source: Source) -> memoryview:
    want = NUMPY_DTYPES[source.dtype]
    if array.dtype != want:
        array = array.astype(want)  # a model's float32 parameters: round to the release dtype
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _entry_bytes(e: Entry, read: SlotReader, row_blocks: dict | None):
    """``(source name, byte offset within it, bytes)`` pieces of an entry's release tensors."""
    if e.row_axis is not None:
        src = e.sources[0]
        rows = src.shape[0]
        row_bytes = source_nbytes(src) // max(rows, 1)
        target = e.targets[0]
        if row_blocks and target.path in row_blocks:
            step = row_blocks[target.path][e.row_axis]  # the checkpoint's chunks: aligned reads
        else:
            step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        trailing = len(src.shape)  # a row-mapped slot has the rank of its source
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            region = [slice(None)] * trailing
            region[e.row_axis] = slice(r0, r1)
            (value,) = e.store([read(target.path, target.index, tuple(region))])
            yield src.name, r0 * row_bytes, _as_bytes(value, src)
        return
    values = [read(t.path, t.index, ()) for t in e.targets]
    for src, value in zip(e.sources, e.store(values), strict=True):
        if tuple(value.shape) != src.shape:
            raise ExportError(
                f"tensor {src.name}: parameter values give shape {list(value.shape)}, expected {list(src.shape)}"
            )
        yield src.name, 0, _as_bytes(value, src)


def _write_json(path: str, obj, indent=None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


# --- entry points --------------------------------------------------------------------------------------------


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write the release-format copy of the k25jax checkpoint ``ckpt`` into ``out``; returns ``out``."""
    ckpt = os.path.abspath(os.fspath(ckpt))
    if not is_checkpoint(ckpt):
        raise ExportError(f"{ckpt}: not a complete k25jax checkpoint (no {CHECKPOINT_MARKER})")
    with open(os.path.join(ckpt, CHECKPOINT_MARKER), encoding="utf-8") as f:
        marker = json.load(f)
    cfg = from_release_config(ckpt)
    entries = release_entries(cfg)
    read, chunks = checkpoint_reader(ckpt, cfg, entries)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    source = marker.get("source") or {}
    return write_release(
        read,
        cfg,
        out,
        config=config,
        side_files={n: os.path.join(ckpt, n) for n in marker.get("release_files", [])},
        recorded=source.get("shards"),
        index_file=os.path.join(ckpt, RELEASE_INDEX),
        row_blocks=chunks,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
    )


def export_model(
    model: K25,
    out: str | os.PathLike,
    *,
    quantization: QuantConfig | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write an in-memory model in the released format.

    INT4 experts are written as they are (bit-exact); float experts (after fine-tuning) are quantized with the
    release rule (``k25jax.quant.quantize_release``: group 32, ``scale = max|w| / 7.5`` in bf16) when the model's config
    (or ``quantization``) says the release is quantized, and written bf16 otherwise.
    """
    cfg = model.cfg if quantization is None else model.cfg.replace(quantization=quantization).validate()
    has_int4 = any(p[-1] == "packed" for p, _ in nnx.to_flat_state(nnx.state(model)))
    if has_int4 and cfg.quantization is None:
        raise ExportError("model has INT4 experts but the export config has no quantization_config")
    return write_release(
        model_reader(model, cfg), cfg, out, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress
    )
