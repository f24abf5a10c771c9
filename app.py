"""Sluice: the application factory and `python app.py`, which serves it with gevent's WSGIServer.

    python app.py            serve (embedded PostgreSQL and Redis when no URLs are set)
    python app.py migrate    apply database migrations and exit (Heroku's release phase)
    python app.py token ...  print a token signed with the configured secret

gevent patches the standard library, and psycogreen makes psycopg2 cooperative, before anything
else is imported: a blocking call then parks only its own greenlet.
"""
from gevent import monkey

monkey.patch_all()

import psycogreen.gevent  # noqa: E402

psycogreen.gevent.patch_psycopg()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import secrets as secrets_lib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import redis as redis_lib  # noqa: E402
from flask import Flask, Response, request  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from werkzeug.middleware.proxy_fix import ProxyFix  # noqa: E402

from config.settings import Settings, SettingsError  # noqa: E402
from ingest.batcher import Batcher  # noqa: E402
from ingest.pool import Pool  # noqa: E402
from ingest.store import EventStore  # noqa: E402
from streaming.authorize import OriginAuthorizer  # noqa: E402
from streaming.backoff import Backoff  # noqa: E402
from streaming.limits import ConnectionLimits  # noqa: E402
from streaming.presence import Presence  # noqa: E402
from streaming.webhooks import WebhookNotifier  # noqa: E402
from streaming.hub import Hub  # noqa: E402
from streaming.tokens import TokenVerifier, mint  # noqa: E402
from web.cors import install_cors  # noqa: E402
from web.dashboard import snapshot as dashboard_snapshot  # noqa: E402
from web.requestlog import install_request_log  # noqa: E402
from web.http import install_error_handlers  # noqa: E402
from web.problems import Problem  # noqa: E402
from web.metrics import AppMetrics  # noqa: E402
from web.wsgi import SluiceHandler, close_idle  # noqa: E402

log = logging.getLogger("sluice")


@dataclass
class Services:
    """Everything a process shares between requests, built once and handed to the app."""

    settings: Settings
    pool: Pool
    store: EventStore
    batcher: Batcher
    tokens: TokenVerifier
    redis: Any
    metrics: AppMetrics
    hub: Hub
    backoff: Backoff
    limits: ConnectionLimits
    presence: Presence
    authorizer: OriginAuthorizer | None = None
    notifier: WebhookNotifier | None = None
    draining: bool = False

    def subscriber_count(self, stream: str) -> int:
        return self.presence.count(stream)  # every process

    @property
    def registry(self) -> Any:
        return self.metrics.registry

    def close(self, timeout: float) -> bool:
        """Flush the batcher and release connections; True if everything flushed in time."""
        self.draining = True
        self.hub.stop()  # every stream ends with a `retry:` hint and resumes elsewhere
        self.metrics.stop()
        self.presence.stop()
        if self.notifier is not None:
            self.notifier.stop()
        flushed = self.batcher.stop(timeout)
        self.pool.close()
        try:
            self.redis.close()
        except Exception:  # noqa: BLE001
            pass
        return flushed


