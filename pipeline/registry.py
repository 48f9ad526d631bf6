"""One generic registry for every kind of named thing: models, methods, stages, backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from pipeline.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map filled by a decorator.

    ``@reg.register`` keys an object by its ``__name__``; ``@reg.register(name="x")`` by an explicit
    name. Registering a name twice is a bug and raises; looking up an unknown name raises a
    :class:`ConfigError` that lists the valid names.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, obj: T, *, name: str | None = None) -> T: ...

    @overload
    def register(self, obj: None = None, *, name: str | None = None) -> Callable[[T], T]: ...

    def register(self, obj=None, *, name=None):
        def add(item: T) -> T:
            key = name or getattr(item, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {item!r}; pass name=")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str, what: str | None = None) -> T:
        """The object named ``name``; ``what`` names the setting in the error (default: the registry's kind)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from a config file
            raise ConfigError(
                f"unknown {what or self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
