"""Reading a release directory: ``config.json``, the safetensors shards and their index, with clear errors.

A release directory holds ``config.json``, ``model-000NN-of-000MM.safetensors`` shards and
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file); a single unsharded
``model.safetensors`` is accepted too. Headers are read without loading data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ReleaseError(ValueError):
    """A release directory is malformed. The message names the file and tensor at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name (relative to the release directory)
    dtype: str  # safetensors dtype name: BF16, F32, I32, ...
    shape: tuple[int, ...]
    nbytes: int


_DTYPE_BYTES = {
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


class ReleaseReader:
    """Index and headers of a release directory; reads tensors shard by shard as numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
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
        try:
            with safe_open(path, framework="numpy") as f:
                names = list(f.keys())
                out = []
                for n in names:
                    s = f.get_slice(n)
                    dtype, shape = s.get_dtype(), tuple(int(d) for d in s.get_shape())
                    out.append(TensorInfo(n, file, dtype, shape, _DTYPE_BYTES.get(dtype, 0) * int(np.prod(shape))))
        except (SafetensorError, OSError, ValueError) as e:
            raise ReleaseError(f"{path}: unreadable safetensors header ({e})") from None
        total = sum(t.nbytes for t in out)
        if total > size:
            raise ReleaseError(f"{path}: truncated: header describes {total} bytes of tensors, file is {size} bytes")
        return out

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
