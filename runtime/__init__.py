"""The composition root below HTTP: builds the process's services (pool, store, batcher, hub,
auth, presence, metrics) from the settings, and the development environment (embedded
PostgreSQL and Redis, a development secret). Imports no Flask and nothing of `web`."""
