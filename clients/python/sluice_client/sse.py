"""An incremental text/event-stream parser following the WHATWG interpretation rules: lines end
at CRLF, LF or CR (also split across reads), `:` starts a comment, one leading space after the
colon is dropped, the last-event-id buffer persists across events and an `id` with NUL is
ignored, `retry` takes digits only, and an event with no data is not dispatched."""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One dispatched event: its id (what a reconnect resumes after), type and data text."""

    id: str
    type: str
    data: str

    @property
    def value(self) -> Any:
        """The data parsed as JSON (Sluice's native events are always JSON)."""
        return json.loads(self.data)

    @property
    def position(self) -> str:
        """The position part of a native id (`<sid>.<position>`), as history reads take it."""
        return self.id.rpartition(".")[2]


class SSEParser:
    """Feed it bytes as they arrive; it returns the events each piece completes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._carry = ""  # an unfinished line (and a CR that may start a CRLF)
        self._started = False
        self._data: list[str] = []
        self._type = ""
        self._id = ""
        self.last_event_id = ""  # what EventSource would send as Last-Event-ID
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._carry + self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text[1:] if text.startswith("\ufeff") else text
        held = ""
        if text.endswith("\r"):  # wait: the next byte may be the LF of a CRLF
            text, held = text[:-1], "\r"
        *complete, rest = _LINE_END.split(text)
        self._carry = rest + held
        events: list[Event] = []
        for line in complete:
            event = self._take(line)
            if event is not None:
                events.append(event)
        return events

    def _take(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        self.last_event_id = self._id
        data, kind = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return Event(self._id, kind or "message", "\n".join(data))
