"""Regular expressions that run in time linear in their input, whatever the pattern: the one
place Sluice compiles a regex built from what a client sent (stream patterns, grants, Mercure
selectors and URI templates).

Python's `re` backtracks: `(?:[^/]*a){12}[^/]*b` against a long run of `a`s takes seconds, and
it runs inside the hub's fan-out, where it holds every connection. RE2 (google-re2) compiles to
an automaton instead and never backtracks; it supports no look-around and no back-references,
which none of the patterns built here use. A pattern RE2 refuses (too large for its memory
budget, say) is an invalid pattern, never a fallback to `re`.
"""

from __future__ import annotations

from typing import Protocol

import re2  # google-re2 ships no type information (mypy override in pyproject.toml)

MAX_PROGRAM_MEMORY = 1 << 20  # bytes of automaton per compiled pattern


class LinearRegex(Protocol):
    """What Sluice asks of a compiled pattern."""

    def fullmatch(self, text: str) -> object | None: ...


class InvalidPattern(ValueError):
    """The pattern does not compile to a linear-time matcher."""


_OPTIONS = re2.Options()
_OPTIONS.max_mem = MAX_PROGRAM_MEMORY
_OPTIONS.log_errors = False


def compile_linear(pattern: str) -> LinearRegex:
    """Compile `pattern` (RE2 syntax, a subset of Python's) for `fullmatch`."""
    try:
        compiled: LinearRegex = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise InvalidPattern(str(exc)) from None
    return compiled
