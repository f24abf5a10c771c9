"""The naive baseline the ingest benchmark compares Sluice with, written for that comparison.

Same route, same validation and token checks, same pool bound (DB_POOL_SIZE), but the way
teams often write it by hand: every request borrows a pooled connection, inserts its events
(ids from a bigserial) and commits on its own. No batching, no group commit.
Run: DATABASE_URL=... SLUICE_SECRET=... PORT=... python bench/naive_server.py
"""

from gevent import monkey

monkey.patch_all()

import psycogreen.gevent  # noqa: E402

psycogreen.gevent.patch_psycopg()

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from auth.tokens import TokenVerifier  # noqa: E402
from ingest.pool import Pool  # noqa: E402
from ingest.validation import parse_body  # noqa: E402
from web.http import authenticate, install_error_handlers, json_response, read_body  # noqa: E402

SCHEMA = """
CREATE TABLE IF NOT EXISTS naive_events (
    id bigserial PRIMARY KEY, stream text NOT NULL, type text NOT NULL, data text NOT NULL,
    client_id text NOT NULL, key text, created_at timestamptz NOT NULL DEFAULT now())
"""


class NaiveServices:
    """Just what `web.http.authenticate` needs."""

    def __init__(self, pool: Pool, tokens: TokenVerifier) -> None:
        self.pool = pool
        self.tokens = tokens


def create_app() -> Flask:
    pool = Pool(
        os.environ["DATABASE_URL"],
        int(os.environ.get("DB_POOL_SIZE", "4")),
        timeout_s=10,
        application_name="naive",
    )
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(SCHEMA)
    services = NaiveServices(pool, TokenVerifier({"default": os.environ["SLUICE_SECRET"]}))
    app = Flask(__name__)
    app.extensions["sluice"] = services
    install_error_handlers(app)

    @app.post("/api/v1/events")
    def post_events():  # type: ignore[no-untyped-def]
        principal = authenticate()
        from flask import request

        events = parse_body(
            read_body(1 << 20), request.content_type or "", max_events=1000, max_data_bytes=65536
        )
        ids = []
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("BEGIN")
            for ev in events:
                cur.execute(
                    "INSERT INTO naive_events (stream, type, data, client_id, key) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                    (ev.stream, ev.type, ev.data, principal.subject, ev.key),
                )
                ids.append(cur.fetchone()[0])
            cur.execute("COMMIT")
        return json_response({"events": [{"id": str(i)} for i in ids]}, 201)

    return app


if __name__ == "__main__":
    server = WSGIServer(("127.0.0.1", int(os.environ["PORT"])), create_app(), log=None)
    print(f"naive: listening on {server.address}", flush=True)
    server.serve_forever()
