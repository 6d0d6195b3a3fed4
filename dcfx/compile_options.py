"""`CompileOptions`: inductor options as a read-only, hashable mapping, so that a
`DeepCacheConfig` holding them stays hashable."""

from __future__ import annotations

from typing import Any, Mapping


class CompileOptions(Mapping[str, Any]):
    """A read-only mapping of inductor options, hashable so that a `DeepCacheConfig` is.

    Equal to any mapping with the same items (`== {"freezing": True}` holds), shown like a
    dict. Values that are lists, sets or dicts are hashed by their contents.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, options: Mapping[str, Any] = ()):
        self._items = dict(options)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(_frozen(self._items))
        return self._hash

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple:
        return (type(self), (self._items,))


def _frozen(value: Any) -> Any:
    """A hashable stand-in for an option value, equal for equal values."""
    if isinstance(value, Mapping):
        return frozenset((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value
