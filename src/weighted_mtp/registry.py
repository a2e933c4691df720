"""Registries for the parts a recipe names by string.

One `Registry` per kind, filled when the module that defines the components is imported. Each
registry knows which module fills it, so a lookup works without the caller importing it first.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from weighted_mtp.errors import UnknownComponentError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, filled_by: str) -> None:
        self.kind = kind
        self._filled_by = filled_by
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(component: T) -> T:
            if name in self._items and self._items[name] is not component:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = component
            return component

        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._filled_by)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(known) or 'none'})"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


WEIGHTING_SCHEMES: Registry = Registry("weighting scheme", "weighted_mtp.weighting")
VALUE_HEADS: Registry = Registry("value head", "weighted_mtp.models.value_head")
MODEL_LOADERS: Registry = Registry("model loader", "weighted_mtp.models.loading")
DATASETS: Registry = Registry("dataset", "weighted_mtp.data.sources")
BENCHMARKS: Registry = Registry("benchmark", "weighted_mtp.eval.benchmarks")
PIPELINES: Registry = Registry("pipeline", "weighted_mtp.pipelines")
