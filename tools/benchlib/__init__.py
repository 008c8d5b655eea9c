"""The cases of ``tools/bench.py``: ``harness`` (shared), one module per model, ``data_paths``, ``device``."""
