"""The batcher: one greenlet per process that turns many small ingest requests into few commits.

Request greenlets `submit` their events and wait; the batcher collects requests until it has
`max_events` or the oldest has waited `max_wait_ms`, writes them in one transaction on one pooled
connection, and wakes each request once its events are durable (group commit). With no batch in
flight it does not wait: what is queued is written at once, and what arrives meanwhile gathers
for the next batch, so a quiet server answers a lone event a `max_wait_ms` sooner and a busy
one batches as before. The backlog is bounded: past `max_backlog` events, `submit` refuses with
503 + Retry-After at once.

A request is never split across batches, so it is all-or-nothing. If a batch fails on bad data,
its requests are retried one by one so one request's data never fails another's.

Two batches may be in flight. A batch's write has two parts (`EventStore.prepare`, then
`finish`): it opens its transaction and claims its new idempotency keys without any lock, then
takes the position counter's row lock (the one serial section of every write, held to COMMIT)
and writes its events. While one batch is written, the next prepares on a connection of its own
and holds it open until its turn, so only its serial statement is left (see `Flight` for the
rule that keeps the two from waiting for each other). Writes, wake-ups and commit listeners stay
strictly in batch order.

Most keys are new, and looking them up costs Postgres about a fifth of what the write does. So
unless a batch met a stored key (a repeat, or a key reused for another event) in the last
`LOOKUP_AFTER_REPEAT_S`, keys are not looked up at all: the batch claims them as if none were
stored. One that is fails the key table's primary key, nothing of that try commits, and the
batch is planned again with its keys looked up. A client retrying after an outage therefore
costs one wasted claim, then lookups for as long as repeats keep coming.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import ExitStack

import gevent
import psycopg2
from gevent.event import Event

from common.problems import Problem, Unavailable
from ingest.events import Commit, IngestRequest
from ingest.pool import DatabaseUnavailable, Pool
from ingest.store import EventStore, KeyedEvent, KeyRaced, Prepared, ReservationFailed

log = logging.getLogger("sluice.batcher")

CommitListener = Callable[[Commit], None]
KnownKeys = dict[tuple[str, str], KeyedEvent]  # keys looked up before the lock
Early = tuple[psycopg2.extensions.connection, Prepared]  # a batch prepared on a held connection


class Flight:
    """One batch's progress, as the batch after it needs to know it. A batch claims its new
    keys (`EventStore.prepare`) in a transaction that stays open until its turn to write; the
    one behind it may claim its own meanwhile, but only once this one's first claims are made
    (`claimed`), and it drops them again as soon as this one must claim again (`reclaiming`:
    a retry, or its requests written one by one). Otherwise this batch could wait in Postgres
    for a key that the next one holds while the next waits here for this one to finish."""

    __slots__ = ("claimed", "done", "reclaiming")

    def __init__(self) -> None:
        self.claimed = Event()  # its first claims are made (or it is done)
        self.reclaiming = Event()  # it is about to claim keys again
        self.done = Event()  # written, woken and told to the listeners


class Backpressure(Unavailable):
    """The ingest backlog is full: the client should retry after a moment."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=1, slug="backlog-full")


PIPELINE = 2  # batches in flight: one writing, the next preparing (its keys claimed)
LOOKUP_AFTER_REPEAT_S = 5.0  # after a batch met a stored key, look keys up for this long


