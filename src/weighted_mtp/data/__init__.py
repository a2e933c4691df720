"""Code datasets: raw sources, the processed form with its metadata index, samplers and batches.

Names are imported lazily so that using the index and samplers does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "collate",
    "TrainLoader": "loader",
    "build_loader": "loader",
    "SplitIndex": "index",
    "open_split": "index",
    "prepare_dataset": "prepare",
    "write_processed_split": "prepare",
    "Problem": "sources",
    "get_source": "sources",
    "select": "samplers",
    "shard": "samplers",
    "render": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'weighted_mtp.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"weighted_mtp.data.{_EXPORTS[name]}"), name)
