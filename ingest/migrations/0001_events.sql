-- Streams, events, and the single-row position counter.
-- Event ids come from sluice_position, advanced under its row lock inside each write
-- transaction: the lock is held until commit, so commit order equals id order across all
-- streams and all processes. A bigserial would not give that (sequences hand out numbers
-- outside transaction order).
CREATE TABLE sluice_position (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last bigint NOT NULL
);
INSERT INTO sluice_position (singleton, last) VALUES (true, 0);

CREATE TABLE streams (
    name text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_id bigint NOT NULL DEFAULT 0
);

CREATE TABLE events (
    id bigint PRIMARY KEY,
    stream text NOT NULL,
    type text NOT NULL,
    data text NOT NULL,          -- the event's data, JSON-encoded once at ingest
    client_id text NOT NULL,     -- the publishing token's subject
    key text,                    -- idempotency key, unique per client
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_stream_id ON events (stream, id);
CREATE INDEX events_client_id ON events (client_id, id);
CREATE UNIQUE INDEX events_client_key ON events (client_id, key) WHERE key IS NOT NULL;
