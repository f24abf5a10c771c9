"""Long-poll: one answer per request, with the same checks, hub subscription and catch-up as
SSE. It answers at once with events after the cursor (up to a page), else holds up to the
timeout for live ones; every answer hands out the cursor and a `sid` to pass back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gevent
import orjson

from common.problems import unauthorized
from ingest.ids import format_position
from ingest.reads import history_gone
from streaming.catchup import catch_up, streams_for
from streaming.checks import Checked, new_sid, subscribe_checked
from streaming.deps import StreamingServices
from streaming.subscription import HEARTBEAT, StreamEnded


@dataclass(frozen=True, slots=True)
class PollAnswer:
    events: list[dict[str, Any]]
    cursor: int
    sid: str
    reset: dict[str, Any] | None = None  # history after the cursor is gone

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "events": self.events,
            "cursor": format_position(self.cursor),
            "sid": self.sid,
        }
        if self.reset is not None:
            body["reset"] = self.reset
        return body


def poll_event(position: int, stream: str, event_type: str, data: str) -> dict[str, Any]:
    return {
        "id": format_position(position),
        "stream": stream,
        "type": event_type,
        "data": orjson.Fragment(data),
    }


def _still_admitted(svc: StreamingServices, checked: Checked) -> None:
    """A revocation that landed while this poll was checked, registered or waiting: 401, and
    nothing it gathered is sent."""
    admits = svc.hub.admits
    if admits is not None and not admits(checked.jti, checked.subject, checked.issued_at):
        raise unauthorized("token has been revoked")


def long_poll(svc: StreamingServices, checked: Checked, hold_s: float) -> PollAnswer:
    """Wait up to `hold_s` for events of the checked streams after its resume point."""
    page = svc.settings.catchup_page
    sid = checked.sid or new_sid()
    sub, seam = subscribe_checked(svc, checked)
    svc.presence.join(sub, sid, checked.subject, takeover=False)
    reset = None
    try:
        start = checked.resume
        if start is not None and start < seam:
            # At or past the hub's position, everything after the cursor reaches this poll
            # through the hub, so no history can be missing: no database round trip.
            with svc.pool.connection() as conn:
                reset = history_gone(svc.store, conn, checked.streams, start)
        if start is None:
            # "Newer than now" means newer than the last commit, which the hub may not have
            # heard of yet (a client that just published must not get its own event back).
            with svc.pool.connection() as conn:
                start = max(seam, svc.store.last_position(conn))
        cursor = max(start, seam)
        events: list[dict[str, Any]] = []
        streams = (
            streams_for(svc.pool, svc.store, checked.streams, checked.patterns, checked.admits)
            if start < seam
            else []
        )
        for rows in catch_up(svc.pool, svc.store, streams, start, seam, page):
            events = [poll_event(r.position, r.stream, r.type, r.data) for r in rows]
            if len(rows) == page:
                cursor = rows[-1].position  # more history to come: continue from here
            break
        _still_admitted(svc, checked)
        if not events and hold_s > 0:
            with gevent.Timeout(hold_s, False):
                while not events:
                    item = sub.queue.get()
                    if item is None or isinstance(item, StreamEnded):
                        break  # closed or deleted: answer with what there is
                    if item is not HEARTBEAT:  # heartbeats mean nothing to a poll: keep waiting
                        for e in item:
                            if e.position > cursor and len(events) < page:
                                events.append(poll_event(e.position, e.stream, e.type, e.data))
                                cursor = e.position
        _still_admitted(svc, checked)
    finally:
        svc.hub.unsubscribe(sub)
        svc.presence.leave(sub, sid, checked.subject, takeover=False)
    return PollAnswer(events, cursor, sid, reset)
