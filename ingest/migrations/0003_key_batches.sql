-- Keys are written before the position lock, in their batch's own transaction, so that the one
-- serial section of a write (the counter's row lock, held to COMMIT) no longer pays for the key
-- table's random B-tree inserts. Such a key cannot know its event's position yet: it names its
-- batch's ticket (a sequence value, taken without any lock) and its place in the batch (1..n),
-- and the batch's row, written under the lock, says where the batch starts. A key's position is
-- `COALESCE(id, first + place)`: keys written before this migration keep their `id`.
CREATE SEQUENCE key_batch_tickets;
CREATE TABLE key_batches (
    ticket bigint PRIMARY KEY,
    first bigint NOT NULL,   -- the position before the batch's first event
    upto bigint NOT NULL     -- the batch's last position
);
CREATE INDEX key_batches_upto ON key_batches (upto);

ALTER TABLE event_keys
    ALTER COLUMN id DROP NOT NULL,
    ADD COLUMN ticket bigint,
    ADD COLUMN place integer,
    ADD CONSTRAINT event_keys_names_one_event CHECK (
        (id IS NOT NULL AND ticket IS NULL AND place IS NULL)
        OR (id IS NULL AND ticket IS NOT NULL AND place IS NOT NULL));
-- Only keys that carry their position are found by it (slices drop them by position range);
-- the others are found through their slice's events.
DROP INDEX event_keys_id;
CREATE INDEX event_keys_id ON event_keys (id) WHERE id IS NOT NULL;
-- Upgrading: a process of the previous release reads a key's `id` only, so during a rolling
-- restart it would not find the position of a key that a new process wrote; run the release
-- phase, then replace the old processes promptly (or restart them all at once).
