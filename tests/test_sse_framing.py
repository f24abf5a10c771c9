"""SSE framing: whatever a publisher sends, parsing the frames yields exactly its events.

The parser (tests/sse.py) follows the WHATWG "event stream interpretation" steps (lines end at CRLF, CR
or LF; a blank line dispatches; `data` lines join with LF; a field name ends at the first colon,
one leading space of the value is dropped; lines starting with a colon are comments).
"""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.schema import TYPE_RE
from streaming.sse import EventStreamFraming
from tests.sse import parse_event_stream

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
types = st.from_regex(TYPE_RE, fullmatch=True)
framing = EventStreamFraming()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(json_values, types), min_size=1, max_size=5))
def test_parsing_frames_yields_exactly_the_published_events(published):
    wire = framing.preamble(1500, "s1.0")
    expected = []
    for n, (value, event_type) in enumerate(published, start=1):
        data = orjson.dumps(value).decode()  # as ingest stores it
        wire += framing.heartbeat() + framing.encode(f"s1.{n}", event_type, data)
        expected.append((f"s1.{n}", event_type, value))
    events, last_id, retry = parse_event_stream(wire)
    assert retry == 1500 and last_id == f"s1.{len(published)}"
    assert [(i, t, orjson.loads(d)) for i, t, d in events] == expected


@pytest.mark.parametrize(
    "payload",
    [
        "line\nbreak",
        "cr\rreturn",
        "crlf\r\nx",
        "data: injected",
        "\u2028\u2029",
        "nul\x00byte",
        "\n\nevent: evil\ndata: {}\n\n",
        "id: 999",
    ],
)
def test_known_injection_payloads_stay_inside_one_event(payload):
    wire = framing.encode("s.1", "message", orjson.dumps({"text": payload}).decode())
    events, last_id, _ = parse_event_stream(wire)
    assert [(i, orjson.loads(d)) for i, _, d in events] == [("s.1", {"text": payload})]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_framing_refuses_multi_line_fields(bad):
    with pytest.raises(ValueError):
        framing.encode(bad, "message", "1")
    with pytest.raises(ValueError):
        framing.encode("1", bad, "1")
    with pytest.raises(ValueError):
        framing.encode("1", "message", bad)


def test_preamble_sets_last_event_id_without_an_event():
    events, last_id, retry = parse_event_stream(framing.preamble(1000, "abc.42"))
    assert events == [] and last_id == "abc.42" and retry == 1000
    assert parse_event_stream(framing.retry_only(5000))[2] == 5000


def test_the_direct_write_chunk_is_pywsgis_chunk_of_the_framed_event():
    from streaming.sse import http_chunk, http_chunk_of, id_prefix, with_position
    from streaming.subscription import LiveEvent

    body = EventStreamFraming().body("message", '{"n":1}')
    event = LiveEvent(4096, "s", "message", '{"n":1}', body)
    prefix = id_prefix("abcdefgh")
    assert prefix + event.tail() == with_position(prefix, 4096, body)
    assert http_chunk_of(prefix, event.tail()) == http_chunk(with_position(prefix, 4096, body))
    assert http_chunk_of(prefix, event.tail()).startswith(
        b"%x\r\nid: abcdefgh.4096\n" % (len(with_position(prefix, 4096, body)))
    )
