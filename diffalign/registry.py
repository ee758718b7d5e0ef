"""One way to register: a named table of entries, each with a one-line description and a source.

    >>> COLOURS = Registry("colour", "--colour")
    >>> COLOURS.register("red", (255, 0, 0), description="the colour of the toy reward", source="diffalign")
    (255, 0, 0)
    >>> COLOURS.get("red"), COLOURS.names()
    ((255, 0, 0), ['red'])
    >>> COLOURS.get("rde")
    Traceback (most recent call last):
    diffalign.errors.ConfigError: --colour: unknown colour 'rde'. Did you mean 'red'? Available: red

Objectives, model families, rewards, data formats, prompt sets and samplers each keep one ``Registry``;
``diffalign list`` prints them, the CLI reads its choices from them, and the README tables are checked
against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from diffalign.errors import ConfigError, closest

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    description: str
    source: str


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Args:
        kind: what an entry is, for messages ("objective", "reward", ...).
        option: where a user names one ("objective.name", "--reward"), for messages.
    """

    def __init__(self, kind: str, option: str):
        self.kind, self.option = kind, option
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, value: T, *, description: str, source: str = "", replace: bool = False) -> T:
        """Add ``value`` under ``name`` and return it. Raises ``ValueError`` when the name is taken, unless
        ``replace`` (registering again from a notebook cell, or a test run twice)."""
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = Entry(name, value, description.strip(), source.strip())
        return value

    def get(self, name: str) -> T:
        """The entry's value. Raises ``ConfigError`` for an unknown name, naming the closest one."""
        if name not in self._entries:
            raise ConfigError(f"{self.option}: unknown {self.kind} '{name}'.{closest(name, self._entries)} "
                              f"Available: {', '.join(self.names())}")
        return self._entries[name].value

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
