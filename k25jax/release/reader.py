"""Reading a release directory: ``config.json``, the safetensors shards and their index, with clear errors.

A release directory holds ``config.json``, ``model-000NN-of-000MM.safetensors`` shards and
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file); a single unsharded
``model.safetensors`` is accepted too. Headers are read without loading data.

Tensor data is read with ``pread`` at the offsets the header gives, whole or a block of rows at a time,
into fresh numpy buffers: no memory map of the (8.6 GB) shard stays resident, and the converters can stream
a 2.3 GB embedding in row blocks. A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}}`` with offsets relative to the end of the header) and
the raw little-endian tensor bytes; ``safetensors.safe_open`` validates the header, we add the offsets.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ReleaseError(ValueError):
    """A release directory is malformed. The message names the file and tensor at fault."""


class ReleaseCastWarning(UserWarning):
    """A float tensor is stored in a wider (or differently rounded) float dtype than the release uses and is
    rounded to the release dtype on load. The message names the files and tensors."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name (relative to the release directory)
    dtype: str  # safetensors dtype name: BF16, F32, I32, ...
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (index of the first dim); the whole tensor for a scalar."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


DTYPE_BYTES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

NUMPY_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES = {v: k for k, v in NUMPY_DTYPES.items()}
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})  # float tensors of these load into one another
# (stored, wanted) float pairs whose values convert exactly: every other float pair rounds
EXACT_FLOAT_CASTS = frozenset({("BF16", "F32"), ("BF16", "F64"), ("F16", "F32"), ("F16", "F64"), ("F32", "F64")})


def read_header(path: str) -> tuple[int, dict]:
    """``(data start offset, header dict)`` of a safetensors file; raises ReleaseError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ReleaseError(f"{path}: unreadable safetensors header (file is {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ReleaseError(f"{path}: unreadable safetensors header (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ReleaseError(f"{path}: unreadable safetensors header (not a JSON object)")
    return 8 + n, header


def pread_into(fd: int, buf: np.ndarray, offset: int, what: str) -> np.ndarray:
    """Fill the contiguous ``buf`` with the file bytes at ``offset`` (loops over short reads)."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ReleaseError(f"{what}: file ended after {done} of {len(view)} bytes")
        done += got
    return buf


