"""Drive static/sluice.js in headless Chromium against a real Sluice server.

Same arrangement as eventsource.py (its own process, JSON lines on stdout, commands on stdin):

    python tests/browser/client.py PAGE_URL SLUICE_URL TOKEN STREAM TRANSPORT [LAST_EVENT_ID]

The page is opened at PAGE_URL/healthz, loads PAGE_URL/static/sluice.js and subscribes to
STREAM through SLUICE_URL with the given transport ("sse", "poll", "auto", or
"auto-without-eventsource": auto in a page whose EventSource is gone). Commands on stdin:
`report` prints what the page has seen ({got, statuses, transport, errors, resets}); end of input
quits.
"""

from __future__ import annotations

import sys

from eventsource import launch, loopback_only, say, wait_for
from playwright.sync_api import sync_playwright

SUBSCRIBE = """([url, token, stream, transport, lastEventId]) => {
  window.got = []; window.statuses = []; window.errors = []; window.resets = [];
  window.sub = Sluice.subscribe({
    url, token, streams: [stream], transport, openTimeoutMs: 1500, fallbackAfter: 2,
    lastEventId: lastEventId || null, onReset: (n) => window.resets.push(n),
    onEvent: (e) => window.got.push({id: e.id, lastEventId: e.lastEventId, type: e.type,
                                     data: e.data}),
    onStatus: (s) => window.statuses.push(s),
    onError: (p) => window.errors.push(p),
  });
  window.sub.on("chat", (e) => window.got.push({chat: e.data}));
}"""


def main() -> None:
    page_url, sluice_url, token, stream, transport = sys.argv[1:6]
    last_event_id = sys.argv[6] if len(sys.argv) > 6 else None
    loopback_only(page_url, sluice_url)
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page()
        page.goto(page_url + "/healthz")
        page.add_script_tag(url=page_url + "/static/sluice.js")
        if transport == "auto-without-eventsource":  # an old browser
            page.evaluate("() => { window.EventSource = undefined; }")
            transport = "auto"
        page.evaluate(SUBSCRIBE, [sluice_url, token, stream, transport, last_event_id])
        wait_for(
            page,
            "window.statuses.includes('open') || window.statuses.includes('polling')"
            " || window.errors.length > 0",
            30,
        )
        say(step="subscribed")
        for line in sys.stdin:
            if line.strip() == "report":
                say(
                    step="report",
                    got=page.evaluate("window.got"),
                    statuses=page.evaluate("window.statuses"),
                    errors=page.evaluate("window.errors"),
                    resets=page.evaluate("window.resets"),
                    transport=page.evaluate("window.sub.transport"),
                    lastEventId=page.evaluate("window.sub.lastEventId"),
                )
        browser.close()


if __name__ == "__main__":
    main()