def build_services(settings: Settings) -> Services:
    """Connect to Postgres and Redis, apply migrations, and start the batcher."""
    if not settings.database_url or not settings.redis_url or not (settings.secrets
                                                                    or settings.public_keys):
        raise SettingsError("build_services needs DATABASE_URL, REDIS_URL and a key")
    pool = Pool(settings.database_url, settings.db_pool_size, settings.db_pool_timeout_s,
                settings.db_connect_timeout_s)
    store = EventStore()
    with pool.connection(timeout_s=30) as conn:
        applied = store.migrate(conn)
        identity = store.identity(conn)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    metrics = AppMetrics()
    batcher = Batcher(store, pool, max_events=settings.batch_max_events,
                      max_wait_ms=settings.batch_max_wait_ms,
                      max_backlog=settings.ingest_max_backlog, metrics=metrics.batcher).start()
    tls = {"ssl_cert_reqs": None} if settings.redis_url.startswith("rediss://") \
        and not settings.redis_verify_tls else {}
    redis = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2,
                                     health_check_interval=10, **tls)
    tokens = TokenVerifier(settings.secrets, public_keys=settings.public_keys,
                           leeway_s=settings.token_leeway_s, redis=redis)
    hub = Hub(store, pool, redis, channel=f"sluice:{identity}:commits",
              overflow_counter=metrics.slow_consumers, heartbeat_s=settings.heartbeat_s,
              write_timeout_s=settings.sse_write_timeout_s,
              stream_cache_s=settings.stream_cache_s).start()
    batcher.add_listener(hub.on_commit)
    backoff = Backoff(redis, base_ms=settings.retry_base_ms, max_ms=settings.retry_max_ms,
                      window_s=settings.retry_window_s)
    limits = ConnectionLimits(settings.max_connections_per_token, settings.max_connections_per_ip,
                              refused=metrics.limited)
    authorizer = None
    if settings.authorize_url:
        authorizer = OriginAuthorizer(settings.authorize_url,
                                      forward_headers=settings.authorize_forward_headers,
                                      timeout_s=settings.authorize_timeout_s,
                                      max_ttl_s=settings.authorize_max_ttl_s, redis=redis,
                                      metrics=metrics.authorize)
    notifier = None
    if settings.webhook_url and settings.webhook_secret:
        notifier = WebhookNotifier(settings.webhook_url, settings.webhook_secret,
                                   timeout_s=settings.webhook_timeout_s,
                                   metrics=metrics.webhook).start()
    presence = Presence(redis, hub, namespace=f"sluice:{identity}", notifier=notifier,
                        grace_s=settings.webhook_grace_s).start()
    services = Services(settings, pool, store, batcher, tokens, redis, metrics, hub, backoff,
                        limits, presence, authorizer, notifier)
    metrics.start(services)
    presence.stats = lambda: dashboard_snapshot(services)
    return services


def create_app(services: Services) -> Flask:
    """The Flask application: blueprints over the services, errors as problem+json."""
    from ingest.http import bp as ingest_bp
    from streaming.http import bp as streaming_bp
    from web.dashboard import bp as dashboard_bp
    from web.ops import bp as ops_bp

    app = Flask(__name__)
    app.extensions["sluice"] = services
    app.register_blueprint(ingest_bp)
    app.register_blueprint(streaming_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)
    install_error_handlers(app)
    install_cors(app, services.settings.cors_origins)
    if services.settings.request_log:
        install_request_log(app)
    max_params = services.settings.max_query_params

    @app.before_request
    def _limit_query() -> None:
        if request.query_string.count(b"&") >= max_params \
                and sum(1 for _ in request.args.items(multi=True)) > max_params:
            raise Problem(400, "too-many-parameters",
                          f"at most {max_params} query parameters are allowed", limit=max_params)

    if services.settings.proxy_hops:  # behind Heroku's router: the client is in X-Forwarded-For
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=services.settings.proxy_hops)  # type: ignore

    @app.after_request
    def _close_when_draining(response: Response) -> Response:
        if services.draining:
            response.headers["Connection"] = "close"  # do not keep a stopping process busy
        return response

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule
        services.metrics.count_response(rule.rule if rule else "unmatched", response.status_code)
        return response

    return app


# -- running it -------------------------------------------------------------------------------

def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard limit: each connection is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def dev_secret(data_dir: Path) -> str:
    """A secret kept in the data folder so development tokens survive restarts."""
    path = data_dir / "dev-secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets_lib.token_urlsafe(32))
    return path.read_text().strip()


class EmbeddedServices:
    """Embedded PostgreSQL/Redis started for development when their URLs are unset."""

    def __init__(self) -> None:
        self.children: list[Any] = []

    def complete(self, settings: Settings) -> Settings:
        from embedded.servers import EmbeddedPostgres, EmbeddedRedis

        data_dir = Path(settings.data_dir)
        if not settings.database_url:
            pg = EmbeddedPostgres(data_dir / "pg").start()
            self.children.append(pg)
            settings = replace(settings, database_url=pg.url)
            print(f"sluice: embedded PostgreSQL at {pg.url} (data in {pg.data_dir})", flush=True)
        if not settings.redis_url:
            rd = EmbeddedRedis(data_dir / "redis").start()
            self.children.append(rd)
            settings = replace(settings, redis_url=rd.url)
            print(f"sluice: embedded Redis at {rd.url}", flush=True)
        return settings

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


