"""Drive headless Chromium's EventSource against Sluice's Mercure door (same arrangement as
eventsource.py: JSON lines out, a line on stdin where the test acts).

    python tests/browser/mercure.py BASE_URL COOKIE_TOKEN OTHER_TOKEN

The page sets the `mercureAuthorization` cookie (COOKIE_TOKEN) and opens two EventSources on
`/.well-known/mercure?topic=https://example.com/doc/{id}`: one authorized by the cookie, one by
`?authorization=OTHER_TOKEN` (whose claims do not cover the private topics). It reports what
each received before and after the test restarts the server.
"""

from __future__ import annotations

import sys
import time

from eventsource import launch, loopback_only, say, wait_for
from playwright.sync_api import sync_playwright

SETUP = """([token, other]) => {
  document.cookie = "mercureAuthorization=" + token + "; path=/";
  const url = "/.well-known/mercure?topic=" + encodeURIComponent("https://example.com/doc/{id}");
  window.seen = {cookie: [], other: []}; window.opens = {cookie: 0, other: 0};
  const listen = (name, es) => {
    es.onopen = () => { window.opens[name] += 1; };
    const got = (e) => window.seen[name].push({id: e.lastEventId, type: e.type, data: e.data});
    es.onmessage = got;
    es.addEventListener("doc.updated", got);
    return es;
  };
  window.streams = [listen("cookie", new EventSource(url)),
                    listen("other", new EventSource(url + "&authorization=" + other))];
}"""
REPORT = "() => ({seen: window.seen, opens: window.opens})"


def main() -> None:
    url, token, other = sys.argv[1:4]
    loopback_only(url)
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page()
        page.goto(url + "/healthz")
        page.evaluate(SETUP, [token, other])
        wait_for(page, "window.opens.cookie >= 1 && window.opens.other >= 1")
        say(step="open")
        sys.stdin.readline()  # the test publishes a public and a private update
        wait_for(page, "window.seen.cookie.length >= 2 && window.seen.other.length >= 1")
        time.sleep(0.5)  # a private update wrongly sent to `other` would arrive now
        say(step="before-restart", **page.evaluate(REPORT))
        sys.stdin.readline()  # the test restarts the server and publishes while it is away
        wait_for(page, "window.opens.cookie >= 2 && window.seen.cookie.length >= 4", 40)
        time.sleep(0.5)  # a duplicate would arrive now
        say(step="done", **page.evaluate(REPORT))
        browser.close()


if __name__ == "__main__":
    main()
