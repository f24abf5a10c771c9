"""gunicorn settings for the Procfile's `web` process: several gevent pywsgi workers.

    gunicorn -c config/gunicorn.py 'app:wsgi()'

Each worker is gevent's WSGIServer (`gevent_pywsgi`) and builds its own services after the fork
(pool, batcher, Redis client), so `DB_POOL_SIZE` is per worker: the process group opens at most
WEB_CONCURRENCY × DB_POOL_SIZE connections. With no DATABASE_URL / REDIS_URL the master starts
the embedded servers once, before forking, and the workers inherit their URLs.
"""

import os
import shutil
import tempfile
from typing import Any

# Metrics from every worker, added up at scrape time: prometheus_client reads this variable when
# a worker first imports it (after the fork), so it must be set here, in the master.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sluice-metrics-")

from config.settings import SETTINGS_DOC
from web.wsgi import gunicorn_worker_class

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', SETTINGS_DOC['PORT'][0])}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = gunicorn_worker_class()  # gevent_pywsgi with Sluice's header parser
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
graceful_timeout = int(float(os.environ.get("SHUTDOWN_TIMEOUT_S", SETTINGS_DOC["SHUTDOWN_TIMEOUT_S"][0])))
timeout = 30
keepalive = 75
accesslog = None
errorlog = "-"

_embedded = None


def on_starting(server: Any) -> None:
    """In the master, before any fork: clear metrics a previous run left, and start embedded
    servers when no URLs are set."""
    global _embedded
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(metrics_dir):
        if name.endswith(".db"):
            os.unlink(os.path.join(metrics_dir, name))
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        return
    from runtime.devenv import EmbeddedServices, prepare_settings

    _embedded = EmbeddedServices()
    settings = prepare_settings(_embedded)
    os.environ["DATABASE_URL"] = settings.database_url or ""
    os.environ["REDIS_URL"] = settings.redis_url or ""


def worker_exit(server: Any, worker: Any) -> None:
    """The worker stopped serving: drain it if SIGTERM did not already (see web.wsgi)."""
    from web.requestlog import STDOUT
    from web.wsgi import drain_worker

    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("sluice")
    if services is not None:
        drain_worker(worker, services)
    STDOUT.flush()  # the request lines still waiting for their write


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: its live gauges no longer count (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _embedded is not None:
        _embedded.stop()
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(metrics_dir).startswith("sluice-metrics-"):
        shutil.rmtree(metrics_dir, ignore_errors=True)
