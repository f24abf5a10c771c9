"""static/sluice.js in headless Chromium against real servers: both transports, a server restart
in the middle, a refusal, and the fall back to long-poll behind a buffering proxy."""

import signal
import socket

import gevent
import pytest
from gevent.server import StreamServer

from tests.browser_helper import BrowserHelper, needs_chromium
from tests.helpers import auth, token, wait_until

pytestmark = needs_chromium


class Page(BrowserHelper):
    """tests/browser/client.py: a page using static/sluice.js."""

    def __init__(self, page_url, sluice_url, stream, transport, tok=None, last_event_id=None):
        super().__init__(
            "client.py",
            page_url,
            sluice_url,
            tok or token(),
            stream,
            transport,
            *([last_event_id] if last_event_id else []),
        )

    def report(self):
        return self.command("report")

    def wait_for_events(self, n, timeout=40):
        return wait_until(
            lambda: (r := self.report()) and len(r["got"]) >= n and r, timeout, 0.2, f"{n} events in the page"
        )


def held_by(server, stream):
    """Wait until the server holds the page's subscription. A first poll without a cursor
    starts at "now" when it reaches the server, and the page says `polling` when it sends it:
    events published before it arrives are not its to see (a loaded CI run once lost them)."""
    wait_until(
        lambda: server.get(f"/api/v1/streams/{stream}", headers=auth()).json()["subscribers"] >= 1,
        20,
        message="the page's subscription on the server",
    )


def publish(server, stream, data, type_="message"):
    r = server.post("/api/v1/events", json={"stream": stream, "type": type_, "data": data}, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["events"][0]["id"]


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_client_receives_and_resumes_across_a_server_restart(make_server, database_url, transport):
    server = make_server(database_url, RETRY_BASE_MS="300", RETRY_MAX_MS="1000")
    other = make_server(database_url)  # publishes while the first is down
    server.put("/api/v1/streams/live/1", headers=auth())
    page = Page(server.url, server.url, "live/1", transport)
    assert page.read()["step"] == "subscribed"
    held_by(server, "live/1")
    ids = [publish(server, "live/1", n) for n in range(3)]
    ids.append(publish(server, "live/1", "hi", "chat"))
    page.wait_for_events(5)  # 4 events, and the chat one twice (onEvent and on("chat"))

    server.signal(signal.SIGTERM)
    assert server.wait(timeout=25) == 0
    ids += [publish(other, "live/1", m) for m in ("m1", "m2")]  # while the server is down
    server.start()
    ids += [publish(server, "live/1", n) for n in (3, 4)]
    report = page.wait_for_events(9)
    gevent.sleep(1.0)  # a duplicate would arrive now
    report = page.report()
    page.finish()
    events = [g for g in report["got"] if "chat" not in g]
    assert [e["id"] for e in events] == ids  # every event once, in order, across the restart
    assert [e["data"] for e in events] == [0, 1, 2, "hi", "m1", "m2", 3, 4]
    assert [e["type"] for e in events][3] == "chat"
    assert {"chat": "hi"} in report["got"]
    sids = {e["lastEventId"].split(".")[0] for e in events}
    assert len(sids) == 1  # one connection id all along
    assert report["transport"] == transport
    assert report["errors"] == []


def test_client_reports_a_refusal_and_stops(make_server, database_url):
    server = make_server(database_url)
    page = Page(server.url, server.url, "no/such/stream", "auto")
    assert page.read()["step"] == "subscribed"
    report = page.report()
    page.finish()
    assert [e["status"] for e in report["errors"]] == [404]
    assert report["statuses"][-1] == "closed"


class BufferingProxy:
    """Holds back every response until the server has finished it (as some corporate proxies
    and misconfigured front-ends do): an event stream never gets through, polls do."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.sse_requests = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, client, _address):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, body = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            if lines[0].startswith("GET /api/v1/sse"):
                self.sse_requests += 1
            kept = [h for h in lines[1:] if h.split(":")[0].lower() not in ("connection", "keep-alive")]
            request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            upstream.sendall(request + body)
            answer = b""
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                answer += chunk
            upstream.close()
            client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()

    def close(self):
        self.server.stop(timeout=1)


def test_client_falls_back_to_long_poll_behind_a_buffering_proxy(make_server, database_url):
    server = make_server(database_url)
    server.put("/api/v1/streams/buffered", headers=auth())
    proxy = BufferingProxy(server.port)
    try:
        page = Page(proxy.url, proxy.url, "buffered", "auto")
        assert page.read()["step"] == "subscribed"
        ids = [publish(server, "buffered", n) for n in range(3)]
        report = page.wait_for_events(3)
        page.finish()
    finally:
        proxy.close()
    assert report["transport"] == "poll"
    assert "open" not in report["statuses"] and "polling" in report["statuses"]
    assert proxy.sse_requests >= 2  # it tried EventSource first
    assert [g["id"] for g in report["got"]] == ids
    assert [g["data"] for g in report["got"]] == [0, 1, 2]


def test_client_polls_where_eventsource_is_missing(make_server, database_url):
    server = make_server(database_url)
    server.put("/api/v1/streams/old/browser", headers=auth())
    page = Page(server.url, server.url, "old/browser", "auto-without-eventsource")
    assert page.read()["step"] == "subscribed"
    held_by(server, "old/browser")
    ids = [publish(server, "old/browser", n) for n in range(2)]
    report = page.wait_for_events(2)
    page.finish()
    assert report["transport"] == "poll" and report["statuses"][0] == "polling"
    assert [g["id"] for g in report["got"]] == ids


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_client_surfaces_history_gone_then_gets_what_is_left(make_server, database_url, transport):
    server = make_server(database_url, STORAGE_SLICE_POSITIONS="10", RETENTION_PRUNE_S="0.2")
    server.put("/api/v1/streams/short/browser", json={"retention": {"maxEvents": 2}}, headers=auth())
    ids = [publish(server, "short/browser", n) for n in range(5)]

    def pruned():
        r = server.get("/api/v1/events", params={"stream": "short/browser"}, headers=auth())
        return [e["data"] for e in r.json()["events"]] == [3, 4]

    wait_until(pruned, 30, message="the count limit to prune")
    page = Page(server.url, server.url, "short/browser", transport, last_event_id="0")
    assert page.read()["step"] == "subscribed"
    report = page.wait_for_events(2)
    page.finish()
    assert report["resets"] == [{"reason": "history-gone", "streams": ["short/browser"], "oldest": ids[3]}]
    assert [(g["id"], g["data"]) for g in report["got"]] == [(ids[3], 3), (ids[4], 4)]
