"""EventSource in headless Chromium (Playwright driving Debian's chromium) against real servers.

The browser runs in a helper process (tests/browser/eventsource.py); see its docstring.
"""

import json
import re
import signal

from tests.browser_helper import BrowserHelper, needs_chromium
from tests.helpers import auth, token

pytestmark = needs_chromium


class Browser(BrowserHelper):
    """tests/browser/eventsource.py running one scenario against `server`."""

    def __init__(self, scenario, server, stream):
        super().__init__("eventsource.py", scenario, server.url, token(), stream)

    def send(self):
        self.tell("go")

    def report(self):
        return self.command("report")


def sse_requests(server, status):
    text = server.get("/metrics").text
    match = re.search(
        rf'sluice_http_responses_total{{route="/api/v1/sse",status="{status}"}} '
        r"([0-9.]+)",
        text,
    )
    return float(match.group(1)) if match else 0.0


def test_unknown_stream_makes_exactly_one_request(server):
    b = Browser("unknown-stream", server, "does/not/exist")
    closed = b.read()
    b.finish()
    assert closed["step"] == "closed" and closed["opens"] == 0
    assert sse_requests(server, 404) == 1.0  # EventSource gave up after one 404


def test_receives_keeps_its_connection_id_and_resumes_after_a_restart(make_server, database_url):
    server = make_server(database_url)
    other = make_server(database_url)  # publishes while the first is down
    server.put("/api/v1/streams/browser/1", headers=auth())
    b = Browser("receive-and-resume", server, "browser/1")
    first = b.read()
    assert [g["data"] for g in first["got"]] == [0, 1, 2]
    sid = first["got"][0]["id"].split(".")[0]
    assert [g["id"] for g in first["got"]] == [f"{sid}.{i}" for i in first["published"]]

    server.signal(signal.SIGTERM)  # the stream gets a final retry:, then the process exits
    assert server.wait(timeout=25) == 0
    missed = [
        other.post("/api/v1/events", json={"stream": "browser/1", "data": d}, headers=auth()).json()[
            "events"
        ][0]["id"]
        for d in ("m1", "m2")
    ]
    server.start()
    b.send()
    done = b.read()
    b.finish()
    ids = first["published"] + missed + done["published"][3:]
    assert [g["id"] for g in done["got"]] == [f"{sid}.{i}" for i in ids]  # same sid throughout
    assert [g["data"] for g in done["got"]] == [0, 1, 2, "m1", "m2", 3, 4]  # nothing missed, once
    assert done["opens"] >= 2


class CuttingProxy:
    """A loopback TCP proxy in front of the server that records each SSE request's
    `Last-Event-ID` and the `retry:` the server answered with, and can cut every connection
    (as a network drop would) so the browser has to reconnect."""

    def __init__(self, upstream_port):
        import gevent
        from gevent.server import StreamServer

        self.upstream_port = upstream_port
        self.streams = []  # [{"last_event_id": ..., "retry": ...}] per SSE connection
        self.live = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._gevent = gevent

    def _handle(self, client, _address):
        import socket as socket_module

        upstream = socket_module.create_connection(("127.0.0.1", self.upstream_port))
        self.live.append((client, upstream))
        current = {}  # the SSE request this connection carries now (keep-alive reuses them)

        def pump(src, dst, inspect):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    inspect(data)
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket_module.SHUT_RDWR)
                except OSError:
                    pass

        def request(data):
            if data.startswith(b"GET /api/v1/sse"):
                lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
                rec = {
                    "last_event_id": next(
                        (
                            h.split(":", 1)[1].strip()
                            for h in lines[1:]
                            if h.lower().startswith("last-event-id:")
                        ),
                        None,
                    ),
                    "seen": b"",
                }
                current["rec"] = rec
                self.streams.append(rec)

        def response(data):
            rec = current.get("rec")
            if rec is not None and "retry" not in rec:
                rec["seen"] += data
                match = re.search(rb"\nretry: (\d+)\n", rec["seen"])
                if match:
                    rec["retry"] = int(match.group(1))

        up = self._gevent.spawn(pump, client, upstream, request)
        pump(upstream, client, response)
        up.join()

    def cut_all(self):
        import socket as socket_module

        for pair in self.live:
            for sock in pair:
                try:
                    sock.shutdown(socket_module.SHUT_RDWR)
                except OSError:
                    pass
        self.live = []

    def close(self):
        self.cut_all()
        self.server.stop()


