"""The live dashboard at `/` in headless Chromium against a real server: charts fed by
`/api/v1/stats` over SSE, the stream explorer limited to what the token grants, and a
screenshot written to test-artifacts/dashboard.png."""
import json
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from tests.conftest import ROOT, auth, token, wait_until
from tests.sse import Stream

SCRIPT = ROOT / "tests" / "browser" / "dashboard.py"
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(),
    reason="Debian's chromium is not installed (bash .ci/run installs it with apt-get)")


class Dashboard:
    def __init__(self, server, tok):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), server.url, tok],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def read(self, timeout=60):
        with gevent.Timeout(timeout):
            line = self.proc.stdout.readline()
        assert line, f"browser helper ended: {self.proc.stderr.read()}"
        return json.loads(line)

    def command(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()


def test_dashboard_shows_live_numbers_and_tails_granted_streams(make_server, database_url):
    server = make_server(database_url)
    for name in ("dash/1", "secret/1"):
        server.put(f"/api/v1/streams/{name}", headers=auth())
    viewer = token("viewer", publish=(), subscribe=["dash/*"])
    page = Dashboard(server, viewer)
    assert page.read()["step"] == "live"
    listeners = [Stream(server.url + "/api/v1/sse", headers=auth(), params={"stream": "dash/1"})
                 for _ in range(3)]
    published = []
    for n in range(30):  # about three seconds of traffic
        r = server.post("/api/v1/events", json={"stream": "dash/1", "type": "tick",
                                                "data": {"n": n}}, headers=auth())
        published.append(r.json()["events"][0]["id"])
        gevent.sleep(0.1)
    report = wait_until(lambda: (r := page.command("report")) and
                        max(r["series"]["deliveries"]) > 0 and r, 15, 0.3, "deliveries charted")
    assert max(report["series"]["connections"]) >= 3
    assert max(report["series"]["ingest"]) > 0
    assert max(report["series"]["flush"]) > 0
    assert report["status"].startswith("live")
    page.command("tail dash/1")
    try:
        report = wait_until(lambda: (r := page.command("report")) and len(r["tail"]) >= 30 and r,
                            15, 0.3, "the explorer to show the history")
    except AssertionError:
        print(page.command("report"))
        raise
    assert [row["id"] for row in report["tail"]] == list(reversed(published))  # newest first
    assert report["tail"][0] == {"id": published[-1], "type": "tick", "data": '{"n":29}'}
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.command(f"screenshot {shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A stream the token does not grant: refused, nothing shown.
    page.command("tail secret/1")
    report = wait_until(lambda: (r := page.command("report")) and "403" in r["tailStatus"] and r,
                        15, 0.3, "the refusal")
    assert report["tail"] == []
    page.finish()
    for s in listeners:
        s.close()


def test_stats_need_a_valid_token(server):
    r = server.get("/api/v1/stats", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401
    assert server.get("/").status_code == 200
    assert b"/static/dashboard.js" in server.get("/").content
