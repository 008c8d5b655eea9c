"""Chunk-compressed arrays: every slice equals numpy's slice of the original; bad files are named."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.data import ChunkedArray, save_chunked


@pytest.mark.parametrize(
    "dtype, shape, chunk",
    [(np.uint16, (2, 21, 17, 13), (2, 8, 5, 32)), (np.uint8, (1, 9, 40, 7), (1, 4, 4, 4)),
     (np.float32, (3, 33, 10), (3, 16, 16)), (np.int64, (5, 4), (2, 3))],
)  # fmt: skip
def test_every_slice_equals_numpy(dtype, shape, chunk, tmp_path):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):  # full-range noise: incompressible
        arr = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    else:
        arr = rng.random(shape).astype(dtype)
    arr[:, : shape[1] // 2] = 0  # a run of zeros, as outside a body
    save_chunked(tmp_path / "a.zc", arr, chunk)
    stored = ChunkedArray(tmp_path / "a.zc")
    assert stored.shape == arr.shape and stored.dtype == arr.dtype
    codecs = set(np.load(tmp_path / "a.zc.idx.npy")[1, :-1].tolist())
    assert codecs == {0, 1} or dtype == np.int64, codecs  # noise stored raw, zeros compressed: both read back
    np.testing.assert_array_equal(np.asarray(stored), arr)
    for _ in range(40):
        key = []
        for n in shape:
            a = int(rng.integers(-n, n))
            b = int(rng.integers(-n, n + 3))
            key.append(slice(a, b) if rng.random() < 0.8 else a)
        key = tuple(key[: int(rng.integers(1, len(shape) + 1))])
        np.testing.assert_array_equal(stored[key], arr[key], err_msg=str(key))


def test_zeros_compress_and_the_format_is_checked(tmp_path):
    arr = np.zeros((2, 64, 64, 64), np.uint16)
    arr[:, 20:30, 20:30, 20:30] = np.arange(2000, dtype=np.uint16).reshape(2, 10, 10, 10)
    save_chunked(tmp_path / "a.zc", arr, (2, 32, 32, 32))
    assert (tmp_path / "a.zc").stat().st_size < arr.nbytes / 50
    (tmp_path / "b.zc").write_bytes(b"not an array\n")
    with pytest.raises(ValueError, match="b.zc is not a chunked array"):
        ChunkedArray(tmp_path / "b.zc")
    np.save(tmp_path / "c.zc.idx.npy", np.zeros(3, np.int64))
    (tmp_path / "c.zc").write_bytes((tmp_path / "a.zc").read_bytes())
    with pytest.raises(ValueError, match="c.zc: the chunk index"):
        ChunkedArray(tmp_path / "c.zc")
    with pytest.raises(ValueError, match="does not fit"):
        save_chunked(tmp_path / "d.zc", arr, (2, 32))
    with pytest.raises(IndexError, match="step 1"):
        ChunkedArray(tmp_path / "a.zc")[:, ::2]
