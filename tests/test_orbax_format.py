"""The chunk writer: files tensorstore (and so orbax) reads back exactly, whole-or-absent, O_DIRECT and not."""

import os

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from convert.orbax_format import (
    DIRECT_ALIGN,
    TMP_SUFFIX,
    ArraySpec,
    aligned_empty,
    tensorstore_spec,
    write_chunks,
    write_zarray,
)


@pytest.mark.parametrize(
    "shape, chunks, dtype",
    [
        ((2, 3, 1024, 8), (1, 1, 1024, 8), np.int32),  # one 32 KiB chunk per slot: O_DIRECT, no tail
        ((2, 1000, 7), (1, 1000, 7), ml_dtypes.bfloat16),  # 14000-byte chunks: O_DIRECT head + page-cache tail
        ((5, 300), (2, 128), np.float32),  # edge chunks, padded to the chunk shape on disk
        ((4,), (4,), np.float32),  # tiny: page cache only
    ],
)
def test_chunks_read_back_exactly(tmp_path, shape, chunks, dtype):
    spec = ArraySpec(("a", "b"), shape, np.dtype(dtype), chunks, index_dims=0)
    write_zarray(str(tmp_path), spec)
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, size=(*shape, spec.dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)
    # write slot by slot along dim 0 in chunk-aligned pieces, from an aligned buffer (the converter's case)
    step = chunks[0]
    for start in range(0, shape[0], step):
        piece = full[start : start + step]
        buf = aligned_empty(piece.nbytes).view(spec.dtype).reshape(piece.shape)
        buf[...] = piece
        region = (slice(start, start + step),) + (slice(None),) * (len(shape) - 1)
        files = write_chunks(str(tmp_path), spec, region, buf)
        assert all(os.path.exists(f) for f in files)
    store = ts.open(tensorstore_spec(str(tmp_path), spec), open=True).result()
    assert store.read().result().tobytes() == full.tobytes()
    folder = tmp_path / "a.b"
    names = sorted(os.listdir(folder))
    assert not [n for n in names if n.endswith(TMP_SUFFIX)]
    chunk_bytes = int(np.prod(chunks)) * spec.dtype.itemsize
    assert all(os.path.getsize(folder / n) == chunk_bytes for n in names if not n.startswith("."))


def test_aligned_empty():
    for n in (1, 4095, 4096, 10**6):
        assert aligned_empty(n).ctypes.data % DIRECT_ALIGN == 0 and aligned_empty(n).nbytes == n


def test_zarray_mismatch_is_an_error(tmp_path):
    spec = ArraySpec(("x",), (8,), np.dtype(np.int32), (8,))
    write_zarray(str(tmp_path), spec)
    write_zarray(str(tmp_path), spec)  # idempotent
    with pytest.raises(ValueError, match="array metadata differs"):
        write_zarray(str(tmp_path), ArraySpec(("x",), (16,), np.dtype(np.int32), (8,)))


def test_installed_orbax_is_in_the_pinned_range():
    """orbax_format writes orbax's on-disk layout by hand (as orbax 0.12 writes it, restored by orbax's own API in
    tests/test_convert.py): pyproject.toml pins the orbax-checkpoint range that is tested, and the installed one is
    in it."""
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    [orbax] = [r for r in deps if r.name == "orbax-checkpoint"]
    installed = Version(version("orbax-checkpoint"))
    assert installed in orbax.specifier, (str(orbax.specifier), str(installed))
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in orbax.specifier  # an upper bound: next minor
