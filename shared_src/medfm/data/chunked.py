"""Chunk-compressed arrays on disk that a slice reads partially (:func:`save_chunked`, :class:`ChunkedArray`).

An array is cut into a regular grid of chunks; each chunk is byte-shuffled (the first bytes of every element, then
the second bytes, ...: the high bytes of 16-bit intensities repeat, so they compress well) and compressed with
zlib on its own. A chunk that compression would shrink by less than ``min_saving`` (noise inside a body) is stored
raw instead, so reading it is a copy from the memory-mapped file rather than a decompression. One file holds a
JSON header line (shape, dtype, chunk shape) and the chunks; an index of chunk offsets and codecs sits beside it.
Reading a slice touches only the chunks the slice overlaps, so a crop from a whole-body volume costs a few chunks,
not the volume. Lossless.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["ChunkedArray", "save_chunked"]

_MAGIC = "medfm-chunked-v1"
_RAW, _ZLIB = 0, 1


def _grid(shape: Sequence[int], chunk: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, math.ceil(n / c)) for n, c in zip(shape, chunk))


def _shuffle(block: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(block).view(np.uint8).reshape(-1, block.dtype.itemsize)
    return raw.T.tobytes()


def _unshuffle(data: bytes, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(raw.T).view(dtype).reshape(shape)


def save_chunked(
    path: str | os.PathLike, arr: np.ndarray, chunk: Sequence[int], level: int = 1, min_saving: float = 0.2
) -> None:
    """Write ``arr`` to ``path`` (and its chunk index to ``<path>.idx.npy``) in chunks of shape ``chunk``.

    Args:
        path: the data file.
        arr: any fixed-size numeric array.
        chunk: chunk shape, one entry per axis (clipped to the array's shape).
        level: zlib compression level (1: fastest).
        min_saving: a chunk is stored compressed only when that saves at least this fraction of its bytes.

    Raises:
        ValueError: ``chunk`` has the wrong length or a non-positive entry.
    """
    arr = np.asarray(arr)
    if len(chunk) != arr.ndim or min(chunk, default=1) < 1:
        raise ValueError(f"chunk {tuple(chunk)} does not fit an array of shape {arr.shape}.")
    chunk = tuple(min(int(c), max(n, 1)) for c, n in zip(chunk, arr.shape))
    header = json.dumps({"format": _MAGIC, "shape": list(arr.shape), "dtype": arr.dtype.str, "chunk": list(chunk),
                         "level": level}).encode("utf-8") + b"\n"  # fmt: skip
    offsets, codecs = [len(header)], []
    with open(path, "wb") as f:
        f.write(header)
        for idx in itertools.product(*(range(g) for g in _grid(arr.shape, chunk))):
            block = np.ascontiguousarray(arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunk))])
            data = zlib.compress(_shuffle(block), level)
            if len(data) > (1.0 - min_saving) * block.nbytes:
                data, codec = block.tobytes(), _RAW
            else:
                codec = _ZLIB
            f.write(data)
            offsets.append(offsets[-1] + len(data))
            codecs.append(codec)
    np.save(f"{path}.idx.npy", np.stack([np.asarray(offsets, np.int64), np.asarray([*codecs, -1], np.int64)]))


class ChunkedArray:
    """Read-only view of a file written by :func:`save_chunked`: ``shape``, ``dtype``, ``arr[slices]`` (basic
    slices with step 1 and integers) and ``np.asarray(arr)`` (the whole array).

    Raises:
        ValueError: the file is not a chunked array, or its index does not match it (naming the file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            head = json.loads(first.decode("utf-8"))
            if head.get("format") != _MAGIC:
                raise ValueError
        except ValueError:
            raise ValueError(f"{self.path} is not a chunked array written by medfm.data.save_chunked.") from None
        self.shape = tuple(head["shape"])
        self.dtype = np.dtype(head["dtype"])
        self.chunk = tuple(head["chunk"])
        self.ndim = len(self.shape)
        self._grid = _grid(self.shape, self.chunk)
        index = np.load(f"{self.path}.idx.npy")
        self._offsets, self._codecs = (index[0], index[1]) if index.ndim == 2 and len(index) == 2 else (index[:0],) * 2
        size = os.path.getsize(self.path)
        indexed = int(self._offsets[-1]) if len(self._offsets) else 0
        if len(self._offsets) != math.prod(self._grid) + 1 or indexed != size:
            raise ValueError(f"{self.path}: the chunk index {self.path}.idx.npy does not match the data file "
                             f"({max(len(self._offsets) - 1, 0)} chunks indexed, {math.prod(self._grid)} expected; "
                             f"{indexed} bytes indexed, {size} on disk).")  # fmt: skip
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def _block(self, idx: Sequence[int]) -> np.ndarray:
        flat = int(np.ravel_multi_index(tuple(idx), self._grid))
        start, stop = int(self._offsets[flat]), int(self._offsets[flat + 1])
        shape = [min(c, n - i * c) for i, c, n in zip(idx, self.chunk, self.shape)]
        if self._codecs[flat] == _RAW:
            return self._data[start:stop].view(self.dtype).reshape(shape)
        return _unshuffle(zlib.decompress(self._data[start:stop].tobytes()), self.dtype, shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim:
            raise IndexError(f"{self.path}: {len(key)} indices for an array of {self.ndim} dimensions.")
        key = key + (slice(None),) * (self.ndim - len(key))
        bounds, drop = [], []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError(f"{self.path}: only slices with step 1 are supported, got {k}.")
                bounds.append((start, max(start, stop)))
            else:
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"{self.path}: index {k} is out of range for axis {axis} of size {n}.")
                bounds.append((i, i + 1))
                drop.append(axis)
        out = np.empty([b - a for a, b in bounds], self.dtype)
        if out.size:
            ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, self.chunk)]
            for idx in itertools.product(*ranges):
                block = self._block(idx)
                src, dst = [], []
                for i, c, (a, b) in zip(idx, self.chunk, bounds):
                    lo, hi = max(a, i * c), min(b, (i + 1) * c)
                    src.append(slice(lo - i * c, hi - i * c))
                    dst.append(slice(lo - a, hi - a))
                out[tuple(dst)] = block[tuple(src)]
        return out.reshape([n for axis, n in enumerate(out.shape) if axis not in drop]) if drop else out
