"""Sluice: `python app.py` and the WSGI entry point gunicorn loads (`app:wsgi()`).

    python app.py            serve (embedded PostgreSQL and Redis when no URLs are set)
    python app.py migrate    apply database migrations and exit (Heroku's release phase)
    python app.py token ...  print a token signed with the configured secret

gevent patches the standard library, and psycogreen makes psycopg2 cooperative, before anything
else is imported: a blocking call then parks only its own greenlet. The services are built in
runtime/services.py, the Flask app in web/app.py, the server in web/server.py.
"""

from gevent import monkey

monkey.patch_all()

import psycogreen.gevent  # noqa: E402

psycogreen.gevent.patch_psycopg()

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask  # noqa: E402

from auth.tokens import mint  # noqa: E402
from config.settings import Settings, SettingsError  # noqa: E402
from runtime.devenv import (  # noqa: E402
    EmbeddedServices,
    configure_logging,
    dev_secret,
    prepare_settings,
    raise_open_files_limit,
    tune_gc,
)
from runtime.services import build_services, migrate  # noqa: E402
from web.app import create_app  # noqa: E402
from web.server import serve  # noqa: E402


def wsgi() -> Flask:
    """The WSGI application for gunicorn (`gunicorn 'app:wsgi()'`), built in each worker."""
    configure_logging()
    settings = prepare_settings(EmbeddedServices())  # URLs come from the master (config/gunicorn.py)
    raise_open_files_limit()
    app = create_app(build_services(settings))
    tune_gc()
    return app


def migrate_command() -> None:
    embedded = EmbeddedServices()
    try:
        applied = migrate(prepare_settings(embedded))
        print(f"sluice: migrations applied: {', '.join(applied) or 'none (up to date)'}")
    finally:
        embedded.stop()


def token_command(argv: list[str]) -> None:
    """Print a token signed with SLUICE_SECRET(S), or the development secret."""
    parser = argparse.ArgumentParser(prog="python app.py token", description=token_command.__doc__)
    parser.add_argument("--sub", required=True, help="the client id (`sub` claim)")
    parser.add_argument("--publish", action="append", default=[], help="stream pattern (repeat)")
    parser.add_argument("--subscribe", action="append", default=[], help="stream pattern (repeat)")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    parser.add_argument("--revoke", action="store_true", help="may revoke tokens (POST /api/v1/revocations)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if settings.secrets:
        kid, key = next(iter(settings.secrets.items()))
    else:
        kid, key = "dev", dev_secret(Path(settings.data_dir))
    extra = {"revoke": True} if args.revoke else {}
    print(
        mint(
            key,
            args.sub,
            publish=args.publish,
            subscribe=args.subscribe,
            ttl_s=args.ttl,
            kid=kid if kid != "default" else None,
            **extra,
        )
    )


def main(argv: list[str]) -> None:
    configure_logging()
    try:
        if argv[:1] == ["migrate"]:
            migrate_command()
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
