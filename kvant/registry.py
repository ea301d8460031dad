"""A small explicit registry: a dict of key -> object filled by a decorator.

An unknown key is an error that lists the valid keys and suggests the nearest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from kvant.errors import SettingsError

T = TypeVar("T")


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, or None when nothing is close.

    >>> nearest("tinny", ["tiny", "info", "data"])
    'tiny'
    """
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_message(kind: str, key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    hint = nearest(key, valid)
    did_you_mean = f"; did you mean '{hint}'?" if hint else ""
    return f"unknown {kind} '{key}' (valid: {', '.join(valid)}){did_you_mean}"


class Registry(Generic[T]):
    """Maps keys (a format, a method, a text set) to objects.

    >>> formats = Registry[str]("format")
    >>> formats.add("gguf", "export/gguf.py")
    >>> formats["gguf"]
    'export/gguf.py'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, key: str, item: T) -> None:
        if key in self._items:
            raise ValueError(f"{self.kind} '{key}' registered twice")
        self._items[key] = item

    def register(self, key: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            self.add(key, item)
            return item

        return decorate

    def __getitem__(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            raise SettingsError(unknown_key_message(self.kind, key, self._items)) from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self):
        return iter(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
