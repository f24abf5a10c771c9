"""The bounded Postgres connection pool: the only place Sluice opens database connections.

A gevent semaphore caps connections per process at `DB_POOL_SIZE`; a caller that cannot get one
within its timeout gets `Unavailable` (503 + Retry-After) instead of waiting forever. Connections
that were idle for a while are pinged before use and broken ones are discarded, so the pool heals
by itself after a Postgres restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions
from gevent.lock import BoundedSemaphore

from common.problems import Unavailable

# Errors that mean "the connection or the server is gone", not "your SQL is wrong".
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
IDLE_PING_S = 1.0


class DatabaseUnavailable(Unavailable):
    """Postgres cannot be reached or the pool is exhausted; retry later."""

    def __init__(self, detail: str, retry_after: int = 2) -> None:
        super().__init__(detail, retry_after=retry_after, slug="database-unavailable")


class Pool:
    """At most `size` connections; callers borrow one with `with pool.connection() as conn`."""

    def __init__(
        self,
        dsn: str,
        size: int,
        timeout_s: float = 2.0,
        connect_timeout_s: int = 3,
        application_name: str = "sluice",
    ) -> None:
        self.dsn = dsn
        self.size = size
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self._sem = BoundedSemaphore(size)
        self._idle: list[tuple[psycopg2.extensions.connection, float]] = []
        self.opened = 0  # connections open right now (idle + in use)
        self.in_use = 0
        self.waiting = 0

    def _connect(self) -> psycopg2.extensions.connection:
        try:
            conn = psycopg2.connect(
                self.dsn,
                connect_timeout=self.connect_timeout_s,
                application_name=self.application_name,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                # Every hot read is an ordered index range that stops after a page. A bitmap
                # scan reads every matching row and sorts them: the plan that makes a read
                # cost what the stream holds instead of what it returns.
                # A batch is one statement with its COMMIT (ingest/store.py): if this process
                # dies while that statement waits for the position lock, Postgres checks every
                # second that the client is still there and rolls it back, instead of
                # committing the unacknowledged events of a dead process when the lock frees.
                options="-c enable_bitmapscan=off -c client_connection_check_interval=1000",
            )
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {_first_line(exc)}") from exc
        conn.autocommit = True  # transactions are explicit (BEGIN ... COMMIT) where needed
        self.opened += 1
        return conn

    def _discard(self, conn: psycopg2.extensions.connection) -> None:
        self.opened -= 1
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone anyway
            pass

    def _checkout(self) -> psycopg2.extensions.connection:
        while self._idle:
            conn, idle_since = self._idle.pop()
            if conn.closed:
                self._discard(conn)
                continue
            if time.monotonic() - idle_since > IDLE_PING_S:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                except CONNECTION_ERRORS:
                    self._discard(conn)
                    continue
            return conn
        return self._connect()

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[psycopg2.extensions.connection]:
        """Borrow a connection; raise DatabaseUnavailable if none frees up within the timeout."""
        self.waiting += 1
        try:
            acquired = self._sem.acquire(timeout=self.timeout_s if timeout_s is None else timeout_s)
        finally:
            self.waiting -= 1
        if not acquired:
            raise DatabaseUnavailable("all database connections are busy", retry_after=1)
        self.in_use += 1
        conn = None
        try:
            conn = self._checkout()
            yield conn
        except CONNECTION_ERRORS as exc:
            if conn is not None:
                self._discard(conn)
                conn = None
            raise DatabaseUnavailable(f"database connection lost: {_first_line(exc)}") from exc
        except BaseException:
            if conn is not None and not self._reset(conn):
                conn = None
            raise
        else:
            if conn is not None and not self._reset(conn):
                conn = None
        finally:
            if conn is not None:
                self._idle.append((conn, time.monotonic()))
            self.in_use -= 1
            self._sem.release()

    def _reset(self, conn: psycopg2.extensions.connection) -> bool:
        """Leave the connection outside any transaction; discard it if that fails."""
        if conn.closed:
            self.opened -= 1
            return False
        if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            try:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK")
            except Exception:  # noqa: BLE001
                self._discard(conn)
                return False
        return True

    def close(self) -> None:
        while self._idle:
            self._discard(self._idle.pop()[0])


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
