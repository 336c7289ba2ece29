"""The loaded models one process holds: a least-recently-used cache with a bound.

The server's model pool and each worker process keep their loaded versions here. A model is
held under (model, version, form); a request finds it by (model, version, precision), the
precision it asked for (the setting, or a request's more exact one). Two precisions served by
the same form (`auto` and `int8` both choosing `openvino-int8`, say) share one loaded copy,
which counts once against the bound.

Not thread-safe: the server uses it from its event loop, a worker from its one task thread.
Reading `models()` from another thread (a metrics scrape) is safe: it copies.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeVar

M = TypeVar("M")

# (model name, version, form) of a held model; (model name, version, precision) of a request.
FormKey = tuple[str, str, str]
RequestKey = tuple[str, str, str]


class ModelCache(Generic[M]):
    """At most `capacity` loaded forms, least recently used first.

    Args:
        capacity: how many loaded forms may be held (`max_loaded_models`), at least 1.

    Raises:
        ValueError: a capacity under 1.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._held: collections.OrderedDict[FormKey, M] = collections.OrderedDict()
        self._forms: dict[RequestKey, str] = {}

    def __len__(self) -> int:
        """How many loaded forms are held."""
        return len(self._held)

    def get(self, name: str, version: str, precision: str) -> M | None:
        """The model that serves `precision` for `name@version`, now the most recently used;
        None when none is held for it."""
        form = self._forms.get((name, version, precision))
        if form is None:
            return None
        self._held.move_to_end((name, version, form))
        return self._held[(name, version, form)]

    def add(
        self, name: str, version: str, precision: str, form: str, make: Callable[[], M]
    ) -> tuple[M, list[M]]:
        """Hold the model `make` gives for `form`, found from now on by `precision`.

        When `name@version`'s `form` is already held (loaded for another precision), that
        copy serves `precision` too and `make` is not called.

        Returns:
            The model that serves `precision`, and the models dropped (least recently used)
            to keep at most `capacity` held; never the one returned.
        """
        key = (name, version, form)
        self._forms[(name, version, precision)] = form
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            return held, []
        model = self._held[key] = make()
        return model, self._drop_beyond(self.capacity)

    def make_room(self) -> list[M]:
        """Drop the least recently used models until one more fits; the dropped ones."""
        return self._drop_beyond(self.capacity - 1)

    def models(self) -> list[M]:
        """Every held model, least recently used first (a copy)."""
        return list(self._held.values())

    def versions(self) -> list[tuple[str, str]]:
        """(name, version) of every held model, once each, least recently used first."""
        return list(dict.fromkeys((name, version) for name, version, _ in list(self._held)))

    def clear(self) -> list[M]:
        """Drop every model; the dropped ones."""
        dropped = self.models()
        self._held.clear()
        self._forms.clear()
        return dropped

    def _drop_beyond(self, count: int) -> list[M]:
        dropped: list[M] = []
        while len(self._held) > count:
            key, model = self._held.popitem(last=False)
            for request in [r for r, f in self._forms.items() if (*r[:2], f) == key]:
                del self._forms[request]
            dropped.append(model)
        return dropped
