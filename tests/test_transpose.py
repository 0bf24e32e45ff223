"""The host-side fast transpose: bit-exact against numpy for every dtype and shape class, allocator hook."""

import ml_dtypes
import numpy as np
import pytest

from k25jax.transpose import transpose2d, use_allocator


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.int32, np.int8, np.int64, np.bool_])
@pytest.mark.parametrize(
    "shape",
    [(3, 5), (128, 300), (1024, 2048), (68, 4096), (130, 4096), (7168, 64), (1, 9000), (4096, 1), (0, 7)],
)
def test_transpose2d_is_exact(dtype, shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    a = raw.view(dtype).reshape(shape)
    out = transpose2d(a)
    assert out.shape == shape[::-1] and out.dtype == a.dtype and out.flags.c_contiguous
    assert out.tobytes() == np.ascontiguousarray(a.T).tobytes()
    strided = a[:, ::2] if shape[1] > 1 else a  # non-contiguous input
    assert transpose2d(strided).tobytes() == np.ascontiguousarray(strided.T).tobytes()


def test_allocator_hook():
    a = np.arange(4096 * 64, dtype=np.int32).reshape(64, 4096)
    buffers = []

    def allocate(shape, dtype):
        buffers.append(np.empty(shape, dtype))
        return buffers[-1]

    with use_allocator(allocate):
        out = transpose2d(a)
    assert out is buffers[0] and np.array_equal(out, a.T)
    assert transpose2d(a) is not buffers[0]  # outside the context: a fresh array


def test_rejects_other_ranks():
    with pytest.raises(ValueError, match="2-D"):
        transpose2d(np.zeros((2, 2, 2)))
