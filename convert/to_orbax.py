"""``k25jax convert``: a release directory -> an orbax checkpoint of the k25jax parameter tree, streamed.

Work is cut into *units*: one release entry (an INT4 expert projection's packed words + scales + shape, a
norm, ...) or a block of rows of a big one (the embedding and lm_head, in chunk-sized row blocks). Units run in
file order through a pipeline (``convert.pipeline``): a reader thread ``pread``\\ s the source bytes into pooled
buffers, worker threads apply the keymap's layout move (transposes with :func:`k25jax.transpose.transpose2d`,
reshapes, the INT4 nibble flip: never a dtype change, except a float tensor stored in another float dtype than the
release uses, which is cast to it as in the loader) and write the chunk files (``O_DIRECT`` from aligned
buffers), and the main thread retires units in order. The stages are bounded in bytes, so host memory stays at a
few times the largest unit whatever the model size.

Crash safety (``convert.destination``): the checkpoint is built in ``DST.partial``; finished entries are
journaled after their chunk files are fsync'd (in batches of :data:`COMMIT_BYTES`); a re-run with the same
arguments skips journaled entries and rewrites the others (chunk writes are whole-file and idempotent);
``DST`` appears, by a rename, only once every chunk is on disk and the metadata is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.destination import Destination
from convert.orbax_format import (
    RELEASE_INDEX,
    TMP_SUFFIX,
    ArraySpec,
    choose_chunks,
    write_chunks,
    write_orbax_metadata,
    write_zarray,
)
from convert.pipeline import Budget, BufferPool, Committer, Unit, reader_thread
from k25jax.checkpoint import CHECKPOINT_MARKER, FORMAT_VERSION
from k25jax.config import ConfigError, K25Config
from k25jax.model import abstract_model
from k25jax.quant import GROUP
from k25jax.release.config import from_release_config
from k25jax.release.keymap import Entry, release_entries
from k25jax.release.loader import as_release_dtype, check_tensors
from k25jax.release.reader import INDEX_NAME, ReleaseError, ReleaseReader
from k25jax.transpose import use_allocator

COMMIT_BYTES = 1 << 30  # fsync + journal at least every GiB of source data (and every COMMIT_SECONDS)
COMMIT_SECONDS = 10.0
MIN_BUDGET = 256 << 20  # bytes in flight per pipeline stage (or twice the largest unit, if more)
COPY_LIMIT = 256 << 20  # release side files (tokenizer, templates) up to this size are copied along


class ConvertError(ValueError):
    """A conversion cannot proceed. The message names the file and tensor at fault."""


def read_config(src: str) -> K25Config:
    """The release's config, checked for what the converter and the model support."""
    try:
        cfg = from_release_config(src)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    q = cfg.quantization
    if q is not None and q.group_size != GROUP:
        raise ConvertError(
            f"{os.path.join(src, 'config.json')}: quantization_config group_size {q.group_size} is not supported: "
            f"k25jax keeps INT4 experts packed on device with group size {GROUP} (the released models' value)"
        )
    return cfg


def checkpoint_specs(cfg: K25Config, entries: list[Entry]) -> dict[tuple[str, ...], ArraySpec]:
    """The checkpoint's arrays: one per model parameter (shape and dtype of the bf16 model), chunked per slot."""
    model = abstract_model(cfg)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    index_dims: dict[tuple[str, ...], int] = {}
    for e in entries:
        for t in e.targets:
            if t.path not in flat:
                raise KeyError(f"keymap target {'/'.join(t.path)} is not a parameter of the model")
            index_dims[t.path] = len(t.index)
    unmapped = set(flat) - set(index_dims)
    if unmapped:
        raise KeyError(f"model parameters with no release tensor: {sorted('/'.join(p) for p in unmapped)}")
    specs = {}
    for path, var in flat.items():
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        axes = var.get_metadata().get("out_sharding")
        chunks = choose_chunks(shape, dtype, index_dims[path], axes)
        specs[path] = ArraySpec(tuple(str(k) for k in path), shape, dtype, chunks, index_dims[path])
    return specs


