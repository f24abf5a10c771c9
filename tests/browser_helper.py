"""Runs a browser helper script (tests/browser/*.py) in its own process and talks to it: JSON
lines on its stdout, commands on its stdin (Playwright's sync API must not meet the test
session's gevent patching, so Chromium is driven from a separate plain-Python process)."""

import json
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from tests.helpers import ROOT

# Browser tests are marked `browser`, and skipped only where Debian's chromium is missing
# (bash .ci/run installs it with apt-get when run as root).
needs_chromium = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path("/usr/bin/chromium").exists(),
        reason="Debian's chromium is not installed (bash .ci/run installs it with apt-get)",
    ),
]


class BrowserHelper:
    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "browser" / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def read(self, timeout: float = 90) -> dict:
        """The helper's next JSON line."""
        with gevent.Timeout(timeout):
            line = self.proc.stdout.readline()
        assert line, f"browser helper ended: {self.proc.stderr.read()}"
        return json.loads(line)

    def tell(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def command(self, text: str) -> dict:
        """Send a command line and return the helper's answer."""
        self.tell(text)
        return self.read()

    def finish(self) -> None:
        """Close its input (it quits) and check it exited cleanly."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()
