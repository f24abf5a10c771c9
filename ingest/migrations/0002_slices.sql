-- History for days: `events` becomes a table partitioned by position range ("slices"), so age
-- retention drops whole slices instead of deleting rows; idempotency keys move to their own
-- table (a unique index on a partitioned table must contain the partition key, and looking a key
-- up in every slice would cost a probe per slice); streams get retention overrides and the
-- position below which their history may be gone.
--
-- The existing table is not copied: it is attached as the first slice, covering every position
-- up to the counter's current value, so the migration costs one pass over the keys (to fill
-- event_keys), not over the events. New slices are created by the store as positions advance.
-- It takes exclusive locks on `events` for its duration: run it (the release phase) before the
-- new processes start; keyed events written meanwhile by old processes would not be known to
-- the key table.

ALTER TABLE events RENAME TO events_legacy;
ALTER INDEX events_stream_id RENAME TO events_legacy_stream_id;
ALTER INDEX events_client_id RENAME TO events_legacy_client_id;

CREATE TABLE events (
    id bigint NOT NULL,
    stream text NOT NULL,
    type text NOT NULL,
    data text NOT NULL,          -- the event's data, JSON-encoded once at ingest
    client_id text NOT NULL,     -- the publishing token's subject
    key text,                    -- idempotency key, unique per client (see event_keys)
    created_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (id);
CREATE INDEX events_id ON events (id);
CREATE INDEX events_stream_id ON events (stream, id);
CREATE INDEX events_client_id ON events (client_id, id);

-- The legacy rows become slice [0, last + 1): the CHECK lets ATTACH skip its validation scan.
DO $$
DECLARE
    hi bigint := (SELECT last FROM sluice_position) + 1;
BEGIN
    EXECUTE format('ALTER TABLE events_legacy ADD CONSTRAINT events_legacy_range '
                   'CHECK (id >= 0 AND id < %s)', hi);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy FOR VALUES FROM (0) TO (%s)',
                   hi);
END $$;
ALTER TABLE events_legacy DROP CONSTRAINT events_pkey;
ALTER TABLE events_legacy DROP CONSTRAINT events_legacy_range;

CREATE TABLE event_keys (
    client_id text NOT NULL,
    key text NOT NULL,
    id bigint NOT NULL,          -- the event's position (pruned with it)
    stream text NOT NULL,
    PRIMARY KEY (client_id, key)
);
CREATE INDEX event_keys_id ON event_keys (id);
INSERT INTO event_keys (client_id, key, id, stream)
    SELECT client_id, key, id, stream FROM events_legacy WHERE key IS NOT NULL;
DROP INDEX events_client_key;

ALTER TABLE streams
    ADD COLUMN retention_max_age_s bigint CHECK (retention_max_age_s >= 0),   -- NULL: default
    ADD COLUMN retention_max_events bigint CHECK (retention_max_events >= 0), -- NULL: default
    ADD COLUMN pruned_upto bigint NOT NULL DEFAULT 0,  -- history at or below may be gone
    ADD COLUMN count_checked_id bigint NOT NULL DEFAULT 0;  -- last_id when counted

-- A deleted stream's name and the position it was deleted at: a stream re-created under that
-- name starts with pruned_upto there, so an old resume point is told its history is gone.
CREATE TABLE stream_tombstones (
    name text PRIMARY KEY,
    deleted_upto bigint NOT NULL
);