class Batcher:
    """Coalesces ingest requests into group commits; see the module docstring."""

    def __init__(
        self,
        store: EventStore,
        pool: Pool,
        *,
        max_events: int = 2000,
        max_wait_ms: float = 2.0,
        max_backlog: int = 50000,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.max_events = max_events
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_backlog = max_backlog
        self.metrics = metrics
        self.backlog = 0  # events submitted, not yet committed or failed
        self.flushes = 0  # batches written (for the dashboard's rates)
        self.flush_seconds_total = 0.0
        self.committed_events = 0
        self._queue: deque[IngestRequest] = deque()
        self._queued_events = 0
        self._inflight: list[list[IngestRequest]] = []  # batches being written, oldest first
        self._flushes: list[gevent.Greenlet] = []  # at most PIPELINE of them
        self._last: Flight | None = None  # the newest batch in flight
        self._key_met_at = float("-inf")  # when a batch last met a key stored before it
        self._wakeup = Event()
        self._stopping = False
        self._listeners: list[CommitListener] = []
        self._greenlet: gevent.Greenlet | None = None
        # Called whenever the pending set changes (a request accepted, committed, failed or
        # taken back): the fleet's pending mirror (ingest/pending.py) listens. Must not block.
        self.on_change: Callable[[], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._greenlet = gevent.spawn(self._run)
        return self

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener(commit)` after each commit, in commit order (the hub publishes here)."""
        self._listeners.append(listener)

    def stop(self, timeout: float = 20.0) -> bool:
        """Refuse new work, flush everything accepted, then end; True if it all flushed in time."""
        self._stopping = True
        self._wakeup.set()
        if self._greenlet is None:
            return True
        self._greenlet.join(timeout)
        if not self._greenlet.dead:
            self._greenlet.kill(block=False)
            gevent.killall(self._flushes, block=False)
            return False
        return True

    # -- request side -------------------------------------------------------------------------
    def submit(self, req: IngestRequest) -> None:
        """Queue a request's events for the next batch, or refuse at once if full or stopping."""
        if self._stopping:
            raise Unavailable("the server is shutting down", retry_after=2, slug="shutting-down")
        n = len(req.events)
        if self.backlog + n > self.max_backlog:
            if self.metrics:
                self.metrics.rejected.inc(n)
            raise Backpressure(f"ingest backlog is full ({self.backlog} events waiting)")
        self.backlog += n
        self._queued_events += n
        self._queue.append(req)
        if self.metrics:
            self.metrics.backlog.set(self.backlog)
        if self.on_change is not None:
            self.on_change()
        # Wake the batcher only when it has something new to decide: the first request of a
        # batch (it sleeps until one comes) or a full batch (it stops waiting for the deadline).
        if len(self._queue) == 1 or self._queued_events >= self.max_events:
            self._wakeup.set()

    def commit(self, req: IngestRequest, timeout: float) -> None:
        """Submit and wait until the request's events are committed (or raise why not)."""
        self.submit(req)
        try:
            req.done.get(timeout=timeout)
        except gevent.Timeout:
            # Not acknowledged: it may still commit later, which a retry with the same keys
            # handles. If it is still queued, take it back so it does not commit unseen.
            self._cancel(req)
            raise Unavailable(
                "the database did not commit in time", retry_after=2, slug="commit-timeout"
            ) from None

    def _cancel(self, req: IngestRequest) -> None:
        if req in self._queue and not req.cancelled:
            req.cancelled = True
            self._queue.remove(req)
            self._queued_events -= len(req.events)
            self.backlog -= len(req.events)
            if self.on_change is not None:
                self.on_change()

    def pending(self) -> Iterable[IngestRequest]:
        """Requests accepted but not yet committed (in flight first, then queued)."""
        return [*(req for batch in self._inflight for req in batch), *self._queue]

    # -- the batcher greenlet -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._collect()
        finally:
            gevent.joinall(self._flushes)  # everything taken is written before the end

    def _collect(self) -> None:
        while True:
            while not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                self._wakeup.wait()
            # Nothing in flight: write what is here at once (what comes meanwhile gathers for
            # the next batch). A batch in flight: gather up to `max_wait_ms` first.
            busy = any(not g.dead for g in self._flushes)
            deadline = self._queue[0].accepted_at + self.max_wait_s if busy else 0.0
            while self._queued_events < self.max_events and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                self._wakeup.wait(remaining)
            while len(self._flushes) >= PIPELINE:  # the older one must finish first
                gevent.wait(self._flushes, count=1)
                self._flushes = [g for g in self._flushes if not g.dead]
            batch = self._take()
            if batch:
                self._start_flush(batch)

    def _start_flush(self, batch: list[IngestRequest]) -> None:
        previous, flight = self._last, Flight()
        self._last = flight
        self._inflight.append(batch)
        self._flushes.append(gevent.spawn(self._pipelined, batch, previous, flight))

    def _pipelined(self, batch: list[IngestRequest], previous: Flight | None, flight: Flight) -> None:
        try:
            with ExitStack() as held:
                known = self._known_keys()
                early = None
                if previous is not None and not previous.done.is_set():
                    gevent.wait([previous.claimed, previous.done], count=1)
                    if not (previous.done.is_set() or previous.reclaiming.is_set()):
                        early = self._prepare_early(held, batch, known)
                    if early is not None:
                        flight.claimed.set()
                        gevent.wait([previous.done, previous.reclaiming], count=1)
                        if not previous.done.is_set():  # it must claim again: make way
                            held.close()  # the connection goes back, its transaction rolled back
                            early = None
                if previous is not None:
                    previous.done.wait()
                self._flush(batch, known, early, flight)
        except Exception:  # the batcher outlives anything a batch brings
            log.exception("a batch failed unexpectedly")
            if any(b is batch for b in self._inflight):  # it failed before `_flush` took it
                self._inflight.remove(batch)
                self.backlog -= sum(len(r.events) for r in batch)
            for req in batch:
                if not req.done.ready():
                    req.done.set_exception(Problem(500, "internal-error", "the write failed"))
        finally:
            flight.claimed.set()
            flight.done.set()

    def _known_keys(self) -> KnownKeys | None:
        """What the write may take as the batch's stored keys: none, when no stored key was met
        lately (a wrong guess fails the key table's primary key, and the batch is planned again
        with its keys looked up), else None: look them up."""
        return {} if time.monotonic() - self._key_met_at >= LOOKUP_AFTER_REPEAT_S else None

    def _prepare_early(
        self, held: ExitStack, batch: list[IngestRequest], known: KnownKeys | None
    ) -> Early | None:
        """While the batch in flight is written: open this one's transaction on a connection
        of its own, look its keys up if need be and claim the new ones (`EventStore.prepare`),
        so that only the serial statement is left for its turn. None if that cannot be done now
        (a key raced in, the database is busy or away): the write then does it all itself."""
        try:
            conn = held.enter_context(self.pool.connection())
            return conn, self.store.prepare(conn, batch, known)
        except (DatabaseUnavailable, ReservationFailed, KeyRaced, psycopg2.Error):
            return None
        except Exception:  # noqa: BLE001 - a request that cannot be encoded: the write isolates it
            return None

    def _take(self) -> list[IngestRequest]:
        batch: list[IngestRequest] = []
        count = 0
        while self._queue:
            n = len(self._queue[0].events)
            if batch and count + n > self.max_events:
                break
            req = self._queue.popleft()
            self._queued_events -= n
            count += n
            batch.append(req)
        return batch

    def _flush(
        self,
        batch: list[IngestRequest],
        known: KnownKeys | None = None,
        early: Early | None = None,
        flight: Flight | None = None,
    ) -> None:
        started = time.monotonic()
        try:
            commits = self._write(batch, known, early, flight or Flight())
        finally:
            self._inflight.remove(batch)
            self.backlog -= sum(len(r.events) for r in batch)
            if self.metrics:
                self.metrics.backlog.set(self.backlog)
            if self.on_change is not None:
                self.on_change()
        elapsed = time.monotonic() - started
        if any(
            r.error is not None or any(w.duplicate for w in r.results or ())
            for c in commits
            for r in c.requests
        ):
            self._key_met_at = time.monotonic()  # repeats come in runs: look keys up a while
        self.flushes += 1
        self.flush_seconds_total += elapsed
        self.committed_events += sum(len(r.events) for c in commits for r in c.requests if r.error is None)
        if self.metrics:
            self.metrics.flush_seconds.observe(elapsed)
            self.metrics.batch_events.observe(sum(len(r.events) for r in batch))
        for commit in commits:
            for req in commit.requests:
                if req.error is not None:
                    req.done.set_exception(req.error)
                else:
                    req.done.set(req.results)
            for listener in self._listeners:
                try:
                    listener(commit)
                except Exception:
                    log.exception("commit listener failed")

    def _write(
        self, batch: list[IngestRequest], known: KnownKeys | None, early: Early | None, flight: Flight
    ) -> list[Commit]:
        """Write the batch; return the commits made. Failed requests are told why. `known`: its
        stored keys as far as known (see `EventStore.write_batch`); `early`: the batch already
        prepared on a held connection."""
        try:
            return [self._write_once(batch, known, early, flight)]
        except Problem as problem:
            for req in batch:
                req.done.set_exception(problem)
            return []
        except psycopg2.Error as exc:
            if len(batch) == 1:
                log.error("ingest request failed in the database: %s", exc)
                batch[0].done.set_exception(
                    Problem(
                        400 if isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)) else 500,
                        "rejected-by-database",
                        "the database rejected this request's events",
                    )
                )
                return []
        except Exception as exc:  # whatever one request brings fails it alone
            if len(batch) == 1:
                log.exception("ingest request could not be written")
                bad_input = isinstance(exc, (UnicodeError, ValueError, TypeError))
                batch[0].done.set_exception(
                    Problem(
                        400 if bad_input else 500,
                        "unwritable-request",
                        "this request's events could not be written (nothing was stored)",
                    )
                )
                return []
        # Bad data somewhere in a multi-request batch: isolate it by writing requests alone.
        flight.reclaiming.set()
        commits: list[Commit] = []
        for req in batch:
            commits += self._write([req], None, None, flight)
        return commits

    def _write_once(
        self, batch: list[IngestRequest], known: KnownKeys | None, early: Early | None, flight: Flight
    ) -> Commit:
        def before_prepare() -> None:
            if flight.claimed.is_set():  # it claims again: the batch behind must make way
                flight.reclaiming.set()

        hooks = {"before_prepare": before_prepare, "after_prepare": flight.claimed.set}
        if early is not None:  # its transaction is open: the rest is one round trip
            conn, prepared = early
            after, upto = self.store.write_batch(conn, batch, known, prepared, **hooks)
            return Commit(batch, after, upto)
        for attempt in (1, 2):
            try:
                with self.pool.connection() as conn:
                    after, upto = self.store.write_batch(conn, batch, known, **hooks)
                return Commit(batch, after, upto)
            except ReservationFailed:
                # A stale connection fails on the first statement; nothing can have committed,
                # so one retry on a fresh connection is safe.
                if attempt == 2:
                    raise DatabaseUnavailable("database connection lost") from None
        raise AssertionError("unreachable")


class BatcherMetrics:
    """The Prometheus instruments the batcher updates (created by the app factory)."""

    def __init__(self, registry) -> None:  # type: ignore[no-untyped-def]
        from prometheus_client import Counter, Gauge, Histogram

        self.backlog = Gauge(
            "sluice_ingest_backlog_events",
            "Events accepted, not yet committed",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "sluice_ingest_rejected_events", "Events refused by backpressure", registry=registry
        )
        self.flush_seconds = Histogram(
            "sluice_batch_flush_seconds",
            "Time to write and commit one batch",
            registry=registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.batch_events = Histogram(
            "sluice_batch_events",
            "Events per committed batch",
            registry=registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
        )


def pending_events(
    batcher: Batcher, *, client_id: str | None, stream: str | None
) -> list[tuple[IngestRequest, int]]:
    """(request, event index) of pending events matching the filters, in acceptance order."""
    out: list[tuple[IngestRequest, int]] = []
    for req in batcher.pending():
        if client_id is not None and req.client_id != client_id:
            continue
        for i, ev in enumerate(req.events):
            if stream is None or ev.stream == stream:
                out.append((req, i))
    return out
