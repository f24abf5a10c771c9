"""Who may do what: token verification and minting, grants (stream patterns), origin
authorization for token-less subscribers, connection limits and reconnect pacing. Used by the
ingest and streaming sides alike; imports only `common` and `config` of Sluice."""
