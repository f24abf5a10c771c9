"""A TCP proxy on loopback that delays every chunk by a fixed time in each direction.

Puts the database "N ms away" for the benchmark without root network tricks: the server
connects to the proxy, the proxy to Postgres. Order within a connection is preserved.
Run: python bench/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.queue import Queue  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    """Read from src, deliver to dst `delay_s` after each chunk arrived."""
    queue: Queue = Queue()

    def writer() -> None:
        while True:
            due, chunk = queue.get()
            if chunk is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            try:
                dst.sendall(chunk)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    w = gevent.spawn(writer)
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            queue.put((time.monotonic() + delay_s, chunk))
    except OSError:
        pass
    queue.put((0, None))
    w.join()


def main() -> None:
    listen_port, target_port, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    delay_s = delay_ms / 1000.0

    def handle(client: socket.socket, _addr: object) -> None:
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = gevent.spawn(pump, client, upstream, delay_s)
        b = gevent.spawn(pump, upstream, client, delay_s)
        gevent.joinall([a, b])
        client.close()
        upstream.close()

    server = StreamServer(("127.0.0.1", listen_port), handle)
    print(f"delay proxy 127.0.0.1:{listen_port} -> {target_port} (+{delay_ms} ms each way)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
