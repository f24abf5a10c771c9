"""`python app.py`: the app under gevent's WSGIServer with Sluice's handler, stopped gracefully
on SIGTERM or SIGINT (stop accepting, drain, exit within SHUTDOWN_TIMEOUT_S)."""

from __future__ import annotations

import logging
import signal
import time

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from auth.tokens import mint
from runtime.devenv import EmbeddedServices, prepare_settings, raise_open_files_limit, tune_gc
from runtime.services import build_services
from web.app import create_app
from web.wsgi import SluiceHandler, drain

log = logging.getLogger("sluice")


def serve() -> None:
    embedded = EmbeddedServices()
    try:
        settings = prepare_settings(embedded)
        raise_open_files_limit()
        services = build_services(settings)
    except BaseException:
        embedded.stop()
        raise
    app = create_app(services)
    handler = type(
        "Handler",
        (SluiceHandler,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_header_bytes": settings.max_header_bytes,
            "max_request_line": settings.max_request_line,
        },
    )
    server = WSGIServer((settings.host, settings.port), app, log=None, error_log=log, handler_class=handler)
    stopping = Event()

    def on_signal() -> None:
        if stopping.is_set():
            return
        stopping.set()
        gevent.spawn(graceful_stop)

    def graceful_stop() -> None:
        started = time.monotonic()
        print("sluice: stopping: no new connections, flushing the batcher", flush=True)
        server.close()  # stop accepting
        flushed = drain(services)
        remaining = max(0.5, settings.shutdown_timeout_s - (time.monotonic() - started))
        server.stop(timeout=min(remaining, 2.0))
        embedded.stop()
        print(
            f"sluice: stopped in {time.monotonic() - started:.2f}s "
            f"({'batcher flushed' if flushed else 'batcher NOT fully flushed'})",
            flush=True,
        )

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    tune_gc()
    server.start()
    if settings.host in ("0.0.0.0", "::"):
        print(
            f"sluice: listening on every interface ({settings.host}), port "
            f"{server.server_port}: http://127.0.0.1:{server.server_port}",
            flush=True,
        )
    else:
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"sluice: listening on http://{shown}:{server.server_port}", flush=True)
    if "dev" in settings.secrets:
        token = mint(settings.secrets["dev"], "client-1", publish=["**"], subscribe=["**"], ttl_s=86400)
        print(
            "sluice: development token (24 h, client id `client-1`, publish and subscribe "
            f"everything):\n{token}",
            flush=True,
        )
    try:
        stopping.wait()
        while not server.closed or embedded.children:
            gevent.sleep(0.05)
    finally:
        embedded.stop()
