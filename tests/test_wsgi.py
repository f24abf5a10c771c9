"""The lean request-header parser, alone and on a real server over raw sockets."""

import io
import socket

import pytest

from tests.helpers import auth
from web.wsgi import MAX_HEADERS, RequestHeaders


def parse(raw: bytes) -> RequestHeaders:
    return RequestHeaders(io.BytesIO(raw))


def test_parses_names_case_insensitively_and_keeps_raw_lines():
    h = parse(b"Host: x\r\nContent-Type: application/json\r\nX-A: 1\r\n\r\nBODY")
    assert h.status == "" and h.get("content-type") == "application/json"
    assert h.typeheader == "application/json" and h.getheader("HOST") == "x"
    assert list(h.headers) == ["Host: x\r\n", "Content-Type: application/json\r\n", "X-A: 1\r\n"]
    assert h.items() == [("Host", "x"), ("Content-Type", "application/json"), ("X-A", "1")]
    assert parse(b"X-F: a\r\n b\r\n\r\n").items() == [("X-F", "a b")]
    del h["x-a"]
    assert "X-A" not in h and len(list(h.headers)) == 2


def test_limits_and_malformed_lines_set_status():
    assert parse(b"X: " + b"a" * 70000 + b"\r\n\r\n").status
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n"
    assert parse(many).status
    assert parse(b"no colon here\r\n\r\n").status


def raw_request(server, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


@pytest.fixture
def srv(module_server):
    return module_server


def test_folded_header_is_refused(srv):
    """RFC 9112 obs-fold: a reader that unfolds and one that does not disagree (400)."""
    token = auth()["Authorization"]
    req = (
        b"GET /api/v1/events?clientId=nobody HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + token.encode()
        + b"\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n"
    )
    assert raw_request(srv, req).startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 70000 + b"\r\n",
        b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)),
        b"garbage without colon\r\n",
    ],
)
def test_oversized_or_malformed_headers_are_400(srv, headers):
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    assert raw_request(srv, req).startswith(b"HTTP/1.1 400")
    assert srv.get("/healthz").status_code == 200  # and the server carries on


@pytest.mark.parametrize(("size", "chunked", "sends"), [(100, False, 1), (100, True, 1), (70_000, False, 2)])
def test_headers_and_a_small_first_chunk_go_out_in_one_send(size, chunked, sends):
    """A real pywsgi server with Sluice's handler, recording its writes: a small answer is one
    send (pywsgi alone makes two), a large first chunk keeps two, and the bytes are intact."""
    import gevent
    from gevent.pywsgi import WSGIServer

    from web.wsgi import SluiceHandler

    writes: list[int] = []

    class Recording(SluiceHandler):
        def _sendall(self, data):
            writes.append(len(data))
            return super()._sendall(data)

    body = b"x" * size

    def app(environ, start_response):
        headers = [("Content-Type", "text/plain")]
        if not chunked:
            headers.append(("Content-Length", str(size)))
        start_response("200 OK", headers)
        return iter([body]) if chunked else [body]  # an iterator: pywsgi cannot count it

    server = WSGIServer(("127.0.0.1", 0), app, log=None, handler_class=Recording)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        gevent.sleep(0)
    finally:
        server.stop()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if chunked:
        assert b"Transfer-Encoding: chunked" in head
        assert rest == b"%x\r\n" % size + body + b"\r\n0\r\n\r\n"
        assert writes[:sends] and len(writes) == sends + 1  # and the last `0` chunk
    else:
        assert rest == body
        assert len(writes) == sends


@pytest.mark.parametrize("own_date", [False, True])
def test_a_body_larger_than_one_send_arrives_whole_with_one_date_header(own_date):
    """A write the kernel takes only part of at once (32 MB, past any loopback socket's
    buffers, to a client that reads after a pause) is finished by the cooperative sendall;
    every answer carries one `Date`, the handler's (formatted once a second) or the
    application's own."""
    import time

    import gevent
    from gevent.pywsgi import WSGIServer

    from web.wsgi import SluiceHandler, http_date

    body = bytes(range(256)) * (32 * 4096)

    def app(environ, start_response):
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
        if own_date:
            headers.append(("Date", "Thu, 01 Jan 1970 00:00:00 GMT"))
        start_response("200 OK", headers)
        return [body]

    server = WSGIServer(("127.0.0.1", 0), app, log=None, handler_class=SluiceHandler)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            gevent.sleep(0.2)  # the server's first send fills the buffers and returns short
            parts = []
            while chunk := s.recv(1 << 20):
                parts.append(chunk)
    finally:
        server.stop()
    head, _, rest = b"".join(parts).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == body
    dates = [line for line in head.split(b"\r\n") if line.lower().startswith(b"date:")]
    assert len(dates) == 1
    if own_date:
        assert dates[0] == b"Date: Thu, 01 Jan 1970 00:00:00 GMT"
    else:
        from email.utils import parsedate_to_datetime

        sent = parsedate_to_datetime(dates[0].split(b": ", 1)[1].decode()).timestamp()
        assert abs(sent - time.time()) < 60 and http_date().endswith(b" GMT")
