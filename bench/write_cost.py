"""What Postgres spends per event on the batch write, and what each part of the layout costs.

    python bench/write_cost.py [--batches 250] [--rounds 3] [--only NAME,...]

A batch's write has two parts: the claim of its new idempotency keys, made before the position
lock, and the serial statement, which holds the position counter's row lock to COMMIT. One
backend's time per event in the serial statement bounds batched ingest however many
connections there are. This runs the store's own statements (`SQL_CLAIM_KEYS`, then
`SQL_FINISH_KEYED`, every key new) on one connection with the realistic shape (2,000-event
batches, every event keyed with a random 32-hex key, ~120-byte data, streams drawn from 1,000)
and then variants of the layout, each on a fresh embedded database (fsync on), rounds
alternated. Reports the median events/s of the serial statement (the ceiling), the claim's and
the serial statement's time per event, the backend's CPU per event (from /proc) and WAL bytes
per event. Loopback only; stops by itself.

Variants (each is today's layout with one thing moved, taken away or swapped):
  today         the claim, then the serial statement, as Sluice runs them
  keys-in-lock  the keys written inside the serial statement with their positions (the layout
                before key batches)
  no-upsert     without the streams' newest-position upsert
  no-client-idx without the events (client_id, id) index
  hash-key      the key table with a hash index on `key` instead of its (client_id, key)
                primary key (uniqueness then unchecked: a measure, not a layout to ship)
  no-key-table  without the key table (events keep their `key` column)
  bare          events without indexes, keys or upsert: the insert alone
  parse         parsing the rows only (json_to_recordset), nothing written
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedded.servers import EmbeddedPostgres  # noqa: E402
from ingest.store import SQL_CLAIM_KEYS, SQL_FINISH_KEYED, EventStore  # noqa: E402

BATCH = 2000
SERIAL = SQL_FINISH_KEYED


def cte(name: str) -> str:
    """One named part of the store's serial statement, as the store writes it."""
    start = SERIAL.index(f"{name} AS (")
    depth = 0
    for i in range(start + len(name) + 4, len(SERIAL)):
        depth += {"(": 1, ")": -1}.get(SERIAL[i], 0)
        if depth == 0:
            return SERIAL[start : i + 1]
    raise ValueError(name)


HEAD = SERIAL[: SERIAL.index("e AS (")]  # the counter and the parsed rows
TAIL = SERIAL[SERIAL.index(" SELECT set_config") :]
KEYS_IN_LOCK = (
    "k AS (INSERT INTO event_keys (client_id, key, id, stream) SELECT c, k, i, s FROM r WHERE k IS NOT NULL)"
)


def statement(*parts: str, extra: str = "") -> str:
    body = ", ".join(parts)
    tail = TAIL.replace(" FROM p;", f" FROM p{extra};", 1)
    return (HEAD + body if parts else HEAD.rstrip(", ")) + tail


DROP_EVENT_INDEXES = ["DROP INDEX events_id", "DROP INDEX events_stream_id", "DROP INDEX events_client_id"]
# name: (setup statements, claims keys first, the serial statement)
VARIANTS: dict[str, tuple[list[str], bool, str]] = {
    "today": ([], True, SERIAL),
    "keys-in-lock": ([], False, statement(cte("e"), KEYS_IN_LOCK, cte("u"))),
    "no-upsert": ([], True, statement(cte("e"), cte("b"))),
    "no-client-idx": (["DROP INDEX events_client_id"], True, SERIAL),
    "hash-key": (
        [
            "ALTER TABLE event_keys DROP CONSTRAINT event_keys_pkey",
            "CREATE INDEX event_keys_key ON event_keys USING hash (key)",
        ],
        True,
        SERIAL,
    ),
    "no-key-table": ([], False, statement(cte("e"), cte("u"))),
    "bare": (DROP_EVENT_INDEXES, False, statement(cte("e"))),
    "parse": ([], False, statement("x AS (SELECT count(*) FROM r)", extra=", x")),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_rows(data: str) -> tuple[str, str]:
    """A batch's rows, and its keys as the claim takes them (in the store's order)."""
    rows = [
        {
            "i": i + 1,
            "s": f"s/{random.randrange(1000)}",
            "t": "message",
            "d": data,
            "c": "bench",
            "k": os.urandom(16).hex(),
        }
        for i in range(BATCH)
    ]
    keys = [{"c": r["c"], "k": r["k"], "i": r["i"], "s": r["s"]} for r in rows]
    return orjson.dumps(rows).decode(), orjson.dumps(keys).decode()


def run(name: str, batches: int) -> dict[str, float]:
    setup, claims, sql = VARIANTS[name]
    keyed_serial = "key_batches" in sql
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="sluice-write-cost-")) / "pg").start()
    try:
        conn = psycopg2.connect(pg.url)
        conn.autocommit = True
        store = EventStore()
        store.migrate(conn)
        store.ensure_slices(conn, BATCH * batches + 1, store.slice_width)
        cur = conn.cursor()
        for s in setup:
            cur.execute(s)
        cur.execute("SELECT pg_backend_pid(), pg_current_wal_lsn()")
        backend, lsn = cur.fetchone()
        data = orjson.dumps({"payload": "x" * 100}).decode()
        bodies = [batch_rows(data) for _ in range(batches)]  # made before the clock starts
        cpu0, serial, claim = cpu_seconds(backend), 0.0, 0.0
        for rows, keys in bodies:
            started = time.perf_counter()
            if claims:
                cur.execute("BEGIN; " + SQL_CLAIM_KEYS, (keys,))
            else:
                cur.execute("BEGIN; SELECT nextval('key_batch_tickets')")
            locked = time.perf_counter()
            cur.execute(sql, (BATCH, BATCH, rows) + ((BATCH,) if keyed_serial else ()))
            cur.fetchone()
            serial += time.perf_counter() - locked
            claim += locked - started
        cpu = cpu_seconds(backend) - cpu0
        cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
        wal = float(cur.fetchone()[0])
        conn.close()
    finally:
        pg.remove()
    events = BATCH * batches
    return {
        "events_per_s": events / serial,
        "serial_us": serial / events * 1e6,
        "claim_us": claim / events * 1e6,
        "cpu_us": cpu / events * 1e6,
        "wal_b": wal / events,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, default=250, help="2,000-event batches per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            res = run(name, args.batches)
            results[name].append(res)
            print(
                f"round {r + 1} {name:14s} {res['events_per_s']:9,.0f} events/s serial "
                f"{res['serial_us']:5.1f} µs/event, claim {res['claim_us']:5.1f}, "
                f"CPU {res['cpu_us']:5.1f}, {res['wal_b']:5.0f} WAL B/event",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\nBatch write, one connection, {BATCH:,}-event realistic batches, "
        f"{args.batches * BATCH:,} events per run, medians of {args.rounds} rounds\n"
    )
    print(
        "| variant | serial statement events/s | serial µs/event | claim µs/event | "
        "backend CPU µs/event | WAL bytes/event |"
    )
    print("|---|---:|---:|---:|---:|---:|")

    def med(rs: list[dict[str, float]], k: str) -> float:
        return statistics.median(x[k] for x in rs)

    for name in names:
        rs = results[name]
        print(
            f"| {name} | {med(rs, 'events_per_s'):,.0f} | {med(rs, 'serial_us'):.1f} | "
            f"{med(rs, 'claim_us'):.1f} | {med(rs, 'cpu_us'):.1f} | {med(rs, 'wal_b'):.0f} |"
        )


if __name__ == "__main__":
    main()
