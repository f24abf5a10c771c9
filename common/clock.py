"""Text of the current second, computed once a second: a timestamp formatted per response or
per log line costs more than the rest of a small answer's bookkeeping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerSecond(Generic[T]):
    """`fmt(whole_second)` for the whole second of a unix time, recomputed when it changes.
    Used from one thread (the process's event loop)."""

    __slots__ = ("_fmt", "_second", "_value")

    def __init__(self, fmt: Callable[[int], T]) -> None:
        self._fmt = fmt
        self._second = -1
        self._value: T | None = None

    def __call__(self, now: float) -> T:
        whole = int(now)
        if whole != self._second or self._value is None:
            self._value = self._fmt(whole)
            self._second = whole
        return self._value
