"""Fan-out load client: N subscribers (SSE or long-poll) on one stream, plus a publisher.

Its own process, so its CPU is not the server's. Every connection counts the events it gets;
a sample of connections (--sample) also reads each event's publish timestamp for latency.
Prints one JSON line. Loopback only; stops by itself after --seconds.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

import gevent  # noqa: E402

state = {"events": 0, "latencies": [], "connected": 0, "errors": 0, "per": {}, "reconnects": 0}


def sse_subscriber(host: str, port: int, path: str, token: str, sample: bool, ready) -> None:
    """One EventSource-like connection: counts events; comes back after a `retry:`-only answer
    (the server shedding load) like a browser would, counting it as a reconnect. A stream is
    held when its answer is chunked (a shed answer has a Content-Length)."""
    mine = [0]
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=60)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                "\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            buf = b""
            while b"\n\n" not in buf.partition(b"\r\n\r\n")[2]:
                more = sock.recv(65536)
                if not more:
                    break
                buf += more
            if not buf.startswith(b"HTTP/1.1 200"):
                state["errors"] += 1
                return
            if b"chunked" not in buf.partition(b"\r\n\r\n")[0].lower():  # `retry:` only
                sock.close()
                state["reconnects"] += 1
                gevent.sleep(1)
                continue
        except OSError:
            state["errors"] += 1
            return
        break
    state["connected"] += 1
    state["per"][id(sock)] = mine
    ready()
    try:
        while True:
            n = buf.count(b"\nevent: ")
            state["events"] += n
            mine[0] += n
            if sample:
                now = time.time()
                for piece in buf.split(b'"t":')[1:]:
                    end = piece.find(b",")
                    if end < 0:
                        end = piece.find(b"}")
                    try:
                        state["latencies"].append(now - float(piece[:end]))
                    except ValueError:
                        pass
            buf = sock.recv(262144)
            if not buf:
                return
    except OSError:
        state["errors"] += 1


def poll_subscriber(url: str, stream: str, token: str, sample: bool, ready) -> None:
    cursor = sid = ""
    first = True
    while True:
        q = f"{url}/api/v1/poll?stream={stream}&timeout=25" + (f"&cursor={cursor}" if cursor else "")
        q += f"&sid={sid}" if sid else ""
        req = urllib.request.Request(q, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=40) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            state["errors"] += 1
            gevent.sleep(float(exc.headers.get("Retry-After") or 0.5))
            continue
        except OSError:
            state["errors"] += 1
            gevent.sleep(0.5)
            continue
        if first:
            state["connected"] += 1
            ready()
            first = False
        now = time.time()
        state["events"] += len(body["events"])
        if sample:
            state["latencies"] += [now - e["data"]["t"] for e in body["events"]]
        cursor, sid = body["cursor"], body["sid"]
        if r.headers.get("Retry-After"):
            gevent.sleep(float(r.headers["Retry-After"]))


def publish_request(url: str, stream: str, token: str, batch: int, door: str):
    """One publish: `batch` native events in one request, or one Mercure update (a form)."""
    pad = "x" * 150
    now = time.time()
    if door == "mercure":
        form = urllib.parse.urlencode(
            {"topic": stream, "type": "message", "data": json.dumps({"t": now, "p": pad})}
        )
        return urllib.request.Request(
            f"{url}/.well-known/mercure",
            data=form.encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"},
        )
    body = [{"stream": stream, "data": {"t": now, "p": pad}} for _ in range(batch)]
    return urllib.request.Request(
        f"{url}/api/v1/events",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def publisher(
    url: str, stream: str, token: str, rate: float, seconds: float, batch: int, door: str = "native"
) -> int:
    sent = 0
    start = time.monotonic()
    if door == "mercure":
        batch = 1
    while time.monotonic() - start < seconds:
        req = publish_request(url, stream, token, batch, door)
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
        sent += batch
        if rate:
            due = start + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--stream", default="fanout")
    ap.add_argument("--mode", choices=["sse", "poll"], default="sse")
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=50, help="events/s; 0 = flat out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--sample", type=int, default=50, help="connections that measure latency")
    ap.add_argument("--connect-only", action="store_true")
    ap.add_argument(
        "--door",
        choices=["native", "mercure"],
        default="native",
        help="subscribe and publish through /api/v1 or /.well-known/mercure (SSE)",
    )
    ap.add_argument(
        "--mercure-token", default="", help="with --door mercure: the token for both (its key is the hub's)"
    )
    ap.add_argument(
        "--publish-only",
        action="store_true",
        help="(internal) be the publisher process and print how many were sent",
    )
    args = ap.parse_args()
    if args.publish_only:
        print(publisher(args.url, args.stream, args.token, args.rate, args.seconds, args.batch, args.door))
        return
    host, port = args.url.split("//")[1].rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("loopback only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    ready_event = gevent.event.Event()

    def ready() -> None:
        if state["connected"] + state["errors"] >= args.subscribers:
            ready_event.set()

    every = max(1, args.subscribers // max(1, args.sample))
    for i in range(args.subscribers):
        if args.door == "mercure":
            gevent.spawn(
                sse_subscriber,
                host,
                int(port),
                f"/.well-known/mercure?topic={args.stream}",
                args.mercure_token,
                i % every == 0,
                ready,
            )
        elif args.mode == "sse":
            gevent.spawn(
                sse_subscriber,
                host,
                int(port),
                f"/api/v1/sse?stream={args.stream}",
                args.token,
                i % every == 0,
                ready,
            )
        else:
            gevent.spawn(poll_subscriber, args.url, args.stream, args.token, i % every == 0, ready)
        if i % 200 == 199:
            gevent.sleep(0.01)
    ready_event.wait(timeout=120)
    print(
        json.dumps({"step": "connected", "connected": state["connected"], "errors": state["errors"]}),
        flush=True,
    )
    if args.connect_only:
        gevent.sleep(args.seconds)
        return
    gevent.sleep(1)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    state["events"], state["latencies"] = 0, []
    for mine in state["per"].values():
        mine[0] = 0
    started = time.monotonic()
    # The publisher is its own process, so a busy reader loop here cannot slow its pace.
    pub_token = args.mercure_token if args.door == "mercure" else args.token
    pub = subprocess.run(
        [
            sys.executable,
            __file__,
            "--publish-only",
            "--url",
            args.url,
            "--token",
            pub_token,
            "--stream",
            args.stream,
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--batch",
            str(args.batch),
            "--door",
            args.door,
        ],
        capture_output=True,
        text=True,
        timeout=args.seconds + 60,
    )
    sent = int(pub.stdout.strip() or 0)
    gevent.sleep(2)  # let deliveries in flight arrive
    elapsed = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    lat = sorted(state["latencies"])
    per = [mine[0] for mine in state["per"].values()]
    pick = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000) if lat else (lambda p: -1)
    print(
        json.dumps(
            {
                "step": "done",
                "mode": args.mode,
                "subscribers": state["connected"],
                "published": sent,
                "deliveries": state["events"],
                "expected": sent * state["connected"],
                "deliveries_per_s": state["events"] / (elapsed - 2),
                "publish_s": elapsed - 2,
                "per_connection_min_max": [min(per, default=0), max(per, default=0)],
                "p50_ms": pick(0.5),
                "p99_ms": pick(0.99),
                "errors": state["errors"],
                "reconnects_before_start": state["reconnects"],
                "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime)
                - (cpu0.ru_utime + cpu0.ru_stime)
                + kids.ru_utime
                + kids.ru_stime,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
