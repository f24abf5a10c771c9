"""What Sluice assumes of gevent's internals, checked against the pinned gevent: if an upgrade
renames or reshapes any of it, this fails loudly instead of parking quietly turning off (idle
memory per stream ~5 KB → ~20 KB) with every other test green (issue 26, point 6)."""

from __future__ import annotations

import _socket
import inspect
import socket

import gevent
import gevent.pywsgi
import gevent.socket
import pytest

from web.wsgi import HeaderDeadline, OneSend, Parking, SluiceHandler

# pywsgi methods the handler mixins override (private ones included), as pywsgi defines them.
OVERRIDDEN = [
    (HeaderDeadline, "handle_one_request"),
    (HeaderDeadline, "read_requestline"),
    (HeaderDeadline, "read_request"),
    (HeaderDeadline, "run_application"),
    (OneSend, "_write_with_headers"),
    (OneSend, "finalize_headers"),
    (OneSend, "_sendall"),
    (SluiceHandler, "get_environ"),
    (SluiceHandler, "handle"),
    (SluiceHandler, "log_request"),
]


@pytest.mark.parametrize("mixin, name", OVERRIDDEN, ids=[n for _, n in OVERRIDDEN])
def test_every_overridden_pywsgi_method_still_exists_with_the_same_parameters(mixin, name):
    theirs = getattr(gevent.pywsgi.WSGIHandler, name, None)
    assert theirs is not None, f"pywsgi.WSGIHandler.{name} is gone"
    ours = getattr(mixin, name)
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
    assert getattr(SluiceHandler, name) is not theirs  # and ours is the one that runs


def test_the_pywsgi_state_the_handler_reads_and_writes_is_still_there():
    source = inspect.getsource(gevent.pywsgi.WSGIHandler)
    for attribute in (
        "headers_sent",
        "response_use_chunked",
        "response_headers",
        "status",
        "provided_date",
        "close_connection",
        "wsgi_input",
        "response_length",
    ):
        assert f"self.{attribute}" in source, attribute
    body = gevent.pywsgi.Input(None, 0)
    for attribute in ("chunked_input", "chunk_length", "position", "content_length"):
        assert hasattr(body, attribute), attribute  # web.wsgi.body_unread reads these


def test_the_socket_checks_parking_relies_on_hold():
    """Parking and the one-send path test `type(sock).__module__ == "gevent._socket3"` and use
    `sock._sock`: a cooperative socket must still look like that."""
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert type(sock).__module__ == "gevent._socket3"
        assert isinstance(sock._sock, _socket.socket)  # the C socket beneath
        assert sock._sock.fileno() == sock.fileno()
    finally:
        sock.close()
    assert hasattr(Parking, "park")


def test_the_waiter_the_mailbox_uses_is_still_importable():
    from gevent._waiter import Waiter

    waiter = Waiter()
    gevent.get_hub().loop.run_callback(waiter.switch, "woken")  # switched from the hub
    assert waiter.get() == "woken"


def test_parked_streams_hold_no_greenlet_of_their_own(make_server, database_url):
    """Parking frees the handler: 60 idle SSE streams add (nearly) no greenlets. Were parking
    off, each would keep its handler greenlet (and its ~20 KB) alive."""
    from tests.helpers import auth, wait_until
    from tests.sse import Stream

    server = make_server(database_url)
    server.put("/api/v1/streams/idle/1", headers=auth())

    def greenlets() -> float:
        for line in server.get("/metrics").text.splitlines():
            if line.startswith("sluice_greenlets "):
                return float(line.split()[1])
        raise AssertionError("no sluice_greenlets")

    before = greenlets()
    streams = [
        Stream(server.url + "/api/v1/sse", headers=auth(), params={"stream": "idle/1"}) for _ in range(60)
    ]
    try:
        for s in streams:
            s.next(("retry",))
        wait_until(lambda: greenlets() < before + 60, timeout=15)  # the gauge refreshes
        assert greenlets() < before + 10, (before, greenlets())
    finally:
        for s in streams:
            s.close()