def plan_units(reader: ReleaseReader, entries: list[Entry], specs) -> list[Unit]:
    """Units in the order their bytes lie in the files (the entry's biggest source decides)."""
    file_index = {f: i for i, f in enumerate(reader.files)}
    units = []
    for e in entries:
        infos = [reader.tensors[s.name] for s in e.sources]
        big = max(infos, key=lambda i: i.nbytes)
        order = (file_index[big.file], big.offset)
        total = sum(i.nbytes for i in infos)
        if e.row_axis is not None:
            spec = specs[e.targets[0].path]
            block = spec.chunks[spec.index_dims + e.row_axis]
            rows = infos[0].shape[0]
            if block < rows:
                for r0 in range(0, rows, block):
                    r1 = min(rows, r0 + block)
                    units.append(
                        Unit(e, (r0, r1), (r1 - r0) * big.row_bytes, (order[0], order[1] + r0 * big.row_bytes))
                    )
                continue
        units.append(Unit(e, None, total, order))
    units.sort(key=lambda u: u.order)
    return units


def source_fingerprint(reader: ReleaseReader) -> dict:
    """What identifies a source for resuming: its path, config and index bytes, its files' sizes and mtimes."""

    def digest(name):
        path = os.path.join(reader.path, name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    return {
        "path": os.path.abspath(reader.path),
        "config": digest("config.json"),
        "index": digest(INDEX_NAME),
        "files": {f: [reader.file_bytes(f), os.stat(os.path.join(reader.path, f)).st_mtime_ns] for f in reader.files},
    }


def _regions(unit: Unit, specs) -> list[tuple[tuple, ArraySpec]]:
    """The array region each target value of ``unit`` goes to (slot index, plus the row block if any)."""
    out = []
    for t in unit.entry.targets:
        spec = specs[t.path]
        trailing = [slice(None)] * (len(spec.shape) - spec.index_dims)
        if unit.rows is not None:
            trailing[unit.entry.row_axis] = slice(*unit.rows)
        out.append(((*t.index, *trailing), spec))
    return out


def _transform(unit: Unit, arrays, specs, reader: ReleaseReader) -> list[tuple[tuple, ArraySpec, np.ndarray]]:
    entry = unit.entry
    file = os.path.join(reader.path, reader.tensors[entry.key].file)
    # A float tensor stored in another float dtype than the release uses: cast as the loader does (check_tensors
    # vetted it and warned if it rounds). A row-block unit holds the first source only.
    arrays = [as_release_dtype(a, s) for a, s in zip(arrays, entry.sources, strict=False)]
    try:
        values = entry.load(arrays)
    except ValueError as err:
        raise ConvertError(f"{file}: {err}") from None
    out = []
    for (region, spec), value in zip(_regions(unit, specs), values, strict=True):
        expected = tuple(
            len(range(*r.indices(n))) for r, n in zip(region, spec.shape, strict=True) if isinstance(r, slice)
        )
        if value.shape != expected or value.dtype != spec.dtype:
            raise ConvertError(
                f"{file}: tensor {entry.key} maps to {value.dtype}{list(value.shape)}, parameter "
                f"{'/'.join(spec.path)} expects {spec.dtype}{list(expected)}"
            )
        out.append((region, spec, value))
    return out


def _copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the release's small non-weight files (config, tokenizer, templates) so the checkpoint stands alone,
    and its index as :data:`RELEASE_INDEX` (for export). Returns the side files' names (not the index)."""
    if os.path.exists(os.path.join(src, INDEX_NAME)):
        shutil.copyfile(os.path.join(src, INDEX_NAME), os.path.join(dst, RELEASE_INDEX))
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".safetensors") or name == INDEX_NAME or not os.path.isfile(path):
            continue
        if name.startswith(("_", ".")) or name in (CHECKPOINT_MARKER, RELEASE_INDEX):  # names the checkpoint uses
            continue
        if os.path.getsize(path) > COPY_LIMIT:
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def convert_release(
    src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, progress: bool = True, log=None
) -> dict:
    """Convert the release directory ``src`` into the orbax checkpoint ``dst``; returns a summary dict.

    Routed experts stay INT4 (repacked to the device layout), everything else keeps its release dtype (bf16;
    the correction bias float32). Raises :class:`~k25jax.release.reader.ReleaseError` / :class:`ConvertError` /
    :class:`~convert.destination.DestinationError` with one-line messages naming the file and tensor.
    """
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = read_config(src)
    reader = ReleaseReader(src)
    entries = release_entries(cfg)
    check_tensors(reader, entries)
    specs = checkpoint_specs(cfg, entries)
    units = plan_units(reader, entries, specs)
    dest = Destination(dst, CHECKPOINT_MARKER, "checkpoint", overwrite=overwrite)
    header = {"format": FORMAT_VERSION, "source": source_fingerprint(reader), "chunks": {}}
    header["chunks"] = {s.name: list(s.chunks) for s in specs.values()}
    done = dest.open(header)
    try:
        side_files = _copy_side_files(src, dest.partial)  # first: an unfinished DST.partial already has its config
        with reader:
            summary = _run(reader, units, specs, dest, done, progress, log)
        _finalize(dest, reader, specs, cfg, side_files, summary)
    finally:
        dest.close()
    return summary


