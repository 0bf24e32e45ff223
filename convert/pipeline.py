"""The converter's pipeline parts: byte budgets, a buffer pool, the reader thread and the committer thread.

Stages (``convert.to_orbax``): one reader thread ``pread``\\ s units in file order, announcing the next
:data:`PREFETCH_BYTES` to the kernel so the disk always has work queued; worker threads transform a unit and
write its chunk files; the main thread retires units in order and hands finished entries to the committer
thread, which fsyncs their files and then journals them. numpy copies, ``pread`` and ``write`` release the GIL,
so the stages overlap on all cores.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from convert.orbax_format import aligned_empty
from k25jax.release.keymap import Entry
from k25jax.release.reader import ReleaseReader

PREFETCH_BYTES = 128 << 20  # source bytes announced to the kernel ahead of the reads (queue depth > 1)
POOL_BYTES = 256 << 20  # free buffers kept for reuse
POOL_MAX_BUFFER = 64 << 20  # bigger buffers are one-offs (a dense layer's 264 MB down_proj): not kept


@dataclass
class Unit:
    """One piece of work: an entry, or a block ``rows`` of its single source's rows."""

    entry: Entry
    rows: tuple[int, int] | None
    nbytes: int  # source bytes
    order: tuple[int, int]  # (file index, byte offset): units run in this order
    buffers: list = field(default_factory=list)  # pooled buffers holding its data until its writes are done


class Budget:
    """Bytes in flight for one pipeline stage; a unit bigger than the budget still passes alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self.cond.wait(0.1)
            self.used += n
            return not stop.is_set()

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class BufferPool:
    """Block-aligned buffers for reuse, by exact size (expert tensors repeat thousands of times).

    A fresh multi-MB numpy buffer costs the kernel a page fault and a zeroed page per page on first touch, as
    much system time as reading into it; aligned buffers let chunk files go out with ``O_DIRECT``.
    """

    def __init__(self, limit: int = POOL_BYTES):
        self.limit, self.free_bytes = limit, 0
        self.free: dict[int, list[np.ndarray]] = {}
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` (contents undefined)."""
        with self.lock:
            stack = self.free.get(nbytes)
            if stack:
                self.free_bytes -= nbytes
                return stack.pop()
        return aligned_empty(nbytes)

    def array(self, shape: tuple[int, ...], dtype, owner: list) -> np.ndarray:
        """An array view of a pooled buffer; the buffer is appended to ``owner`` (to be :meth:`put` back)."""
        dtype = np.dtype(dtype)
        buf = self.get(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        owner.append(buf)
        return buf.view(dtype).reshape(shape)

    def put(self, buffers: list[np.ndarray]) -> None:
        with self.lock:
            for b in buffers:
                if b.nbytes <= POOL_MAX_BUFFER and self.free_bytes + b.nbytes <= self.limit:
                    self.free.setdefault(b.nbytes, []).append(b)
                    self.free_bytes += b.nbytes


def read_unit(reader: ReleaseReader, unit: Unit, pool: BufferPool) -> list[np.ndarray]:
    """The unit's source arrays, read into pooled buffers (recorded in ``unit.buffers``)."""
    if unit.rows is not None:
        pieces = [(unit.entry.sources[0].name, unit.rows)]
    else:
        pieces = [(s.name, None) for s in unit.entry.sources]
    out = []
    for name, rows in pieces:
        buffer = pool.get(reader.nbytes(name, rows))
        unit.buffers.append(buffer)
        out.append(reader.read(name, rows, buffer))
    return out


def _prefetch(reader: ReleaseReader, unit: Unit) -> None:
    if unit.rows is not None:
        reader.prefetch(unit.entry.sources[0].name, unit.rows)
    else:
        for s in unit.entry.sources:
            reader.prefetch(s.name)


def reader_thread(reader, units, out: queue.Queue, budget: Budget, stop: threading.Event, pool: BufferPool) -> None:
    """Read ``units`` in order into ``out`` as ``(unit, arrays)``; ``(None, None)`` at the end, or the error."""
    ahead, ahead_bytes = 0, 0  # units [i, ahead) have been announced to the kernel
    try:
        for i, unit in enumerate(units):
            if ahead > i:
                ahead_bytes -= unit.nbytes
            else:
                ahead, ahead_bytes = i, 0
            while ahead < len(units) and ahead_bytes < PREFETCH_BYTES:
                _prefetch(reader, units[ahead])
                ahead_bytes += units[ahead].nbytes
                ahead += 1
            if not budget.acquire(unit.nbytes, stop):
                return
            out.put((unit, read_unit(reader, unit, pool)))
    except BaseException as e:  # handed to the main thread, which raises it
        out.put((None, e))
        return
    out.put((None, None))


class Committer(threading.Thread):
    """Makes finished work durable off the main thread: fsync the chunk files, then journal the entries.

    Commits run in submission order, so the journal only ever names entries whose files are synced.
    """

    def __init__(self, commit):
        super().__init__(daemon=True)
        self.commit = commit
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

    def submit(self, keys: list[str], files: list[str]) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put((list(keys), list(files)))

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            try:
                self.commit(*job)
            except BaseException as e:  # raised in the main thread by the next submit / finish
                self.error = e

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.is_alive():
            self.jobs.put(None)
