"""The shapes events take inside Sluice, from accepted request to stored row."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from gevent.event import AsyncResult

from common.problems import Problem


@dataclass(slots=True)
class NewEvent:
    """One validated event of an ingest request, its data already JSON-encoded."""

    stream: str
    type: str
    data: str
    key: str | None = None


@dataclass(slots=True)
class Written:
    """Where one event of a request ended up: its id, or the original id of a repeated key."""

    id: int
    stream: str
    key: str | None
    duplicate: bool = False


_sequence = itertools.count(1)


@dataclass(eq=False)
class IngestRequest:
    """One ingest request's events, handed to the batcher and committed all together."""

    client_id: str
    events: list[NewEvent]
    seq: int = field(default_factory=lambda: next(_sequence))  # unique in this process
    accepted_at: float = field(default_factory=time.monotonic)
    results: list[Written] | None = None
    cancelled: bool = False
    error: Problem | None = None  # refused while writing (a reused idempotency key)
    # A key already naming a different event moves to this request's event instead of refusing
    # it (Mercure update ids: the newest update with an id is the one a resume finds).
    rekey: bool = False
    # With `rekey`: who publishes (stored in the event's data as `publisher`); only its own
    # keys move; another's is refused with 409 (one publisher cannot move another's resume
    # point).
    owner: str | None = None
    done: AsyncResult = field(default_factory=AsyncResult)


@dataclass(slots=True)
class Commit:
    """One committed write transaction: its requests and the position range it reserved.

    Ids of its new events lie in (after, upto]; some may be unused (repeated keys). Ranges of
    successive commits are contiguous across all processes: the next commit's `after` is this
    `upto`, so a consumer that sees a hole knows a commit is missing.
    """

    requests: list[IngestRequest]
    after: int
    upto: int


@dataclass(slots=True)
class StoredEvent:
    """An event as reads return it; `id` is None while it is accepted but not yet committed."""

    id: int | None
    stream: str
    type: str
    data: str
    client_id: str
    key: str | None
    created_at: str | None
    pending: bool = False

    @property
    def position(self) -> int:
        """The id of a committed event (every row read from the store has one)."""
        if self.id is None:
            raise ValueError("a pending event has no position yet")
        return self.id

    def to_json(self) -> dict[str, Any]:
        """The API representation, for orjson; `data` is spliced in as the JSON stored."""
        out: dict[str, Any] = {
            "id": None if self.id is None else str(self.id),
            "stream": self.stream,
            "type": self.type,
            "data": orjson.Fragment(self.data),
            "clientId": self.client_id,
            "key": self.key,
            "createdAt": self.created_at,
        }
        if self.pending:
            out["pending"] = True
        return out