# Transform + write threads: numpy copies and write syscalls release the GIL. The default is one more than the
# dev box's 2 cores so a thread blocked in an O_DIRECT write does not idle a core; raise it on bigger hosts.
WORKERS = int(os.environ.get("K25JAX_CONVERT_WORKERS", "3"))


def _process(unit: Unit, arrays, specs, reader: ReleaseReader, pool: BufferPool, root: str) -> list[str]:
    """Transform one unit (outputs in pooled buffers, recorded on the unit) and write its chunk files."""
    with use_allocator(lambda shape, dtype: pool.array(shape, dtype, unit.buffers)):
        writes = _transform(unit, arrays, specs, reader)
    files = []
    for region, spec, value in writes:
        files += write_chunks(root, spec, _full_region(region, spec), value)
    return files


def _run(reader, units, specs, dest: Destination, done: set[str], progress: bool, log) -> dict:
    for spec in specs.values():
        try:
            write_zarray(dest.partial, spec)
        except ValueError as e:
            raise ConvertError(f"{e}; pass --overwrite to start over") from None
    if done:
        _remove_stale_temp_files(dest.partial, specs)
    todo = [u for u in units if u.entry.key not in done]
    units_left: dict[str, int] = {}
    for u in todo:
        units_left[u.entry.key] = units_left.get(u.entry.key, 0) + 1
    total = sum(u.nbytes for u in units)
    skipped = total - sum(u.nbytes for u in todo)
    if done:
        log(f"k25jax convert: resuming {dest.partial}: {len(done)} tensor groups ({skipped / 2**30:.2f} GiB) done")
    biggest = max((u.nbytes for u in todo), default=0)
    read_budget, write_budget = Budget(max(MIN_BUDGET, 2 * biggest)), max(MIN_BUDGET, 2 * biggest)
    stop = threading.Event()
    inbox: queue.Queue = queue.Queue()
    pool = BufferPool()
    thread = threading.Thread(target=reader_thread, args=(reader, todo, inbox, read_budget, stop, pool), daemon=True)
    committer = Committer(dest.commit)
    workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="k25jax-convert")
    in_flight: deque = deque()  # (unit, future) in order
    state = {"bytes": 0, "keys": [], "files": [], "last": time.monotonic(), "outstanding": 0}
    bar = tqdm(
        total=total, initial=skipped, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress
    )

    def retire() -> None:
        unit, future = in_flight.popleft()
        state["files"] += future.result()  # raises the unit's error, if any
        state["outstanding"] -= unit.nbytes
        pool.put(unit.buffers)
        unit.buffers = []
        bar.update(unit.nbytes)
        state["bytes"] += unit.nbytes
        units_left[unit.entry.key] -= 1
        if units_left[unit.entry.key] == 0:
            state["keys"].append(unit.entry.key)
        if state["bytes"] >= COMMIT_BYTES or time.monotonic() - state["last"] > COMMIT_SECONDS:
            committer.submit(state["keys"], state["files"])
            state.update(bytes=0, keys=[], files=[], last=time.monotonic())

    def process(unit, arrays):
        try:
            return _process(unit, arrays, specs, reader, pool, dest.partial)
        finally:
            read_budget.release(unit.nbytes)

    start = time.perf_counter()
    thread.start()
    committer.start()
    try:
        while True:
            unit, arrays = inbox.get()
            if unit is None:
                if isinstance(arrays, BaseException):
                    raise arrays
                break
            in_flight.append((unit, workers.submit(process, unit, arrays)))
            state["outstanding"] += unit.nbytes
            while in_flight and (in_flight[0][1].done() or state["outstanding"] > write_budget):
                retire()
        while in_flight:
            retire()
        committer.submit(state["keys"], state["files"])
        committer.finish()
    finally:
        stop.set()
        workers.shutdown(wait=True, cancel_futures=True)
        committer.stop()
        bar.close()
    return {
        "source_bytes": total,
        "converted_bytes": total - skipped,
        "resumed_bytes": skipped,
        "seconds": time.perf_counter() - start,
        "entries": len(units_left) + len(done),
    }


