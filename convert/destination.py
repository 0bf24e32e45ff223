"""Output directories that are complete or clearly not: build in ``DST.partial``, rename at the very end.

A converter writes into ``DST.partial`` (a sibling of ``DST``), keeps a journal of finished work there and only
when everything is written and synced renames it to ``DST``. So ``DST`` exists only complete; a crash leaves
``DST.partial``, which a re-run with the same arguments resumes. Rules for an existing ``DST``:

- absent or an empty directory: fine;
- a complete output of the same kind (its marker file is present): an error unless ``overwrite``, and then it
  is replaced only at the end, by the new complete output;
- anything else (a non-empty directory that is not ours, a file): always an error; we never delete it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil

PARTIAL_SUFFIX = ".partial"
JOURNAL_NAME = ".k25jax-journal"
LOCK_NAME = ".k25jax-lock"


class DestinationError(ValueError):
    """The output path cannot be used. The message names it and says what to do."""


def fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Destination:
    """The lifecycle of one output directory ``path`` whose completeness is marked by the file ``marker``.

    ``open(header)`` prepares ``path.partial`` and returns the set of work keys finished by an earlier run with
    the same ``header`` (a JSON-able dict saying what is being produced: source, options, format version).
    ``commit(keys)`` makes finished work durable; ``finish()`` renames ``path.partial`` to ``path``.
    """

    def __init__(self, path: str | os.PathLike, marker: str, what: str, *, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.partial = self.path + PARTIAL_SUFFIX
        self.marker = marker
        self.what = what
        self.overwrite = overwrite
        self._journal = None
        self._lock_fd = None

    # --- checks ------------------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return os.path.isfile(os.path.join(self.path, self.marker))

    def check(self) -> None:
        """Raise :class:`DestinationError` unless ``path`` may be written (see the module docstring)."""
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise DestinationError(f"{p}: exists and is not a directory; refusing to write a {self.what} there")
        if os.path.isdir(p) and os.listdir(p):
            if not self.is_complete():
                found = sorted(os.listdir(p))[0]
                raise DestinationError(
                    f"{p}: directory is not empty and is not a k25jax {self.what} (found {found}); "
                    "choose another destination"
                )
            if not self.overwrite:
                raise DestinationError(f"{p}: a complete {self.what} is already there; pass --overwrite to replace it")
        if not os.path.isdir(os.path.dirname(p)):
            raise DestinationError(f"{os.path.dirname(p)}: parent directory of the destination does not exist")

    # --- journal -----------------------------------------------------------------------------------------------
    def open(self, header: dict) -> set[str]:
        """Create or resume ``path.partial``; return the keys a previous run with the same header finished."""
        self.check()
        header = json.loads(json.dumps(header))  # compare as the journal stores it (lists, not tuples)
        done: set[str] = set()
        journal = os.path.join(self.partial, JOURNAL_NAME)
        if os.path.exists(self.partial):
            previous = read_journal(journal)
            if previous is not None and previous[0] == header:
                done = previous[1]
            elif self.overwrite or previous is None and not _has_content(self.partial):
                shutil.rmtree(self.partial)
            else:
                why = "was started with other arguments or from another source" if previous else "has no journal"
                raise DestinationError(
                    f"{self.partial}: an unfinished {self.what} that {why}; pass --overwrite to discard it"
                )
        os.makedirs(self.partial, exist_ok=True)
        self._lock()
        if not done:
            with open(journal, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": header}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_path(self.partial)
        self._journal = open(journal, "a", encoding="utf-8")  # noqa: SIM115 (kept open until finish)
        return done

    def _lock(self) -> None:
        fd = os.open(os.path.join(self.partial, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DestinationError(f"{self.partial}: another k25jax process is writing it") from None
        self._lock_fd = fd

    def commit(self, keys: list[str], files: list[str] = ()) -> None:
        """Make ``files`` (written since the last commit) durable, then journal ``keys`` as finished."""
        dirs = set()
        for f in files:
            fsync_path(f)
            dirs.add(os.path.dirname(f))
        for d in dirs:
            fsync_path(d)
        if keys:
            self._journal.write(json.dumps({"done": keys}) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def finish(self) -> str:
        """Rename ``path.partial`` to ``path`` (replacing a complete old output). Returns ``path``."""
        self._journal.close()
        os.remove(os.path.join(self.partial, JOURNAL_NAME))
        os.remove(os.path.join(self.partial, LOCK_NAME))
        fsync_path(self.partial)
        old = None
        if os.path.isdir(self.path):
            if os.listdir(self.path):
                old = f"{self.path}.replaced-{os.getpid()}"
                os.rename(self.path, old)
            else:
                os.rmdir(self.path)
        os.rename(self.partial, self.path)
        fsync_path(os.path.dirname(self.path))
        if old:
            shutil.rmtree(old)
        self.close()
        return self.path

    def close(self) -> None:
        if self._journal is not None and not self._journal.closed:
            self._journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _has_content(path: str) -> bool:
    return any(n not in (JOURNAL_NAME, LOCK_NAME) for n in os.listdir(path))


def read_journal(path: str) -> tuple[dict, set[str]] | None:
    """``(header, finished keys)``; a last line cut short by a crash is ignored. None when there is no journal."""
    if not os.path.exists(path):
        return None
    header, done = None, set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last write: everything before it was synced
            if header is None:
                header = record.get("header")
            else:
                done.update(record.get("done", []))
    return (header, done) if header is not None else None
