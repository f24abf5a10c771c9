"""Drive headless Chromium's EventSource against a real Sluice server; one scenario per run.

Runs in its own plain-Python process (Playwright's sync API runs its own event loop, which must
not meet the test session's gevent patching). It talks to the test over stdin/stdout, one JSON
object per line: it prints {"step": ...} and, where the test must act (restart the server),
waits for a line on stdin. Only the server URL it is given is contacted.

    python tests/browser/eventsource.py SCENARIO BASE_URL TOKEN STREAM
"""

from __future__ import annotations

import json
import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SETUP = """([url, token, stream]) => {
  window.got = []; window.opens = 0; window.errors = 0;
  const es = new EventSource(url + "/api/v1/sse?stream=" + encodeURIComponent(stream) +
                             "&token=" + encodeURIComponent(token));
  window.es = es;
  es.onopen = () => { window.opens += 1; };
  es.onerror = () => { window.errors += 1; };
  es.onmessage = (e) => { window.got.push({id: e.lastEventId, data: JSON.parse(e.data)}); };
}"""

PUBLISH = """async ([url, token, stream, data]) => {
  const r = await fetch(url + "/api/v1/events", {method: "POST",
    headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    body: JSON.stringify({stream, data})});
  return (await r.json()).events[0].id;
}"""


def loopback_only(*urls: str) -> None:
    """These drivers only ever talk to servers on this machine."""
    for url in urls:
        if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise SystemExit("loopback only")


def launch(pw):
    """Headless Chromium with the drivers' flags."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def say(**message: object) -> None:
    print(json.dumps(message), flush=True)


def wait_for(page, expression: str, timeout_s: float = 20) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {expression}")
        time.sleep(0.05)


OPEN_CROSS_ORIGIN = """async ([url, credentials]) => {
  const es = new EventSource(url, {withCredentials: credentials});
  const outcome = await new Promise((resolve) => {
    es.onmessage = (e) => resolve({got: JSON.parse(e.data), state: es.readyState});
    es.onerror = () => { if (es.readyState === 2) resolve({got: null, state: 2}); };
    setTimeout(() => resolve({got: null, state: es.readyState, timedOut: true}), 10000);
  });
  es.close();
  return outcome;
}"""


def cors(page, origin: str) -> None:
    """The page lives on `origin`; stdin gives [{"url", "credentials"}] EventSource targets on
    other origins; prints what each one did (first message, or closed)."""
    page.goto(origin + "/healthz")
    targets = json.loads(sys.stdin.readline())
    results = []
    for target in targets:
        loopback_only(target["url"])
        results.append(page.evaluate(OPEN_CROSS_ORIGIN, [target["url"], target["credentials"]]))
    say(step="done", origin=page.evaluate("location.origin"), results=results)


def main() -> None:
    scenario, url, token, stream = sys.argv[1:5]
    loopback_only(url)
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page()
        if scenario == "cors":
            cors(page, url)
            browser.close()
            return
        page.goto(url + "/healthz")  # same origin as the streams
        page.evaluate(SETUP, [url, token, stream])
        if scenario == "unknown-stream":
            wait_for(page, "window.es.readyState === 2")
            say(step="closed", opens=page.evaluate("window.opens"), errors=page.evaluate("window.errors"))
        elif scenario == "receive-and-resume":
            wait_for(page, "window.opens >= 1")
            ids = [page.evaluate(PUBLISH, [url, token, stream, n]) for n in range(3)]
            wait_for(page, "window.got.length >= 3")
            say(step="before-restart", published=ids, got=page.evaluate("window.got"))
            sys.stdin.readline()  # the test restarts the server and publishes while it is away
            wait_for(page, "window.opens >= 2", 40)
            ids += [page.evaluate(PUBLISH, [url, token, stream, n]) for n in range(3, 5)]
            wait_for(page, f"window.got.length >= {len(ids) + 2}", 40)
            time.sleep(0.5)  # anything extra (a duplicate) would arrive now
            say(
                step="done",
                published=ids,
                got=page.evaluate("window.got"),
                opens=page.evaluate("window.opens"),
            )
        elif scenario == "hold":
            # The test cuts connections under the browser; on each "report" line it gets what
            # the page has seen so far; it ends when stdin closes.
            wait_for(page, "window.opens >= 1")
            say(step="open")
            for line in sys.stdin:
                if line.strip() == "report":
                    say(
                        step="report",
                        got=page.evaluate("window.got"),
                        opens=page.evaluate("window.opens"),
                        errors=page.evaluate("window.errors"),
                        state=page.evaluate("window.es.readyState"),
                    )
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        browser.close()


if __name__ == "__main__":
    main()
