-- Revocations and spent single-use token ids, kept durably: Redis is their fast path (every
-- process's tables, the announcement channel), this is what survives a Redis that restarts
-- empty and a process that starts while Redis is away.
CREATE TABLE revocations (
    kind text NOT NULL CHECK (kind IN ('jti', 'sub')),
    value text NOT NULL,
    at double precision NOT NULL,  -- jti: remembered until (unix time); sub: issued up to
    PRIMARY KEY (kind, value)
);
CREATE TABLE spent_tokens (
    key text PRIMARY KEY,            -- sha256 of subject NUL jti, hex
    until double precision NOT NULL  -- unix time after which the token is expired anyway
);
CREATE INDEX spent_tokens_until ON spent_tokens (until);
