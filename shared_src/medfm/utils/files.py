"""Writing a file atomically: a reader sees the old file or the new one, never part of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A hidden temporary path beside ``path`` to write to: renamed onto ``path`` when the block ends without an
    error, removed when it raises.

    Every caller gets its own temporary name, so processes writing the same file (each rank of a multi-GPU run)
    do not interleave; the last rename wins.

    Args:
        path: the file to write; its folder must exist.
        suffix: ending of the temporary name (``.nii.gz``: nibabel picks the format by it).
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
