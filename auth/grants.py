"""Stream patterns and the grants made of them: the one place a pattern is matched.

`*` matches within one `/`-separated segment, a trailing `/**` matches any depth below, and
`**` alone matches every stream. A pattern compiles to a regex valid in both RE2 (Python side,
common/linear.py: linear time whatever the pattern) and PostgreSQL (`~`), so reads can filter
by the same rule in SQL. A pattern holds at most MAX_WILDCARDS `*`s; more is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from common.cache import BoundedCache
from common.linear import LinearRegex, compile_linear

PATTERN_RE = re.compile(r"^[A-Za-z0-9._:/*-]{1,200}$")
MAX_WILDCARDS = 8  # `*`s in one pattern (a trailing `/**` counts as one)
# Patterns match native stream names only (they start with a letter or digit): a stream that
# another door keeps to itself (`.mercure`) is never matched by `*` or `**`.
FIRST = "[A-Za-z0-9]"
NOTHING = "^$"  # no stream name is empty: what a pattern that can match no native name becomes


def _segment_regex(text: str) -> str:
    """A pattern piece without `**`, as an unanchored regex (`*` is `[^/]*`)."""
    return "[^/]*".join(
        re.escape(p).replace("\\/", "/").replace("\\-", "-").replace("\\:", ":") for p in text.split("*")
    )


def pattern_to_regex(pattern: str) -> str:
    """Compile a stream pattern to an anchored regex valid in RE2 and PostgreSQL (`~`).

    `*` matches within one `/`-separated segment, a trailing `/**` matches any depth below,
    and `**` alone matches every (native) stream. No look-around: RE2 has none.
    """
    if pattern == "**":
        return "^" + FIRST + ".*$"
    deep = pattern.endswith("/**")
    body = pattern[:-3] if deep else pattern
    if "**" in body:
        raise ValueError(f"`**` may only stand alone or end a pattern: {pattern!r}")
    if body.count("*") + deep > MAX_WILDCARDS:
        raise ValueError(f"a pattern holds at most {MAX_WILDCARDS} wildcards: {pattern!r}")
    if body.startswith("*"):  # the first segment of a native name starts with a letter or digit
        regex = FIRST + _segment_regex(body)
    elif body[:1].isascii() and body[:1].isalnum():
        regex = _segment_regex(body)
    else:
        return NOTHING
    return "^" + regex + ("/.+$" if deep else "$")


class Grants:
    """The set of streams a token grants for one action, with memoised answers."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.everything = "**" in self.patterns
        self.regexes = [pattern_to_regex(p) for p in self.patterns]
        self._compiled = [compile_linear(r) for r in self.regexes]
        self._memo: BoundedCache[str, bool] = BoundedCache(4096)

    def allows(self, stream: str) -> bool:
        if self.everything:  # `**`: no memo to keep (asked once per event published)
            return True
        answer = self._memo.get(stream)
        if answer is None:
            answer = self.everything or any(r.fullmatch(stream) for r in self._compiled)
            self._memo.put(stream, answer)
        return answer

    def covers(self, pattern: str) -> bool:
        """Does the grant allow every stream `pattern` may match (decided once, at subscribe)?"""
        return self.everything or any(pattern_covers(g, pattern) for g in self.patterns)

    def sql_filter(self) -> list[str] | None:
        """Regexes for the store to filter reads by, or None when everything is granted."""
        return None if self.everything else list(self.regexes)


def is_pattern(name: str) -> bool:
    """A subscription target with a wildcard (`room/*`, `user/42/**`, `**`)."""
    return "*" in name


def valid_pattern(pattern: str) -> bool:
    if not PATTERN_RE.fullmatch(pattern):
        return False
    try:
        pattern_to_regex(pattern)
    except ValueError:
        return False
    return True


def _split(pattern: str) -> tuple[list[str], bool]:
    """Segments, and whether the pattern ends in `/**` (or is `**`: any depth)."""
    if pattern == "**":
        return [], True
    if pattern.endswith("/**"):
        return pattern[:-3].split("/"), True
    return pattern.split("/"), False


def _segment_covers(grant: str, seg: str) -> bool:
    if grant == "*" or grant == seg:
        return True
    return "*" not in seg and compile_linear(_segment_regex(grant)).fullmatch(seg) is not None


def pattern_covers(grant: str, pattern: str) -> bool:
    """Does every stream `pattern` can match also match `grant`? Decided segment by segment;
    when in doubt (a partial wildcard against another), no."""
    g_segs, g_deep = _split(grant)
    p_segs, p_deep = _split(pattern)
    if grant == "**":
        return True
    if g_deep:
        if len(p_segs) <= len(g_segs) and not (p_deep and len(p_segs) == len(g_segs)):
            return False
        return all(_segment_covers(g, p) for g, p in zip(g_segs, p_segs, strict=False))
    if p_deep or len(p_segs) != len(g_segs):
        return False
    return all(_segment_covers(g, p) for g, p in zip(g_segs, p_segs, strict=True))


def literal_prefix(pattern: str) -> str:
    """The whole segments a pattern starts with before its first wildcard (`a/b` for
    `a/b/c*/d`, `` for `*/x` and `**`): every stream the pattern matches starts with them."""
    head = pattern.split("*", 1)[0]
    return head[: head.rfind("/")] if "/" in head else ""


def _prefixes(stream: str) -> list[str]:
    """The literal prefixes a pattern matching `stream` can have: ``, then each run of whole
    segments (`a`, `a/b`, ... for `a/b/c`)."""
    found = [""]
    at = stream.find("/")
    while at != -1:
        found.append(stream[:at])
        at = stream.find("/", at + 1)
    found.append(stream)
    return found


class PatternIndex:
    """Live patterns, and for each stream name the patterns it matches, decided once per
    (pattern set, stream) and cached, so fan-out never tests every pattern per event. A new
    stream name is tested only against the patterns whose literal prefix it starts with."""

    def __init__(self, cache_size: int = 100_000) -> None:
        self._compiled: dict[str, LinearRegex] = {}
        self._by_prefix: dict[str, dict[str, LinearRegex]] = {}
        self._counts: dict[str, int] = {}
        self._cache: BoundedCache[str, tuple[int, tuple[str, ...]]] = BoundedCache(cache_size)
        self.generation = 0

    def add(self, pattern: str) -> None:
        self._counts[pattern] = self._counts.get(pattern, 0) + 1
        if pattern not in self._compiled:
            compiled = compile_linear(pattern_to_regex(pattern))
            self._compiled[pattern] = compiled
            self._by_prefix.setdefault(literal_prefix(pattern), {})[pattern] = compiled
            self.generation += 1

    def remove(self, pattern: str) -> None:
        left = self._counts.get(pattern, 0) - 1
        if left > 0:
            self._counts[pattern] = left
            return
        self._counts.pop(pattern, None)
        if self._compiled.pop(pattern, None) is not None:
            prefix = literal_prefix(pattern)
            bucket = self._by_prefix.get(prefix, {})
            bucket.pop(pattern, None)
            if not bucket:
                self._by_prefix.pop(prefix, None)
            self.generation += 1

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def candidates(self, stream: str) -> int:
        """How many patterns a new `stream` is tested against (what the prefix index saves)."""
        return sum(len(self._by_prefix.get(p, ())) for p in _prefixes(stream))

    def matching(self, stream: str) -> tuple[str, ...]:
        cached = self._cache.get(stream)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        found = tuple(
            pattern
            for prefix in _prefixes(stream)
            for pattern, regex in self._by_prefix.get(prefix, {}).items()
            if regex.fullmatch(stream)
        )
        self._cache.put(stream, (self.generation, found))
        return found
