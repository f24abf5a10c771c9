"""A Mercure update: how a publish form becomes one stored event, and that event SSE bytes.

Every update is one event of the internal stream `MERCURE_STREAM`, whose name no native request
can give (native names start with a letter or digit), so only this door reads or writes it. The
update's id is the event's idempotency key under `MERCURE_CLIENT` (a client id no token can
have: token subjects are non-empty), which makes a retried publish safe and lets any process
find the position an id stands for. The event's data is a JSON document of the update.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from common.problems import Problem, invalid_parameter
from ingest.events import NewEvent

MERCURE_STREAM = ".mercure"
MERCURE_CLIENT = ""
RESERVED_PATH = "/.well-known/mercure"
TOPIC_MAX = 2048
ID_MAX = 200  # an idempotency key's limit (ingest.schema.KEY_MAX)
TYPE_MAX = 200
TOPICS_MAX = 50
DEFAULT_TYPE = "message"


@dataclass(frozen=True, slots=True)
class Update:
    """One update as stored: its topics (the first is canonical), data, and SSE fields."""

    id: str
    topics: tuple[str, ...]
    data: str
    private: bool = False
    type: str | None = None
    retry: int | None = None

    def to_event(self, publisher: str | None = None) -> NewEvent:
        doc = {
            "topics": list(self.topics),
            "data": self.data,
            "private": self.private,
            "id": self.id,
            "type": self.type,
            "retry": self.retry,
            "publisher": publisher,
        }
        return NewEvent(MERCURE_STREAM, self.type or DEFAULT_TYPE, orjson.dumps(doc).decode(), key=self.id)

    @classmethod
    def from_data(cls, data: str) -> Update:
        doc = orjson.loads(data)
        return cls(
            doc["id"],
            tuple(doc["topics"]),
            doc["data"],
            bool(doc["private"]),
            doc.get("type"),
            doc.get("retry"),
        )

    def sse(self) -> bytes:
        """The event as every subscriber gets it (its `id:` is the update's, not per connection):
        encoded once per update. `data` is split into `data:` lines at each CR, LF or CRLF, as an
        EventSource splits them, so the subscriber reads back exactly what was published."""
        out = [f"id: {self.id}\n"]
        if self.type:
            out.append(f"event: {self.type}\n")
        if self.retry is not None:
            out.append(f"retry: {self.retry}\n")
        lines = self.data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        out.extend(f"data: {line}\n" for line in lines)
        out.append("\n")
        return "".join(out).encode()


def _single(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name) or []
    if len(values) > 1:
        raise invalid_parameter(name, f"`{name}` may be given once")
    return values[0] if values else None


def _one_line(name: str, value: str, limit: int) -> str:
    if any(c in value for c in "\r\n\x00"):
        raise invalid_parameter(name, f"`{name}` must be one line (no CR, LF or NUL)")
    if not value or len(value) > limit:
        raise invalid_parameter(name, f"`{name}` must be 1 to {limit} characters")
    return value


def reserved(topic: str) -> bool:
    """A topic in the hub's own namespace (`/.well-known/mercure...`, relative or absolute)."""
    path = urlsplit(topic).path if "://" in topic else topic
    return path == RESERVED_PATH or path.startswith(RESERVED_PATH + "/")


def parse_update(form: Mapping[str, Sequence[str]], max_data_bytes: int) -> Update:
    """An update from the publish form's fields, or a 400 naming the first thing wrong."""
    topics = list(form.get("topic") or [])
    if not topics:
        raise invalid_parameter("topic", "give at least one `topic`")
    if len(topics) > TOPICS_MAX:
        raise invalid_parameter("topic", f"at most {TOPICS_MAX} topics per update")
    for topic in topics:
        if not topic or len(topic) > TOPIC_MAX or any(c in topic for c in "\r\n\x00"):
            raise invalid_parameter("topic", f"a topic is 1 to {TOPIC_MAX} characters on one line")
        if reserved(topic):
            raise Problem(
                400,
                "reserved-topic",
                f"topics under `{RESERVED_PATH}` belong to the hub itself: {topic!r}",
                field="topic",
            )
    data = _single(form, "data") or ""
    if "\x00" in data:
        raise invalid_parameter("data", "`data` must not contain NUL")
    if len(data.encode()) > max_data_bytes:
        raise invalid_parameter("data", f"`data` is larger than {max_data_bytes} bytes")
    update_id = _single(form, "id")
    if update_id is None:
        update_id = f"urn:uuid:{uuid.uuid4()}"
    else:
        _one_line("id", update_id, ID_MAX)
        if update_id.startswith("#"):
            raise invalid_parameter("id", "an `id` must not start with `#`")
        if update_id == "earliest":
            raise invalid_parameter("id", "`earliest` is reserved for resuming from the start")
    event_type = _single(form, "type")
    if event_type is not None:
        _one_line("type", event_type, TYPE_MAX)
    raw_retry = _single(form, "retry")
    retry = None
    if raw_retry is not None:
        if not raw_retry.isascii() or not raw_retry.isdigit() or len(raw_retry) > 10:
            raise invalid_parameter("retry", "`retry` must be a non-negative integer (ms)")
        retry = int(raw_retry)
    private = "private" in form
    return Update(update_id, tuple(dict.fromkeys(topics)), data, private, event_type or None, retry)
