"""Drive the dashboard (`/`) in headless Chromium; same arrangement as eventsource.py.

    python tests/browser/dashboard.py BASE_URL TOKEN

Opens BASE_URL/?token=TOKEN and waits for the charts to fill. Commands on stdin, one per line:
`tail STREAM` (tail it in the stream explorer), `publish STREAM` (send a test event with the
publish form and wait for its answer), `report` (chart series and axis labels, the streams and
processes tables, explorer rows, statuses), `screenshot PATH`. End of input quits.
"""

from __future__ import annotations

import sys

from eventsource import launch, loopback_only, say, wait_for
from playwright.sync_api import sync_playwright

REPORT = """() => ({
  series: window.sluiceDashboard.series,
  status: document.getElementById("status").textContent,
  values: Array.from(document.querySelectorAll(".card .value")).map((e) => e.textContent),
  tail: Array.from(document.querySelectorAll("#tail li:not(.reset)")).map((li) => ({
    id: li.querySelector(".id").textContent, type: li.querySelector(".type").textContent,
    data: li.querySelector(".data").textContent})),
  resets: Array.from(document.querySelectorAll("#tail li.reset")).map((li) => li.textContent),
  tailStatus: document.getElementById("tail-status").textContent,
  streams: Array.from(document.querySelectorAll("#streams tbody tr[data-stream]")).map((tr) =>
    Array.from(tr.children).map((td) => td.textContent)),
  processes: Array.from(document.querySelectorAll("#processes tbody tr")).map((tr) =>
    Array.from(tr.children).map((td) => td.textContent)),
  axes: Object.fromEntries(Array.from(document.querySelectorAll(".card")).map((card) => [
    card.id.replace("chart-", ""), {
      title: card.querySelector("h2").textContent,
      labels: Array.from(card.querySelectorAll("svg text")).map((t) => t.textContent)}])),
  published: document.getElementById("publish-result").textContent,
  grants: document.getElementById("publish-grants").textContent,
})"""


def main() -> None:
    url, token = sys.argv[1:3]
    loopback_only(url)
    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"{url}/?token={token}")
        wait_for(page, "window.sluiceDashboard.series.connections.length >= 2", 30)
        say(step="live")
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "tail":
                page.fill("#stream", arg)
                page.click("#tail-form button")
                say(step="tailing")
            elif command == "publish":
                page.fill("#publish-stream", arg)
                page.fill("#publish-data", '{"from": "the dashboard"}')
                page.evaluate('document.getElementById("publish-result").textContent = ""')
                page.click("#publish-form button")
                wait_for(
                    page,
                    'document.getElementById("publish-result").textContent.match(/^(published|[0-9])/)',
                    15,
                )
                say(step="published")
            elif command == "report":
                say(step="report", **page.evaluate(REPORT))
            elif command == "screenshot":
                page.screenshot(path=arg, full_page=True)
                say(step="screenshot", path=arg)
        browser.close()


if __name__ == "__main__":
    main()
