"""The live dashboard at `/` in headless Chromium against a real server: charts fed by
`/api/v1/stats` over SSE, the stream explorer limited to what the token grants, and a
screenshot written to test-artifacts/dashboard.png."""

import json
import socket

import gevent
import gevent.event

from tests.browser_helper import BrowserHelper, needs_chromium
from tests.helpers import ROOT, auth, token, wait_until
from tests.sse import Stream

ARTIFACTS = ROOT / "test-artifacts"
pytestmark = needs_chromium


class Dashboard(BrowserHelper):
    def __init__(self, server, tok):
        super().__init__("dashboard.py", server.url, tok)


def test_dashboard_shows_live_numbers_and_tails_granted_streams(make_server, database_url):
    server = make_server(database_url)
    for name in ("dash/1", "secret/1"):
        server.put(f"/api/v1/streams/{name}", headers=auth())
    viewer = token("viewer", publish=(), subscribe=["dash/*"], operator=True)  # fleet numbers
    page = Dashboard(server, viewer)
    assert page.read()["step"] == "live"
    listeners = [
        Stream(server.url + "/api/v1/sse", headers=auth(), params={"stream": "dash/1"}) for _ in range(3)
    ]
    published = []
    for n in range(30):  # about three seconds of traffic
        r = server.post(
            "/api/v1/events", json={"stream": "dash/1", "type": "tick", "data": {"n": n}}, headers=auth()
        )
        published.append(r.json()["events"][0]["id"])
        gevent.sleep(0.1)
    report = wait_until(
        lambda: (r := page.command("report")) and max(r["series"]["deliveries"]) > 0 and r,
        15,
        0.3,
        "deliveries charted",
    )
    assert max(report["series"]["connections"]) >= 3
    assert max(report["series"]["ingest"]) > 0
    assert max(report["series"]["flush"]) > 0
    assert report["status"].startswith("live")
    page.command("tail dash/1")
    report = wait_until(
        lambda: (r := page.command("report")) and len(r["tail"]) >= 30 and r,
        15,
        0.3,
        "the explorer to show the history",
    )
    assert [row["id"] for row in report["tail"]] == list(reversed(published))  # newest first
    assert report["tail"][0] == {"id": published[-1], "type": "tick", "data": '{"n":29}'}
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.command(f"screenshot {shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A stream the token does not grant: refused, nothing shown.
    page.command("tail secret/1")
    report = wait_until(
        lambda: (r := page.command("report")) and "403" in r["tailStatus"] and r, 15, 0.3, "the refusal"
    )
    assert report["tail"] == []
    page.finish()
    for s in listeners:
        s.close()


def test_dashboard_tables_axes_and_publish_form(make_server, database_url):
    """Streams (subscribers across processes, events/s, last event, retention) and processes
    (host and pid, connections, uptime, heartbeat), axes with units, and the publish form."""
    a = make_server(database_url)
    b = make_server(database_url)
    a.put("/api/v1/streams/dash/2", json={"retention": {"maxEvents": 500}}, headers=auth())
    listeners = [
        Stream(b.url + "/api/v1/sse", headers=auth(), params={"stream": "dash/2"}) for _ in range(3)
    ]  # on the other process
    page = Dashboard(a, token("viewer", publish=["dash/*"], subscribe=["dash/*"], operator=True))
    assert page.read()["step"] == "live"
    sent_ids: list[str] = []
    stop = gevent.event.Event()

    def traffic():  # stops between requests: a kill mid-request would lose the last id
        while not stop.is_set():
            sent_ids.append(
                a.post("/api/v1/events", json={"stream": "dash/2", "data": 1}, headers=auth()).json()[
                    "events"
                ][0]["id"]
            )
            stop.wait(0.1)

    def row_of(report, name):
        return next((r for r in report["streams"] if r[0] == name), None)

    sender = gevent.spawn(traffic)
    wait_until(
        lambda: (
            (r := page.command("report"))
            and (row := row_of(r, "dash/2"))
            and row[1] == "3"
            and float(row[2]) > 0
        ),
        15,
        0.3,
        "dash/2 with 3 subscribers and a rate",
    )
    stop.set()
    sender.join()
    last = sent_ids[-1]
    busy = wait_until(
        lambda: (
            (r := page.command("report"))
            and (row := row_of(r, "dash/2"))
            and row[3].startswith(f"#{last} · ")
            and r
        ),
        15,
        0.3,
        "the last event in the table",
    )
    name, subscribers, rate, last_event, kept = row_of(busy, "dash/2")
    assert kept == "1 d, at most 500 events"  # the override's count, the default's age
    pids = sorted(str(s.proc.pid) for s in (a, b))
    assert sorted(p[0].split(" · ")[1] for p in busy["processes"]) == pids
    assert all(p[0].split(" · ")[0] == socket.gethostname() for p in busy["processes"])
    on_b = next(p for p in busy["processes"] if p[0].endswith(str(b.proc.pid)))
    assert int(on_b[1]) >= 3 and on_b[3].endswith(" s ago")
    for key, unit in (
        ("ingest", "events/s"),
        ("deliveries", "deliveries/s"),
        ("flush", "ms"),
        ("backlog", "events"),
        ("connections", "connections"),
    ):
        axis = busy["axes"][key]
        assert axis["title"].endswith(f"({unit})")
        assert {"60 s ago", "30 s", "now", "0"} <= set(axis["labels"])
    ingest_top = float(busy["axes"]["ingest"]["labels"][0].replace(",", ""))
    assert ingest_top >= max(busy["series"]["ingest"])  # the axis covers what is drawn
    assert "dash/*" in busy["grants"]

    page.command("publish dash/form")
    report = page.command("report")
    assert report["published"].startswith("published #")
    sent = report["published"].removeprefix("published #")
    stored = a.get("/api/v1/events", params={"stream": "dash/form"}, headers=auth()).json()
    assert [(e["id"], e["type"], e["data"]) for e in stored["events"]] == [
        (sent, "test", {"from": "the dashboard"})
    ]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-tables.png"
    page.command(f"screenshot {shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.command("publish secret/1")  # not granted to this token
    assert page.command("report")["published"].startswith("403 ")
    assert a.get("/api/v1/streams/secret/1", headers=auth()).status_code == 404  # not created
    page.finish()
    for s in listeners:
        s.close()


def test_stats_need_a_valid_token(server):
    r = server.get("/api/v1/stats", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401
    assert server.get("/").status_code == 200
    assert b"/static/dashboard.js" in server.get("/").content


def test_stats_streams_count_against_the_token_limit(make_server, database_url):
    server = make_server(database_url, MAX_CONNECTIONS_PER_TOKEN="1")
    mine = auth("watcher", operator=True)
    first = Stream(server.url + "/api/v1/stats", headers=mine)
    try:
        assert first.response.status_code == 200
        stats = first.next()
        assert stats[2] == "stats" and {"sse", "deliveries", "backlog"} <= set(json.loads(stats[3]))
        second = Stream(server.url + "/api/v1/stats", headers=mine)
        assert second.response.status_code == 429
        second.close()
    finally:
        first.close()


def test_explorer_shows_that_history_is_gone(make_server, database_url):
    server = make_server(database_url, STORAGE_SLICE_POSITIONS="10", RETENTION_PRUNE_S="0.2")
    server.put("/api/v1/streams/dash/short", json={"retention": {"maxEvents": 2}}, headers=auth())
    ids = [
        server.post("/api/v1/events", json={"stream": "dash/short", "data": n}, headers=auth()).json()[
            "events"
        ][0]["id"]
        for n in range(4)
    ]

    def pruned():
        r = server.get("/api/v1/events", params={"stream": "dash/short"}, headers=auth())
        return len(r.json()["events"]) == 2

    wait_until(pruned, 30, message="the count limit to prune")
    page = Dashboard(server, token("viewer", publish=(), subscribe=["dash/*"], operator=True))
    assert page.read()["step"] == "live"
    page.command("tail dash/short")
    report = wait_until(
        lambda: (r := page.command("report")) and len(r["tail"]) >= 2 and r,
        15,
        0.3,
        "the explorer to show what is left",
    )
    page.finish()
    assert [row["id"] for row in report["tail"]] == [ids[3], ids[2]]
    assert report["resets"] == [f"history before #{ids[2]} is gone (history-gone: dash/short)"]


def test_stats_show_a_token_only_its_streams_and_fleet_numbers_only_to_an_operator(make_server, database_url):
    server = make_server(database_url)
    for name in ("mine/1", "theirs/1"):
        server.post("/api/v1/events", json={"stream": name, "data": 1}, headers=auth())
    views = {}
    for who, claims in (
        ("user", {"subscribe": ["mine/**"]}),
        ("nobody", {"subscribe": []}),
        ("operator", {"subscribe": [], "operator": True}),
    ):
        s = Stream(server.url + "/api/v1/stats", headers=auth(who, publish=(), **claims))
        try:
            assert s.response.status_code == 200
            views[who] = wait_until(
                lambda s=s: (
                    (v := json.loads(s.next()[3])) and (v["scope"] == "streams" or v["streams"]) and v
                ),
                15,
            )
        finally:
            s.close()
    assert set(views["user"]) == {"scope", "time", "streams"}  # no hosts, pids, fleet numbers
    assert [row["name"] for row in views["user"]["streams"]] == ["mine/1"]
    assert views["nobody"]["streams"] == []
    operator = views["operator"]
    assert {row["name"] for row in operator["streams"]} == {"mine/1", "theirs/1"}
    assert operator["process_list"][0]["pid"] == server.proc.pid and "deliveries" in operator
