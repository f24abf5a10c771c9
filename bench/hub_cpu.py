"""The hub's own CPU per delivery, apart from the rest of the server.

    python bench/hub_cpu.py [--subscribers 1000] [--events 100] [--rounds 8]

Builds a hub (not started: no Postgres or Redis) with N subscribers of one stream, each an
idle parked connection's direct sink on a real loopback TCP socket, and hands the hub single
event commits as the deliverer would. Reports user and kernel CPU (`getrusage`) per delivery
for each round; the peers are drained between rounds, not during them, so no reader competes
for the CPU. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gevent import monkey

monkey.patch_all()

import _socket  # noqa: E402

from streaming.direct import DirectSink  # noqa: E402
from streaming.hub import Hub  # noqa: E402

DATA = '{"x": "' + "y" * 180 + '"}'


def connect(n: int) -> tuple[list[_socket.socket], list[_socket.socket]]:
    """n loopback connections: (the server's non-blocking ends, the peers)."""
    listener = _socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    ours, peers = [], []
    for _ in range(n):
        peer = _socket.socket()
        peer.connect(listener.getsockname())
        fd, _ = listener._accept()
        own = _socket.socket(fileno=fd)
        own.setblocking(False)
        own.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ours.append(own)
        peers.append(peer)
    listener.close()
    return ours, peers


def drain(peers: list[_socket.socket]) -> None:
    for peer in peers:
        try:
            while peer.recv(1 << 16, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hub = Hub(None, None, None)  # type: ignore[arg-type]  # never started: no store needed
    ours, peers = connect(args.subscribers)
    subs = []
    for own in ours:
        sub, _ = hub.subscribe(["bench"], 64)
        sub.sink = DirectSink(sub, own, "abcdefghij", True)
        subs.append(sub)
    position = 0
    deliveries = args.subscribers * args.events
    for n in range(args.rounds):
        drain(peers)
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.events):
            position += 1
            hub._deliver([[position, "bench", "message", DATA]])
        after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        queued = sum(not sub.queue.empty() for sub in subs)
        print(
            f"round {n}: user {(after.ru_utime - before.ru_utime) / deliveries * 1e6:.2f} µs, "
            f"kernel {(after.ru_stime - before.ru_stime) / deliveries * 1e6:.2f} µs, "
            f"wall {(t1 - t0) / deliveries * 1e6:.2f} µs per delivery "
            f"({queued} subscribers had to queue)"
        )
    for sock in ours + peers:
        sock.close()


if __name__ == "__main__":
    main()
