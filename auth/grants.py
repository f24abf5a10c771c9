"""Stream patterns and the grants made of them: the one place a pattern is matched.

`*` matches within one `/`-separated segment, a trailing `/**` matches any depth below, and
`**` alone matches every stream. A pattern compiles to a regex valid in both Python and
PostgreSQL (`~`), so reads can filter by the same rule in SQL.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from common.cache import BoundedCache

PATTERN_RE = re.compile(r"^[A-Za-z0-9._:/*-]{1,200}$")


def pattern_to_regex(pattern: str) -> str:
    """Compile a stream pattern to a regex valid in both Python and PostgreSQL (`~`).

    `*` matches within one `/`-separated segment, a trailing `/**` matches any depth below,
    and `**` alone matches every stream.
    """
    if pattern == "**":
        return "^.*$"
    deep = pattern.endswith("/**")
    body = pattern[:-3] if deep else pattern
    if "**" in body:
        raise ValueError(f"`**` may only stand alone or end a pattern: {pattern!r}")
    parts = [re.escape(p) if p != "*" else "[^/]*" for p in re.split(r"(\*)", body) if p]
    regex = "^" + "".join(parts).replace("\\/", "/").replace("\\-", "-").replace("\\:", ":")
    return regex + ("/.+$" if deep else "$")


class Grants:
    """The set of streams a token grants for one action, with memoised answers."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.everything = "**" in self.patterns
        self.regexes = [pattern_to_regex(p) for p in self.patterns]
        self._compiled = [re.compile(r) for r in self.regexes]
        self._memo: BoundedCache[str, bool] = BoundedCache(4096)

    def allows(self, stream: str) -> bool:
        answer = self._memo.get(stream)
        if answer is None:
            answer = self.everything or any(r.match(stream) for r in self._compiled)
            self._memo.put(stream, answer)
        return answer

    def sql_filter(self) -> list[str] | None:
        """Regexes for the store to filter reads by, or None when everything is granted."""
        return None if self.everything else list(self.regexes)