class ReleaseReader:
    """Index and headers of a release directory; reads tensors shard by shard as numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fds: dict[str, int] = {}
        if not os.path.isdir(self.path):
            raise ReleaseError(f"{self.path}: not a directory")
        index_path = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    index = json.load(f)
            except json.JSONDecodeError as e:
                raise ReleaseError(f"{index_path}: invalid JSON ({e})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ReleaseError(f"{index_path}: no 'weight_map' object")
        elif os.path.exists(os.path.join(self.path, SINGLE_NAME)):
            weight_map = None
        else:
            raise ReleaseError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        for name in files:
            if not os.path.exists(os.path.join(self.path, name)):
                raise ReleaseError(f"{os.path.join(self.path, name)}: shard file named in {INDEX_NAME} is missing")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            for info in self._read_header(name):
                if info.name in self.tensors:
                    raise ReleaseError(
                        f"{self._p(name)}: tensor {info.name} also appears in {self.tensors[info.name].file}"
                    )
                self.tensors[info.name] = info
        if weight_map:
            for tensor, file in weight_map.items():
                found = self.tensors.get(tensor)
                if found is None:
                    raise ReleaseError(
                        f"{index_path}: tensor {tensor} is mapped to {file} but that file does not hold it"
                    )
                if found.file != file:
                    raise ReleaseError(f"{index_path}: tensor {tensor} is mapped to {file} but is in {found.file}")
            for tensor, info in self.tensors.items():
                if tensor not in weight_map:
                    raise ReleaseError(f"{self._p(info.file)}: tensor {tensor} is not in {INDEX_NAME}")

    def _p(self, file: str) -> str:
        return os.path.join(self.path, file)

    def _read_header(self, file: str) -> list[TensorInfo]:
        path = self._p(file)
        size = os.path.getsize(path)
        start, header = read_header(path)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        if ends and all(isinstance(e, int) for e in ends) and start + max(ends) > size:
            raise ReleaseError(
                f"{path}: truncated: header describes {max(ends)} bytes of tensor data, file holds {size - start}"
            )
        try:
            with safe_open(path, framework="numpy") as f:
                names = list(f.keys())
                out = []
                for n in names:
                    s = f.get_slice(n)
                    dtype, shape = s.get_dtype(), tuple(int(d) for d in s.get_shape())
                    out.append(TensorInfo(n, file, dtype, shape, DTYPE_BYTES.get(dtype, 0) * int(np.prod(shape))))
        except (SafetensorError, OSError, ValueError) as e:
            raise ReleaseError(f"{path}: unreadable safetensors header ({e})") from None
        placed = []
        for t in out:
            begin, end = header[t.name]["data_offsets"]
            if end - begin != t.nbytes or start + end > size:
                raise ReleaseError(f"{path}: tensor {t.name}: data offsets [{begin}, {end}] do not fit the file")
            placed.append(TensorInfo(t.name, t.file, t.dtype, t.shape, t.nbytes, start + begin))
        return placed

    def file_order(self, file: str) -> list[str]:
        """The tensor names of one shard in the order their data lies in the file."""
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: t.offset) if t.file == file]

    def file_metadata(self, file: str) -> dict | None:
        """The ``__metadata__`` string map of a shard's header (``{"format": "pt"}`` in the release), or None."""
        return read_header(self._p(file))[1].get("__metadata__")

    def read(self, name: str, rows: tuple[int, int] | None = None, buffer: np.ndarray | None = None) -> np.ndarray:
        """One tensor (or the rows ``[r0, r1)`` of its first dim) as a numpy array, read with ``pread``.

        Into a fresh array, or into ``buffer`` (uint8, exactly the bytes needed; see :meth:`nbytes`).
        """
        info = self.tensors[name]
        dtype = NUMPY_DTYPES.get(info.dtype)
        path = self._p(info.file)
        if dtype is None:
            raise ReleaseError(f"{path}: tensor {name} has dtype {info.dtype}, which k25jax does not read")
        shape, offset = info.shape, info.offset
        if rows is not None:
            r0, r1 = rows
            shape, offset = (r1 - r0, *info.shape[1:]), offset + r0 * info.row_bytes
        out = np.empty(shape, dtype) if buffer is None else buffer.view(dtype).reshape(shape)
        return pread_into(self._fd(info.file), out, offset, f"{path}: tensor {name}")

    def nbytes(self, name: str, rows: tuple[int, int] | None = None) -> int:
        info = self.tensors[name]
        return info.nbytes if rows is None else (rows[1] - rows[0]) * info.row_bytes

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Ask the kernel to start reading a tensor (or rows of it) now (``POSIX_FADV_WILLNEED``); no wait."""
        info = self.tensors[name]
        offset, length = info.offset, info.nbytes
        if rows is not None:
            offset, length = offset + rows[0] * info.row_bytes, (rows[1] - rows[0]) * info.row_bytes
        if hasattr(os, "posix_fadvise") and length:
            os.posix_fadvise(self._fd(info.file), offset, length, os.POSIX_FADV_WILLNEED)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(self._p(file), os.O_RDONLY)
            except OSError as e:
                raise ReleaseError(f"{self._p(file)}: cannot open ({e.strerror})") from None
            self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ReleaseReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file_bytes(self, file: str) -> int:
        return os.path.getsize(self._p(file))

    def iter_file(self, file: str, names: list[str] | None = None):
        """Yield ``(name, numpy array)`` for the tensors of one shard (all, or ``names`` in that order)."""
        path = self._p(file)
        try:
            with safe_open(path, framework="numpy") as f:
                for n in names if names is not None else list(f.keys()):
                    yield n, f.get_tensor(n)
        except (SafetensorError, OSError) as e:
            raise ReleaseError(f"{path}: cannot read tensor data ({e})") from None
