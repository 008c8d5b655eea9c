"""A transform hash for MONAI's PersistentDataset that sees the transforms' settings.

``PersistentDataset`` names its cache files by the data item only (plus, with ``hash_transform``, a hash of
the deterministic transforms — but MONAI's ``json_hashing`` falls back to the transforms' class names, so a
changed resize size or intensity window would silently reuse stale cache files). :func:`transform_state_hash`
hashes the settings themselves, so any change to the cached part of a pipeline starts a new cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["transform_state_hash"]

_MAX_DEPTH = 8


def _state(obj: Any, depth: int, seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        return ("array", arr.shape, str(arr.dtype), hashlib.md5(np.ascontiguousarray(arr).tobytes()).hexdigest())
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if depth >= _MAX_DEPTH or id(obj) in seen:
        return type(obj).__name__
    seen = seen | {id(obj)}
    if isinstance(obj, (list, tuple)):
        return [_state(v, depth + 1, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(repr(_state(v, depth + 1, seen)) for v in obj)
    if isinstance(obj, Mapping):
        return {str(k): _state(v, depth + 1, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if callable(obj) and not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", type(obj).__name__)
    if hasattr(obj, "__dict__"):
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("__")}
        return [type(obj).__module__ + "." + type(obj).__qualname__, _state(attrs, depth + 1, seen)]
    return type(obj).__name__


def transform_state_hash(transforms: Any) -> bytes:
    """MD5 (hex, as bytes) of the transforms' classes and settings, for ``PersistentDataset(hash_transform=…)``."""
    return hashlib.md5(repr(_state(transforms, 0, set())).encode("utf-8")).hexdigest().encode("utf-8")