def test_reconnecting_again_and_again_gets_a_growing_retry(make_server, database_url):
    from tests.helpers import wait_until

    server = make_server(database_url, RETRY_BASE_MS="200", RETRY_MAX_MS="3200")
    server.put("/api/v1/streams/browser/storm", headers=auth())
    proxy = CuttingProxy(server.port)
    b = Browser("hold", proxy, "browser/storm")
    assert b.read()["step"] == "open"
    published = []
    for n in range(6):
        wait_until(
            lambda n=n: len(proxy.streams) == n + 1 and "retry" in proxy.streams[-1],
            timeout=30,
            message=f"connection {n + 1} through the proxy",
        )
        published.append(
            server.post("/api/v1/events", json={"stream": "browser/storm", "data": n}, headers=auth()).json()[
                "events"
            ][0]["id"]
        )
        wait_until(
            lambda n=n: len(b.report()["got"]) == n + 1, timeout=30, message=f"event {n} in the browser"
        )
        proxy.cut_all()  # a network drop: EventSource reconnects with Last-Event-ID
    report = b.report()
    b.finish()
    proxy.close()
    retries = [s["retry"] for s in proxy.streams]
    sid = report["got"][0]["id"].split(".")[0]
    # Every reconnect named the same connection id and the last event the browser had.
    assert [s["last_event_id"] for s in proxy.streams[1:]] == [
        f"{sid}.{i}" for i in published[: len(proxy.streams) - 1]
    ]
    # Full jitter under a doubling ceiling: each retry within its ceiling, and it grows.
    ceilings = [min(3200, 200 * 2**n) for n in range(len(retries))]
    assert retries[0] == 200 and all(200 <= r <= c for r, c in zip(retries, ceilings, strict=False))
    assert max(retries[3:]) > 400  # a 1-in-10^5 chance of three draws at the bottom
    assert [g["data"] for g in report["got"]] == list(range(6))  # nothing missed, once each
    assert report["state"] != 2  # still reconnecting: it never gave up


def test_cross_origin_eventsource_with_credentials_follows_cors_origins(make_server, database_url):
    """A page on http://localhost:P opens EventSource to http://127.0.0.1:Q (another origin):
    with credentials it works only where that origin is listed; `*` serves it only without
    credentials; an unlisted origin gets nothing."""
    page = make_server(database_url)
    page_origin = f"http://localhost:{page.port}"
    listed = make_server(database_url, CORS_ORIGINS=f"https://other.example,{page_origin}")
    wildcard = make_server(database_url, CORS_ORIGINS="*")
    unlisted = make_server(database_url, CORS_ORIGINS="https://other.example")
    listed.put("/api/v1/streams/room/1", headers=auth())
    listed.post("/api/v1/events", json={"stream": "room/1", "data": {"hello": 1}}, headers=auth())
    query = f"/api/v1/sse?stream=room/1&lastEventId=0&token={token()}"
    targets = [
        {"url": listed.url + query, "credentials": True},
        {"url": wildcard.url + query, "credentials": False},
        {"url": wildcard.url + query, "credentials": True},
        {"url": unlisted.url + query, "credentials": False},
    ]
    b = BrowserHelper("eventsource.py", "cors", page_origin, "-", "-")
    report = b.command(json.dumps(targets))
    b.finish()
    assert report["origin"] == page_origin
    results = report["results"]
    assert results[0]["got"] == {"hello": 1}  # listed origin, with credentials
    assert results[1]["got"] == {"hello": 1}  # wildcard, without credentials
    assert results[2] == {"got": None, "state": 2}  # wildcard never carries credentials
    assert results[3] == {"got": None, "state": 2}  # origin not listed
