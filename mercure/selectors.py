"""Mercure topic selectors: `*`, an exact topic, or an RFC 6570 URI template; the one place a
selector is matched against a topic.

A template compiles once to a regex (each expression becomes what its expansion can produce),
run by RE2 (common/linear.py: time linear in the topic, whatever the template), and every
(selector, topic) answer is cached, so fan-out and authorization never compile or run a regex
per delivery. A selector that is not a valid template (an unbalanced brace, say) only matches
itself. A template holds at most MAX_EXPRESSIONS expressions: a subscriber asking for more is
refused (`400`); a token claim with more matches only itself (it grants less, never more).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from common.cache import BoundedCache
from common.linear import InvalidPattern, LinearRegex, compile_linear

ANY = "*"
MAX_EXPRESSIONS = 10  # `{...}` expressions in one template
_VARSPEC = re.compile(r"^[A-Za-z0-9_%][A-Za-z0-9_.%]*(?::[1-9][0-9]{0,3}|\*)?$")
# What each expression operator's expansion may produce (RFC 6570 section 3.2).
_UNRESERVED = r"[^/?#&=,;.{}\s]"
_OPERATORS: dict[str, str] = {
    "": rf"(?:{_UNRESERVED}|,)*",  # {var}: simple, reserved characters encoded
    "+": r"[^\s{}]*",  # {+var}: reserved characters kept
    "#": r"(?:#[^\s{}]*)?",  # {#var}: a fragment
    ".": rf"(?:\.(?:{_UNRESERVED}|,)*)*",  # {.var}: labels
    "/": r"(?:/[^/?#\s{}]*)*",  # {/var}: path segments
    ";": r"(?:;[^/?#\s{}]*)*",  # {;var}: path parameters
    "?": r"(?:\?[^#\s{}]*)?",  # {?var}: a query
    "&": r"(?:&[^#\s{}]*)*",  # {&var}: query continuation
}


def exact_topic(selector: str) -> bool:
    """A selector that matches only itself (not `*`, no template expression)."""
    return selector != ANY and "{" not in selector and "}" not in selector


class TemplateTooComplex(ValueError):
    """A URI template with more expressions than MAX_EXPRESSIONS (or too large for RE2)."""


def compile_template(selector: str) -> LinearRegex | None:
    """The regex a URI template matches, or None if `selector` is not a valid template (or has
    no expression, so only equality can match it). Raises TemplateTooComplex past the bounds."""
    parts: list[str] = []
    pos, expressions = 0, 0
    for m in re.finditer(r"\{([^{}]*)\}", selector):
        literal = selector[pos : m.start()]
        if "{" in literal or "}" in literal:
            return None
        parts.append(re.escape(literal))
        body = m.group(1)
        op = body[:1] if body[:1] in _OPERATORS and body[:1] != "" else ""
        names = body[len(op) :].split(",")
        if not body[len(op) :] or not all(_VARSPEC.fullmatch(n) for n in names):
            return None
        parts.append(_OPERATORS[op])
        pos, expressions = m.end(), expressions + 1
    tail = selector[pos:]
    if "{" in tail or "}" in tail or not expressions:
        return None
    if expressions > MAX_EXPRESSIONS:
        raise TemplateTooComplex(f"a topic selector holds at most {MAX_EXPRESSIONS} expressions")
    parts.append(re.escape(tail))
    try:
        return compile_linear("^" + "".join(parts) + "$")
    except InvalidPattern as exc:
        raise TemplateTooComplex(str(exc)) from None


def selector_problem(selector: str) -> str | None:
    """Why a subscriber may not ask for `selector` (None: it may)."""
    try:
        compile_template(selector)
    except TemplateTooComplex as exc:
        return str(exc)
    return None


class Selectors:
    """Decides `matches(selector, topic)` once per pair (bounded caches)."""

    def __init__(self, cache_size: int = 100_000) -> None:
        self._templates: BoundedCache[str, tuple[LinearRegex | None]] = BoundedCache(10_000)
        self._answers: BoundedCache[tuple[str, str], bool] = BoundedCache(cache_size)

    def matches(self, selector: str, topic: str) -> bool:
        if selector == ANY or selector == topic:
            return True
        key = (selector, topic)
        answer = self._answers.get(key)
        if answer is None:
            compiled = self._templates.get(selector)
            if compiled is None:
                try:
                    compiled = (compile_template(selector),)
                except TemplateTooComplex:  # a claim past the bounds: only itself (equality)
                    compiled = (None,)
                self._templates.put(selector, compiled)
            regex = compiled[0]
            answer = regex is not None and regex.fullmatch(topic) is not None
            self._answers.put(key, answer)
        return answer

    def any_match(self, selectors: Iterable[str], topics: Iterable[str]) -> bool:
        """Does some topic match some selector (a private update and a subscriber's claim; a
        publisher's claim and each topic is `all` of these)."""
        topics = tuple(topics)
        return any(self.matches(s, t) for s in selectors for t in topics)


class SelectorIndex:
    """The live subscription selectors, and for each topic the selectors it matches: decided
    once per (selector set, topic) and cached, so a delivery never tests every selector."""

    def __init__(self, selectors: Selectors, cache_size: int = 100_000) -> None:
        self.selectors = selectors
        self._counts: dict[str, int] = {}
        self._cache: BoundedCache[str, tuple[int, tuple[str, ...]]] = BoundedCache(cache_size)
        self.generation = 0

    def add(self, selector: str) -> None:
        count = self._counts.get(selector, 0)
        self._counts[selector] = count + 1
        if not count:
            self.generation += 1

    def remove(self, selector: str) -> None:
        left = self._counts.get(selector, 0) - 1
        if left > 0:
            self._counts[selector] = left
        elif self._counts.pop(selector, None) is not None:
            self.generation += 1

    def matching(self, topic: str) -> tuple[str, ...]:
        cached = self._cache.get(topic)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        found = tuple(s for s in self._counts if self.selectors.matches(s, topic))
        self._cache.put(topic, (self.generation, found))
        return found