def _full_region(region: tuple, spec: ArraySpec) -> tuple[slice, ...]:
    return tuple(slice(r, r + 1) if isinstance(r, int) else r for r in region) + (slice(None),) * (
        len(spec.shape) - len(region)
    )


def _remove_stale_temp_files(root: str, specs) -> None:
    """A write killed mid-way leaves its temporary file beside the chunk: drop them."""
    for spec in specs.values():
        folder = os.path.join(root, spec.name)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(folder, name))


def _check_complete(root: str, specs) -> None:
    for spec in specs.values():
        folder = os.path.join(root, spec.name)
        have = sum(1 for n in os.listdir(folder) if not n.startswith(".") and not n.endswith(TMP_SUFFIX))
        want = math.prod(spec.chunk_grid())
        if have != want:  # cannot happen when every entry was written; an internal consistency check
            raise ConvertError(f"{folder}: {have} chunk files, expected {want}")


def _finalize(dest: Destination, reader: ReleaseReader, specs, cfg: K25Config, copied: list[str], summary) -> None:
    root = dest.partial
    _check_complete(root, specs)
    copied_index = [RELEASE_INDEX] if os.path.exists(os.path.join(root, RELEASE_INDEX)) else []
    init_ns = time.time_ns()
    written = write_orbax_metadata(root, specs.values(), init_ns)
    marker = {
        "format": FORMAT_VERSION,
        "model": cfg.name,
        "tree": "nnx.to_pure_dict(nnx.state(model)) of k25jax.K25 (bf16 parameters, INT4 experts as packed/scales)",
        "release_files": copied,
        "source": {
            "path": reader.path,
            "shards": {f: {"metadata": reader.file_metadata(f), "tensors": reader.file_order(f)} for f in reader.files},
        },
        "arrays": {
            s.name: {"shape": list(s.shape), "dtype": str(s.dtype), "chunks": list(s.chunks)} for s in specs.values()
        },
    }
    with open(os.path.join(root, CHECKPOINT_MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    dest.commit([], [os.path.join(root, n) for n in copied + copied_index + written])
    dest.finish()
    summary["path"] = dest.path


__all__ = ["ConvertError", "ReleaseError", "checkpoint_specs", "convert_release", "plan_units"]
