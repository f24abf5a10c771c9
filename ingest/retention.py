"""Retention: history is kept for a bounded time, so the database stays bounded at a steady
rate. One greenlet per process wakes every `RETENTION_PRUNE_S`; the process that wins a Postgres
advisory lock prunes, the others skip the round.

A round, each part in bounded steps, with a yield between them (ingest and delivery go on):
1. Slices ahead: the next storage slices (range partitions of `events` by position) exist
   before positions reach them (a batch that outruns them creates its slice itself).
2. Per-stream rules: a stream whose own age is shorter than the default, or that has a count
   limit, loses its expired events a step of rows at a time, oldest first, with their keys.
3. Whole slices: a slice whose newest event is older than the default age is dropped at once
   (DETACH CONCURRENTLY, DROP), after its keys; the events of streams that keep history longer
   stay in a compacted copy of the slice. Its cost is one slice, whatever the total history.

Every stream that lost events records the position up to which its history is gone
(`streams.pruned_upto`), which is how a resume point older than that is told `reset`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import psycopg2.extensions

from ingest.pool import Pool
from ingest.store import PRUNE_LOCK, EventStore

log = logging.getLogger("sluice.retention")

SLICES_AHEAD = 2  # slices kept ready beyond the current position
MAX_TRIM_STEPS = 100  # row steps per stream per round (the rest waits for the next round)


@dataclass
class PruneReport:
    """What one round did (for logs, metrics and tests)."""

    ran: bool = False
    slices_created: list[str] = field(default_factory=list)
    slices_dropped: int = 0
    events_removed: int = 0
    seconds: float = 0.0


class Pruner:
    """Removes expired history in the background; see the module docstring."""

    def __init__(
        self,
        store: EventStore,
        pool: Pool,
        *,
        max_age_s: int,
        max_events: int,
        every_s: float,
        slice_width: int,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.max_age_s = max_age_s
        self.max_events = max_events
        self.every_s = every_s
        self.slice_width = slice_width
        self.metrics = metrics  # a labelled Prometheus counter (what), or None
        self.rounds = 0
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> Pruner:
        self._greenlet = gevent.spawn(self._forever)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _forever(self) -> None:
        while True:
            try:
                report = self.run_once()
                if report.slices_dropped or report.events_removed:
                    log.info(
                        "retention: %d events removed, %d slices dropped in %.2fs",
                        report.events_removed,
                        report.slices_dropped,
                        report.seconds,
                    )
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be down: next round
                log.warning("retention round failed: %s", exc)
            gevent.sleep(self.every_s)

    def run_once(self) -> PruneReport:
        """One round, if this process wins the lock (else `ran` is False)."""
        report = PruneReport()
        started = time.monotonic()
        with self.pool.connection(timeout_s=30) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,))
                if not cur.fetchone()[0]:
                    return report
            try:
                report.ran = True
                last = self.store.last_position(conn)
                report.slices_created = self.store.ensure_slices(
                    conn, last + SLICES_AHEAD * self.slice_width, self.slice_width
                )
                self._trim_streams(conn, report)
                if self.max_age_s > 0:
                    self._drop_slices(conn, last, report)
            finally:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))
        self.rounds += 1
        report.seconds = time.monotonic() - started
        self._count(report)
        return report

    def _trim_streams(self, conn: psycopg2.extensions.connection, report: PruneReport) -> None:
        for stream, age_s, max_events in self.store.streams_to_trim(conn, self.max_age_s, self.max_events):
            for _ in range(MAX_TRIM_STEPS):
                removed = self.store.trim_stream(conn, stream, age_s, max_events)
                report.events_removed += removed
                gevent.sleep(0)
                if not removed:
                    break

    def _drop_slices(self, conn: psycopg2.extensions.connection, last: int, report: PruneReport) -> None:
        keep = self.store.retention_exempt(conn, self.max_age_s)
        for piece in self.store.slices(conn):
            if piece.hi > last:
                return  # the slice being written (and those ahead) stay
            newest = self.store.slice_newest(conn, piece)
            if newest is not None and newest[1] < self.max_age_s:
                return  # slices are in position order: the rest are newer
            if newest is not None and piece.name.startswith("events_c"):
                continue  # compacted already: what is left is kept longer on purpose
            report.events_removed += self.store.drop_slice(conn, piece, keep)
            report.slices_dropped += 1
            gevent.sleep(0)

    def _count(self, report: PruneReport) -> None:
        if self.metrics is None:
            return
        self.metrics.labels("events").inc(report.events_removed)
        self.metrics.labels("slices").inc(report.slices_dropped)
