"""The development environment: embedded PostgreSQL and Redis when their URLs are unset, a
development secret kept in the data folder, and the process limits a server needs.

`python app.py` and gunicorn's master (config/gunicorn.py) both complete their settings here.
"""

from __future__ import annotations

import gc
import os
import resource
import secrets
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from config.settings import Settings, SettingsError


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


GC_YOUNG_THRESHOLD = 20_000  # CPython's default is 700


def tune_gc() -> None:
    """Once the app is built: what exists now (modules, settings, pools, caches) lives as long
    as the process, so the cycle collector stops walking it (`gc.freeze`), and it runs its
    young collection every 20,000 new objects instead of every 700. Every request allocates a
    few hundred objects; on an immediate long-poll this took 107-143 -> 98-118 us of CPU per
    answer. Garbage without cycles is freed at once either way."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def dev_secret(data_dir: Path) -> str:
    """A secret kept in the data folder so development tokens survive restarts."""
    path = data_dir / "dev-secret"
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


class EmbeddedServices:
    """Embedded PostgreSQL/Redis started for development when their URLs are unset."""

    def __init__(self) -> None:
        self.children: list[Any] = []

    def complete(self, settings: Settings) -> Settings:
        # Imported only when a URL is unset: production never loads the embedded supervisors.
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
    """The settings from the environment, completed for development: a development secret
    when none is set (loudly), and embedded servers for unset URLs (never in production)."""
    settings = Settings.from_env()
    if not settings.secrets and not settings.public_keys:
        secret = dev_secret(Path(settings.data_dir))
        settings = replace(settings, secrets={"dev": secret})
        print(
            "sluice: WARNING: no SLUICE_SECRET set; using a development secret from "
            f"{Path(settings.data_dir) / 'dev-secret'}. Never run like this in production.",
            file=sys.stderr,
            flush=True,
        )
    if settings.webhook_url and not settings.webhook_secret:  # development: the dev secret
        settings = replace(settings, webhook_secret=next(iter(settings.secrets.values())))
    if settings.production and (not settings.database_url or not settings.redis_url):
        raise SettingsError("production needs DATABASE_URL and REDIS_URL")
    return embedded.complete(settings)


def configure_logging() -> None:
    """One log format for the process (`python app.py`, its CLI, and each gunicorn worker)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
