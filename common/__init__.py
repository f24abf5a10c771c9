"""Neutral leaves every other package may use: errors as problem details, a bounded cache, and
the small HTTP client Sluice calls its origin with. Nothing here imports anything of Sluice."""
