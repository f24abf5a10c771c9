"""EventSource in headless Chromium (Playwright driving Debian's chromium) against real servers.

The browser runs in a helper process (tests/browser/eventsource.py); see its docstring.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, auth, token

SCRIPT = ROOT / "tests" / "browser" / "eventsource.py"
pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(),
    reason="Debian's chromium is not installed (bash .ci/run installs it with apt-get)")


class Browser:
    def __init__(self, scenario, server, stream):
        env = {k: v for k, v in os.environ.items()}
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), scenario, server.url, token(),
                                      stream], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def read(self, timeout=90):
        from gevent import Timeout
        with Timeout(timeout):
            line = self.proc.stdout.readline()
        assert line, f"browser helper ended: {self.proc.stderr.read()}"
        return json.loads(line)

    def send(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self):
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()


def sse_requests(server, status):
    text = server.get("/metrics").text
    match = re.search(rf'sluice_http_responses_total{{route="/api/v1/sse",status="{status}"}} '
                      r'([0-9.]+)', text)
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
    missed = [other.post("/api/v1/events", json={"stream": "browser/1", "data": d},
                         headers=auth()).json()["events"][0]["id"] for d in ("m1", "m2")]
    server.start()
    b.send()
    done = b.read()
    b.finish()
    ids = first["published"] + missed + done["published"][3:]
    assert [g["id"] for g in done["got"]] == [f"{sid}.{i}" for i in ids]  # same sid throughout
    assert [g["data"] for g in done["got"]] == [0, 1, 2, "m1", "m2", 3, 4]  # nothing missed, once
    assert done["opens"] >= 2