def prepare_settings(embedded: EmbeddedServices) -> Settings:
    settings = Settings.from_env()
    if not settings.secrets and not settings.public_keys:
        secret = dev_secret(Path(settings.data_dir))
        settings = replace(settings, secrets={"dev": secret})
        print("sluice: WARNING: no SLUICE_SECRET set; using a development secret from "
              f"{Path(settings.data_dir) / 'dev-secret'}. Never run like this in production.",
              file=sys.stderr, flush=True)
    if settings.webhook_url and not settings.webhook_secret:  # development: the dev secret
        settings = replace(settings, webhook_secret=next(iter(settings.secrets.values())))
    if settings.production and (not settings.database_url or not settings.redis_url):
        raise SettingsError("production needs DATABASE_URL and REDIS_URL")
    return embedded.complete(settings)


def wsgi() -> Flask:
    """The WSGI application for gunicorn (`gunicorn 'app:wsgi()'`), built in each worker."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = prepare_settings(EmbeddedServices())  # URLs come from the master (config/gunicorn.py)
    raise_open_files_limit()
    return create_app(build_services(settings))


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
    handler = type("Handler", (SluiceHandler,), {"header_timeout_s": settings.header_timeout_s,
                                                  "max_header_bytes": settings.max_header_bytes,
                                                  "max_request_line": settings.max_request_line})
    server = WSGIServer((settings.host, settings.port), app, log=None, error_log=log,
                        handler_class=handler)
    stopping = gevent.event.Event()

    def on_signal() -> None:
        if stopping.is_set():
            return
        stopping.set()
        gevent.spawn(graceful_stop)

    def graceful_stop() -> None:
        started = time.monotonic()
        print("sluice: stopping: no new connections, flushing the batcher", flush=True)
        server.close()  # stop accepting
        close_idle()
        flushed = services.close(settings.shutdown_timeout_s)
        close_idle()
        remaining = max(0.5, settings.shutdown_timeout_s - (time.monotonic() - started))
        server.stop(timeout=min(remaining, 2.0))
        embedded.stop()
        print(f"sluice: stopped in {time.monotonic() - started:.2f}s "
              f"({'batcher flushed' if flushed else 'batcher NOT fully flushed'})", flush=True)

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    server.start()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"sluice: listening on http://{host}:{server.server_port}", flush=True)
    if "dev" in settings.secrets:
        token = mint(settings.secrets["dev"], "dev", publish=["**"], subscribe=["**"], ttl_s=86400)
        print(f"sluice: development token (24 h, publish and subscribe everything):\n{token}",
              flush=True)
    try:
        stopping.wait()
        while not server.closed or embedded.children:
            gevent.sleep(0.05)
    finally:
        embedded.stop()


def migrate() -> None:
    embedded = EmbeddedServices()
    try:
        settings = prepare_settings(embedded)
        pool = Pool(settings.database_url or "", 1, 30, settings.db_connect_timeout_s)
        with pool.connection() as conn:
            applied = EventStore().migrate(conn)
        pool.close()
        print(f"sluice: migrations applied: {', '.join(applied) or 'none (up to date)'}")
    finally:
        embedded.stop()


def token_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python app.py token", description=token_command.__doc__)
    parser.add_argument("--sub", required=True, help="the client id (`sub` claim)")
    parser.add_argument("--publish", action="append", default=[], help="stream pattern (repeat)")
    parser.add_argument("--subscribe", action="append", default=[], help="stream pattern (repeat)")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if settings.secrets:
        kid, key = next(iter(settings.secrets.items()))
    else:
        kid, key = "dev", dev_secret(Path(settings.data_dir))
    print(mint(key, args.sub, publish=args.publish, subscribe=args.subscribe, ttl_s=args.ttl,
               kid=kid if kid != "default" else None))


token_command.__doc__ = "Print a token signed with SLUICE_SECRET(S), or the development secret."


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if argv[:1] == ["migrate"]:
            migrate()
        elif argv[:1] == ["token"]:
            token_command(argv[1:])
        elif not argv:
            serve()
        else:
            sys.exit(f"usage: python app.py [migrate | token --sub ID ...]; got {argv}")
    except SettingsError as exc:
        sys.exit(f"sluice: configuration error: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
