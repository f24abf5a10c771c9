"""Every setting Sluice reads, from the environment (12-factor), each with a safe default.

This module is the one place a setting is named. The README's configuration table is written
from `SETTINGS_DOC` below, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# name -> (default, description). The README table mirrors this.
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "PORT": ("5000", "HTTP port to listen on."),
    "HOST": (
        "127.0.0.1 (0.0.0.0 on a dyno)",
        "Interface `python app.py` listens on: loopback unless set (or unless `DYNO` says this is a Heroku dyno). gunicorn (the Procfile) binds `0.0.0.0` unless set.",
    ),
    "DATABASE_URL": ("(unset: embedded PostgreSQL)", "PostgreSQL URL."),
    "REDIS_URL": ("(unset: embedded Redis)", "Redis URL."),
    "REDIS_VERIFY_TLS": (
        "true",
        "Verify the server certificate of a `rediss://` Redis. Heroku Redis uses self-signed certificates: set `false` there (app.json does).",
    ),
    "SLUICE_SECRET": ("(unset)", "HS256 secret for tokens."),
    "SLUICE_SECRETS": ("(unset)", "Several keys for rotation: `kid:secret,kid2:secret2`."),
    "SLUICE_PUBLIC_KEYS": (
        "(unset)",
        'Public keys for origins that sign with a private key, as JSON `{"kid": "-----BEGIN PUBLIC KEY-----..."}`: RSA (2048+ bits) verifies RS256, EC P-256 verifies ES256.',
    ),
    "SLUICE_PUBLIC_KEY": ("(unset)", "One such PEM public key (key id `public`)."),
    "TOKEN_LEEWAY_S": ("5", "Clock skew allowed on `exp` and `nbf`."),
    "REVOCATION_KEEP_S": (
        "86400",
        "How long a revocation (`POST /api/v1/revocations`) is remembered; tokens should not live longer than this.",
    ),
    "SLUICE_AUTHORIZE_URL": (
        "(unset)",
        'Origin authorization: a subscribe request without a token is sent (as a `POST` with `{"streams": [...]}` and the headers below) to this URL; a 2xx JSON answer `{"streams": [patterns], "ttl": s, "sub": id}` grants, a 4xx is passed back to the client.',
    ),
    "AUTHORIZE_FORWARD_HEADERS": (
        "Cookie",
        "Request headers forwarded to `SLUICE_AUTHORIZE_URL`, comma-separated.",
    ),
    "AUTHORIZE_TIMEOUT_S": (
        "2",
        "How long the origin may take to answer; past it (or on a 5xx) SSE gets `retry:` and long-poll `503`.",
    ),
    "AUTHORIZE_MAX_TTL_S": (
        "300",
        "Longest an origin grant is cached (the origin's `ttl` is capped to this).",
    ),
    "CORS_ORIGINS": (
        "(unset: no CORS)",
        "Origins allowed to call Sluice from a browser, comma-separated (`https://app.example.com`); they may send credentials (`withCredentials`). `*` allows any origin without credentials.",
    ),
    "MAX_CONNECTIONS_PER_TOKEN": (
        "0",
        "Most SSE and long-poll connections one token (or one origin-authorized cookie set) may hold in the whole fleet (Redis leases; per process while Redis is unreachable); 0 = no limit. Past it: `429`.",
    ),
    "MAX_CONNECTIONS_PER_IP": (
        "0",
        "Most SSE and long-poll connections one client address may hold in the whole fleet (as above); 0 = no limit. Past it: `429`.",
    ),
    "PROXY_HOPS": (
        "0",
        "Trusted proxies in front of Sluice: the client address is taken this many entries from the right of `X-Forwarded-For` (1 by default when `DYNO` is set: Heroku's router).",
    ),
    "HEADER_TIMEOUT_S": (
        "10",
        "Time a client has to send its request line and headers (slow-header clients are cut off), and the longest an idle keep-alive connection is kept.",
    ),
    "MAX_HEADER_BYTES": (
        "32768",
        "Largest request header block (all header lines together; at most 100 headers); past it: `400` and the connection closed.",
    ),
    "BODY_TIMEOUT_S": ("30", "Time a client has to send a request body (`408` past it)."),
    "MAX_QUERY_PARAMS": ("64", "Most query parameters a request may carry (`400` past it)."),
    "MAX_REQUEST_LINE_BYTES": (
        "8192",
        "Longest request line (method, URL, version); past it: `414`. At most 8192.",
    ),
    "SLUICE_WEBHOOK_URL": (
        "(unset)",
        'Where signed, batched `subscribe` / `unsubscribe` notices go (`POST {"notices": [...]}` with a `Sluice-Signature` header).',
    ),
    "SLUICE_WEBHOOK_SECRET": (
        "(unset: derived from `SLUICE_SECRET`)",
        'Secret the notices are signed with (HMAC-SHA256). Unset: `HMAC-SHA256(SLUICE_SECRET, "sluice webhook signing key v1")` in hex, so a webhook receiver never holds the key tokens are signed with.',
    ),
    "WEBHOOK_GRACE_S": (
        "5",
        "A client that reconnects (same connection id) within this long is neither reported gone nor back.",
    ),
    "WEBHOOK_TIMEOUT_S": ("5", "How long one notice request may take before it is retried."),
    "REQUEST_LOG": (
        "json",
        "`json`: one JSON line per request on stdout (no query strings, headers or tokens); `off`: none.",
    ),
    "SLUICE_ENV": (
        "development",
        "`production` refuses to start without a secret. `DYNO` implies production.",
    ),
    "SLUICE_DATA_DIR": ("./.sluice", "Where embedded servers keep their data and the dev secret."),
    "DB_POOL_SIZE": ("4", "Most Postgres connections one process opens."),
    "DB_POOL_TIMEOUT_S": ("2", "How long a request waits for a pooled connection before 503."),
    "DB_CONNECT_TIMEOUT_S": ("3", "Postgres connect timeout."),
    "BATCH_MAX_EVENTS": ("2000", "Most events in one group commit (one request is never split)."),
    "BATCH_MAX_WAIT_MS": (
        "2",
        "How long the batcher waits for more events after the oldest arrived, while a batch is being written (with none in flight it writes at once).",
    ),
    "INGEST_MAX_BACKLOG": (
        "50000",
        "Most events accepted but not yet committed, per process; past it: 503 + Retry-After.",
    ),
    "INGEST_COMMIT_TIMEOUT_S": ("10", "How long an ingest request waits for its commit before 503."),
    "MAX_BODY_BYTES": ("1048576", "Largest ingest body (413 past it)."),
    "MAX_BATCH_EVENTS": ("1000", "Most events in one ingest request (413 past it)."),
    "MAX_DATA_BYTES": ("65536", "Largest encoded `data` of one event (400 past it)."),
    "PENDING_FLEET": (
        "on",
        "`on`: this process mirrors its pending events (accepted, not yet committed) into Redis, once per burst, so history reads on every process include them; `off`: reads include only the answering process's pending events.",
    ),
    "RETENTION_MAX_AGE_S": (
        "86400",
        'How long an event is kept, by default (a stream may override it with `PUT /api/v1/streams/{stream}` `{"retention": {"maxAgeS": ...}}`); `0` keeps forever.',
    ),
    "RETENTION_MAX_EVENTS": (
        "0",
        "Most events kept per stream, by default (a stream may override it: `maxEvents`); `0` = no count limit.",
    ),
    "RETENTION_PRUNE_S": (
        "60",
        "How often one process (an advisory lock picks it) removes expired history: whole storage slices past the age, bounded row steps for per-stream limits.",
    ),
    "STORAGE_SLICE_POSITIONS": (
        "1000000",
        "Positions per storage slice (a range partition of the events table): expired history goes a slice at a time.",
    ),
    "READ_MAX_LIMIT": ("1000", "Largest `limit` a history read accepts."),
    "SUBSCRIBER_QUEUE_MAX": (
        "1000",
        "Outbound queue bound per subscriber; a full queue ends the stream with `retry:`.",
    ),
    "SUBSCRIBE_MAX_STREAMS": ("50", "Most streams one subscription may name."),
    "STREAM_CACHE_S": (
        "10",
        "How long a process trusts that a stream exists before asking Postgres again (deleting it clears this at once).",
    ),
    "MAX_STREAM_CONNECTIONS": (
        "10000",
        "Most SSE and long-poll connections one process holds; past it SSE gets `200` with only `retry:` and long-poll `503` + `Retry-After`.",
    ),
    "LONGPOLL_MAX_RATE": (
        "5",
        "Polls per second one long-poll client (by the `sid` every answer hands out and the client passes back) may make, over 10 s, before answers carry `Retry-After`; past 4× it gets `429`. Counted in the process up to half the budget, then across the fleet in Redis.",
    ),
    "CATCHUP_PAGE": ("500", "Events per catch-up page read from Postgres."),
    "HEARTBEAT_S": ("15", "SSE heartbeat comment after this much silence."),
    "RETRY_BASE_MS": ("1000", "Smallest SSE `retry:` handed out."),
    "RETRY_MAX_MS": ("60000", "Largest SSE `retry:` handed out."),
    "RETRY_WINDOW_S": ("60", "Sliding window of the per-connection reconnect counter."),
    "RETRY_RESET_AFTER_S": (
        "30",
        "An SSE connection that stays up this long resets its connection id's reconnect counter: its next `retry:` starts from `RETRY_BASE_MS` again.",
    ),
    "MAX_RECONNECTS": (
        "100",
        "Most connects one connection id (`sid`) may make within `RETRY_WINDOW_S`; past it SSE answers `429` (only a client that ignores `retry:` gets there).",
    ),
    "SSE_WRITE_TIMEOUT_S": ("30", "A stream write that cannot complete this long ends the connection."),
    "LONGPOLL_MAX_S": ("25", "Longest long-poll hold."),
    "SHUTDOWN_TIMEOUT_S": ("20", "How long SIGTERM waits for in-flight requests before exiting."),
    "MERCURE_PUBLISHER_JWT_KEY": (
        "(unset: Mercure door off)",
        "Turns on the Mercure front door (`/.well-known/mercure`): the key publisher tokens are verified with (an HS256 secret, or a PEM public key for `RS256`/`ES256`). Unset while the subscriber key is set: the subscriber key.",
    ),
    "MERCURE_PUBLISHER_JWT_ALG": (
        "HS256",
        "`HS256`, `RS256` or `ES256`: what `MERCURE_PUBLISHER_JWT_KEY` is.",
    ),
    "MERCURE_SUBSCRIBER_JWT_KEY": (
        "(unset: the publisher key)",
        "The key subscriber tokens are verified with (as above); also turns the Mercure door on.",
    ),
    "MERCURE_SUBSCRIBER_JWT_ALG": (
        "HS256",
        "`HS256`, `RS256` or `ES256`: what `MERCURE_SUBSCRIBER_JWT_KEY` is.",
    ),
    "MERCURE_ANONYMOUS": (
        "false",
        "Admit Mercure subscribers without a token (they receive public updates only).",
    ),
    "MERCURE_PUBLISH_ORIGINS": (
        "(unset: CORS_ORIGINS)",
        "Origins (comma-separated `https://host[:port]`, or `*`) a Mercure publish authenticated only by the `mercureAuthorization` cookie is accepted from (checked on `Origin`, else `Sec-Fetch-Site`, else `Referer`; the server's own origin always counts). Anything else is `403`, nothing stored. Header-token publishes are unaffected.",
    ),
    "WEB_CONCURRENCY": ("2", "gunicorn worker processes (Procfile `web`); each has its own pool."),
    "WORKER_CONNECTIONS": (
        "10000",
        "Most concurrent requests per gunicorn worker (a held stream counts until it parks; `MAX_STREAM_CONNECTIONS` caps streams).",
    ),
}


class SettingsError(ValueError):
    """A setting has a value Sluice cannot use; raised at startup, never later."""


def _number(env: Mapping[str, str], name: str, cast: type, minimum: float) -> Any:
    raw = env.get(name, SETTINGS_DOC[name][0])
    try:
        value = cast(raw)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    return _number(env, name, int, minimum)


def _float(env: Mapping[str, str], name: str, minimum: float = 0.0) -> float:
    return _number(env, name, float, minimum)


def _public_keys(env: Mapping[str, str]) -> dict[str, str]:
    """Parse SLUICE_PUBLIC_KEYS (JSON kid -> PEM) and SLUICE_PUBLIC_KEY (kid `public`)."""
    keys: dict[str, str] = {}
    raw = env.get("SLUICE_PUBLIC_KEYS", "").strip()
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in parsed.items()
        ):
            raise SettingsError('SLUICE_PUBLIC_KEYS must be JSON like {"kid": "-----BEGIN ..."}')
        keys.update(parsed)
    if env.get("SLUICE_PUBLIC_KEY", "").strip():
        keys.setdefault("public", env["SLUICE_PUBLIC_KEY"].replace("\\n", "\n"))
    for kid, pem in keys.items():
        try:
            from config.keys import load_public_key

            load_public_key(pem)
        except ValueError as exc:
            raise SettingsError(f"public key `{kid}`: {exc}") from None
    return keys


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, SETTINGS_DOC[name][0]).strip().lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


def _switch(env: Mapping[str, str], name: str, on: str, off: str = "off") -> bool:
    """A two-word setting (`on`/`off`, `json`/`off`): True for `on`."""
    raw = env.get(name, SETTINGS_DOC[name][0]).strip().lower()
    if raw not in (on, off):
        raise SettingsError(f"{name} must be {on} or {off}, got {raw!r}")
    return raw == on


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, SETTINGS_DOC[name][0])
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not all(re.fullmatch(r"[A-Za-z0-9-]+", n) for n in names):
        raise SettingsError(f"{name} must be header names separated by commas, got {raw!r}")
    return names


def _url(env: Mapping[str, str], name: str) -> str | None:
    url = env.get(name, "").strip()
    if url and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
        raise SettingsError(f"{name} must be an http(s) URL, got {url!r}")
    return url or None


def derived_webhook_secret(token_secret: str | None) -> str | None:
    """The webhook signing secret when SLUICE_WEBHOOK_SECRET is unset: derived from the token
    secret (never equal to it, and it does not reveal it)."""
    if not token_secret:
        return None
    return hmac.new(token_secret.encode(), b"sluice webhook signing key v1", hashlib.sha256).hexdigest()


def _cors_origins(env: Mapping[str, str], name: str = "CORS_ORIGINS") -> tuple[str, ...]:
    raw = env.get(name, "")
    origins = tuple(dict.fromkeys(o.strip().rstrip("/") for o in raw.split(",") if o.strip()))
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
            raise SettingsError(
                f"{name} entries look like `https://app.example.com` "
                f"(scheme, host, optional port) or `*`, got {origin!r}"
            )
    return origins


def _secrets(env: Mapping[str, str]) -> dict[str, str]:
    """Parse SLUICE_SECRETS (`kid:secret,...`) and SLUICE_SECRET (kid `default`)."""
    keys: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in env.get("SLUICE_SECRETS", "").split(","))):
        kid, sep, secret = item.partition(":")
        if not sep or not kid or not secret:
            raise SettingsError("SLUICE_SECRETS must look like `kid:secret,kid2:secret2`")
        keys[kid] = secret
    if env.get("SLUICE_SECRET"):
        keys.setdefault("default", env["SLUICE_SECRET"])
    return keys


def _mercure_key(env: Mapping[str, str], kind: str) -> tuple[str, str] | None:
    """MERCURE_{kind}_JWT_KEY with its algorithm, checked now (a PEM key must load)."""
    key = env.get(f"MERCURE_{kind}_JWT_KEY", "")
    if not key:
        return None
    alg = env.get(f"MERCURE_{kind}_JWT_ALG", "HS256").strip().upper() or "HS256"
    if alg not in ("HS256", "RS256", "ES256"):
        raise SettingsError(f"MERCURE_{kind}_JWT_ALG must be HS256, RS256 or ES256, got {alg!r}")
    if alg != "HS256":
        from config.keys import load_public_key

        try:
            _, key_alg = load_public_key(key.replace("\\n", "\n"))
        except ValueError as exc:
            raise SettingsError(f"MERCURE_{kind}_JWT_KEY: {exc}") from None
        if key_alg != alg:
            raise SettingsError(f"MERCURE_{kind}_JWT_KEY is a key for {key_alg}, not {alg}")
    return key, alg


@dataclass(frozen=True)
class Settings:
    """The process's configuration; built once by `from_env` and passed down, never global."""

    port: int = 5000
    public_keys: dict[str, str] = field(default_factory=dict)
    token_leeway_s: float = 5.0
    host: str = "0.0.0.0"
    database_url: str | None = None
    redis_url: str | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    production: bool = False
    data_dir: str = ".sluice"
    db_pool_size: int = 4
    db_pool_timeout_s: float = 2.0
    db_connect_timeout_s: int = 3
    batch_max_events: int = 2000
    batch_max_wait_ms: float = 2.0
    ingest_max_backlog: int = 50000
    ingest_commit_timeout_s: float = 10.0
    max_body_bytes: int = 1048576
    max_batch_events: int = 1000
    max_data_bytes: int = 65536
    read_max_limit: int = 1000
    subscriber_queue_max: int = 1000
    subscribe_max_streams: int = 50
    catchup_page: int = 500
    stream_cache_s: float = 10.0
    max_stream_connections: int = 10000
    longpoll_max_rate: float = 5.0
    heartbeat_s: float = 15.0
    retry_base_ms: int = 1000
    retry_max_ms: int = 60000
    retry_window_s: int = 60
    retry_reset_after_s: float = 30.0
    max_reconnects: int = 100
    sse_write_timeout_s: float = 30.0
    longpoll_max_s: float = 25.0
    shutdown_timeout_s: float = 20.0
    authorize_url: str | None = None
    authorize_forward_headers: tuple[str, ...] = ("Cookie",)
    authorize_timeout_s: float = 2.0
    authorize_max_ttl_s: float = 300.0
    cors_origins: tuple[str, ...] = ()
    max_connections_per_token: int = 0
    max_connections_per_ip: int = 0
    proxy_hops: int = 0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32768
    max_request_line: int = 8192
    redis_verify_tls: bool = True
    request_log: bool = True
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_grace_s: float = 5.0
    webhook_timeout_s: float = 5.0
    max_query_params: int = 64
    retention_max_age_s: int = 86400
    retention_max_events: int = 0
    retention_prune_s: float = 60.0
    storage_slice_positions: int = 1_000_000
    revocation_keep_s: float = 86400.0
    pending_fleet: bool = True
    # The Mercure door: (key, algorithm) per kind of token; None: that key is not set.
    mercure_publisher_key: tuple[str, str] | None = None
    mercure_subscriber_key: tuple[str, str] | None = None
    mercure_anonymous: bool = False
    mercure_publish_origins: tuple[str, ...] = ()  # cookie-authenticated publishes; (): CORS's

    @property
    def mercure(self) -> bool:
        return self.mercure_publisher_key is not None or self.mercure_subscriber_key is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        production = env.get("SLUICE_ENV", "").lower() == "production" or bool(env.get("DYNO"))
        secrets = _secrets(env)
        public_keys = _public_keys(env)
        if production and not secrets and not public_keys:
            raise SettingsError(
                "SLUICE_ENV=production (or DYNO set) requires SLUICE_SECRET, SLUICE_SECRETS or a public key"
            )
        settings = cls(
            port=_int(env, "PORT", 0),
            host=env.get("HOST") or ("0.0.0.0" if env.get("DYNO") else "127.0.0.1"),
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            secrets=secrets,
            public_keys=public_keys,
            token_leeway_s=_float(env, "TOKEN_LEEWAY_S"),
            production=production,
            data_dir=env.get("SLUICE_DATA_DIR", SETTINGS_DOC["SLUICE_DATA_DIR"][0]),
            db_pool_size=_int(env, "DB_POOL_SIZE", 1),
            db_pool_timeout_s=_float(env, "DB_POOL_TIMEOUT_S"),
            db_connect_timeout_s=_int(env, "DB_CONNECT_TIMEOUT_S", 1),
            batch_max_events=_int(env, "BATCH_MAX_EVENTS", 1),
            batch_max_wait_ms=_float(env, "BATCH_MAX_WAIT_MS"),
            ingest_max_backlog=_int(env, "INGEST_MAX_BACKLOG", 1),
            ingest_commit_timeout_s=_float(env, "INGEST_COMMIT_TIMEOUT_S", 0.1),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 1),
            max_batch_events=_int(env, "MAX_BATCH_EVENTS", 1),
            max_data_bytes=_int(env, "MAX_DATA_BYTES", 1),
            read_max_limit=_int(env, "READ_MAX_LIMIT", 1),
            subscriber_queue_max=_int(env, "SUBSCRIBER_QUEUE_MAX", 1),
            subscribe_max_streams=_int(env, "SUBSCRIBE_MAX_STREAMS", 1),
            catchup_page=_int(env, "CATCHUP_PAGE", 1),
            stream_cache_s=_float(env, "STREAM_CACHE_S"),
            max_stream_connections=_int(env, "MAX_STREAM_CONNECTIONS", 1),
            longpoll_max_rate=_float(env, "LONGPOLL_MAX_RATE", 0.1),
            heartbeat_s=_float(env, "HEARTBEAT_S", 0.05),
            retry_base_ms=_int(env, "RETRY_BASE_MS", 0),
            retry_max_ms=_int(env, "RETRY_MAX_MS", 0),
            retry_window_s=_int(env, "RETRY_WINDOW_S", 1),
            retry_reset_after_s=_float(env, "RETRY_RESET_AFTER_S", 0.1),
            max_reconnects=_int(env, "MAX_RECONNECTS", 2),
            sse_write_timeout_s=_float(env, "SSE_WRITE_TIMEOUT_S", 0.1),
            longpoll_max_s=min(_float(env, "LONGPOLL_MAX_S", 0.0), 25.0),
            shutdown_timeout_s=_float(env, "SHUTDOWN_TIMEOUT_S", 0.0),
            authorize_url=_url(env, "SLUICE_AUTHORIZE_URL"),
            authorize_forward_headers=_names(env, "AUTHORIZE_FORWARD_HEADERS"),
            authorize_timeout_s=_float(env, "AUTHORIZE_TIMEOUT_S", 0.05),
            authorize_max_ttl_s=_float(env, "AUTHORIZE_MAX_TTL_S"),
            cors_origins=_cors_origins(env),
            max_connections_per_token=_int(env, "MAX_CONNECTIONS_PER_TOKEN"),
            max_connections_per_ip=_int(env, "MAX_CONNECTIONS_PER_IP"),
            proxy_hops=_int(
                {**env, "PROXY_HOPS": env.get("PROXY_HOPS") or ("1" if env.get("DYNO") else "0")},
                "PROXY_HOPS",
            ),
            header_timeout_s=_float(env, "HEADER_TIMEOUT_S", 0.1),
            body_timeout_s=_float(env, "BODY_TIMEOUT_S", 0.1),
            max_header_bytes=_int(env, "MAX_HEADER_BYTES", 1024),
            max_request_line=min(_int(env, "MAX_REQUEST_LINE_BYTES", 256), 8192),
            redis_verify_tls=_bool(env, "REDIS_VERIFY_TLS"),
            request_log=_switch(env, "REQUEST_LOG", "json"),
            webhook_url=_url(env, "SLUICE_WEBHOOK_URL"),
            webhook_secret=env.get("SLUICE_WEBHOOK_SECRET")
            or derived_webhook_secret(secrets.get("default") or next(iter(secrets.values()), None)),
            webhook_grace_s=_float(env, "WEBHOOK_GRACE_S"),
            webhook_timeout_s=_float(env, "WEBHOOK_TIMEOUT_S", 0.1),
            max_query_params=_int(env, "MAX_QUERY_PARAMS", 1),
            retention_max_age_s=_int(env, "RETENTION_MAX_AGE_S"),
            retention_max_events=_int(env, "RETENTION_MAX_EVENTS"),
            retention_prune_s=_float(env, "RETENTION_PRUNE_S", 0.05),
            storage_slice_positions=_int(env, "STORAGE_SLICE_POSITIONS", 1),
            revocation_keep_s=_float(env, "REVOCATION_KEEP_S", 1.0),
            pending_fleet=_switch(env, "PENDING_FLEET", "on"),
            mercure_publisher_key=_mercure_key(env, "PUBLISHER") or _mercure_key(env, "SUBSCRIBER"),
            mercure_subscriber_key=_mercure_key(env, "SUBSCRIBER") or _mercure_key(env, "PUBLISHER"),
            mercure_anonymous=_bool(env, "MERCURE_ANONYMOUS"),
            mercure_publish_origins=_cors_origins(env, "MERCURE_PUBLISH_ORIGINS"),
        )
        if settings.webhook_url and not settings.webhook_secret and production:
            raise SettingsError(
                "SLUICE_WEBHOOK_URL needs SLUICE_WEBHOOK_SECRET (or a SLUICE_SECRET) to sign notices with"
            )
        if settings.max_batch_events > settings.ingest_max_backlog:
            raise SettingsError("MAX_BATCH_EVENTS must not exceed INGEST_MAX_BACKLOG")
        return settings


def readme_table() -> str:
    """The README's configuration table rows (`python -m config.settings` prints them)."""
    return "\n".join(f"| `{name}` | `{default}` | {text} |" for name, (default, text) in SETTINGS_DOC.items())


def write_readme_table(path: str) -> None:
    """Replace the README's configuration rows (those starting "| `") with `readme_table()`."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| `PORT`"))
    end = start
    while end < len(lines) and lines[end].startswith("| `"):
        end += 1
    lines[start:end] = readme_table().split("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":  # python -m config.settings [README.md]
    import sys

    if sys.argv[1:]:
        write_readme_table(sys.argv[1])
    else:
        print(readme_table())
