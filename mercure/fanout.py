"""Mercure fan-out: the hub taps the `.mercure` stream and hands each commit's updates here,
which picks their subscribers by topic selector and hands them on through the hub (one delivery
per subscriber per commit, with the hub's queue bound, direct writes and overflow rules).

An update is decoded and its SSE bytes built once, for everyone. Its subscribers are found
through the `SelectorIndex` (topic -> live selectors, cached), so a delivery never tests every
selector; a private update then goes only to subscribers whose `mercure.subscribe` claim
matches one of its topics, each (claim selector, topic) pair decided once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from mercure.selectors import SelectorIndex, Selectors
from mercure.updates import MERCURE_STREAM, Update
from streaming.hub import Hub
from streaming.subscription import LiveEvent, Subscription


@dataclass(eq=False, slots=True)
class MercureSubscription(Subscription):
    """A Mercure subscriber: its topic selectors, and what its token lets it see privately."""

    selectors: tuple[str, ...] = ()
    allowed: tuple[str, ...] | None = None  # `mercure.subscribe`; None: public updates only

    def wants(self, update: Update, matcher: Selectors) -> bool:
        """For catch-up (live delivery finds its subscribers through the index instead)."""
        if not matcher.any_match(self.selectors, update.topics):
            return False
        return not update.private or self.may_see(update, matcher)

    def may_see(self, update: Update, matcher: Selectors) -> bool:
        return self.allowed is not None and matcher.any_match(self.allowed, update.topics)


def live_update(position: int, update: Update) -> LiveEvent:
    """An update as the hub delivers it: `body` is its complete SSE event (with its own id)."""
    return LiveEvent(position, MERCURE_STREAM, update.type or "message", update.data, update.sse())


class MercureFanout:
    """The live Mercure subscribers of this process, indexed by selector."""

    def __init__(self, hub: Hub, matcher: Selectors | None = None) -> None:
        self.hub = hub
        self.matcher = matcher or Selectors()
        self.index = SelectorIndex(self.matcher)
        self._by_selector: dict[str, set[MercureSubscription]] = {}
        self.delivered = 0
        hub.tap(MERCURE_STREAM, self.deliver)

    def add(self, sub: MercureSubscription) -> int:
        """Register with the hub and the index; returns the position live delivery starts
        after (catch-up reads up to it). No yield between the two registrations."""
        seam = self.hub.add(sub)
        for selector in sub.selectors:
            self._by_selector.setdefault(selector, set()).add(sub)
            self.index.add(selector)
        return seam

    def remove(self, sub: MercureSubscription) -> None:
        for selector in sub.selectors:
            subs = self._by_selector.get(selector)
            if subs is not None and sub in subs:
                subs.discard(sub)
                self.index.remove(selector)
                if not subs:
                    del self._by_selector[selector]
        self.hub.unsubscribe(sub)

    def count(self) -> int:
        return sum(len(s) for s in self._by_selector.values())

    def deliver(self, events: list[LiveEvent]) -> None:
        """The hub's tap: one commit's `.mercure` events, in position order."""
        if not self._by_selector:
            return
        merged: dict[MercureSubscription, list[LiveEvent]] = {}
        matcher, index, by_selector = self.matcher, self.index, self._by_selector
        for event in events:
            update = Update.from_data(event.data)
            targets: set[MercureSubscription] = set()
            for topic in update.topics:
                for selector in index.matching(topic):
                    targets.update(by_selector.get(selector, ()))
            if not targets:
                continue
            live = live_update(event.position, update)
            for sub in targets:
                if sub.closed or (update.private and not sub.may_see(update, matcher)):
                    continue
                merged.setdefault(sub, []).append(live)
        for sub, lives in merged.items():
            self.delivered += len(lives)
            self.hub.offer(sub, lives)
