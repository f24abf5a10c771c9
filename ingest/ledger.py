"""The durable half of revocations and single-use tokens (auth.revocations.Ledger): rows in
Postgres, read at start and on every reload, so a Redis that restarts empty or a process that
starts while Redis is away never forgets a revocation or lets a spent token in again."""

from __future__ import annotations

import time

from ingest.pool import Pool

LEDGER_TIMEOUT_S = 15.0  # a revocation or a single-use check waits at most this for a connection


class PgLedger:
    """Revocations and spent token ids in the `revocations` / `spent_tokens` tables."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def record(self, kind: str, value: str, at: float) -> None:
        with self.pool.connection(LEDGER_TIMEOUT_S) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO revocations (kind, value, at) VALUES (%s, %s, %s) "
                "ON CONFLICT (kind, value) DO UPDATE SET at = GREATEST(revocations.at, "
                "EXCLUDED.at)",
                (kind, value, at),
            )

    def entries(self, jti_after: float, sub_after: float) -> list[tuple[str, str, float]]:
        """Revocations still in force: jtis remembered past `jti_after`, subject cut-offs
        later than `sub_after`; older rows are removed on the way."""
        with self.pool.connection(LEDGER_TIMEOUT_S) as conn, conn.cursor() as cur:
            cur.execute(
                "DELETE FROM revocations WHERE (kind = 'jti' AND at <= %s) OR (kind = 'sub' AND at <= %s)",
                (jti_after, sub_after),
            )
            cur.execute("DELETE FROM spent_tokens WHERE until < %s", (time.time(),))
            cur.execute("SELECT kind, value, at FROM revocations")
            return [(kind, value, float(at)) for kind, value, at in cur.fetchall()]

    def spend(self, key: str, until: float) -> bool:
        """Mark a single-use token spent; False if it already was."""
        with self.pool.connection(LEDGER_TIMEOUT_S) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO spent_tokens (key, until) VALUES (%s, %s) "
                "ON CONFLICT (key) DO NOTHING RETURNING 1",
                (key, until),
            )
            return cur.fetchone() is not None
