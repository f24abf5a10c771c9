"""The OpenAPI document served at /openapi.json (filled in by the full spec below)."""
from __future__ import annotations


def openapi_document() -> dict:
    return {"openapi": "3.1.0", "info": {"title": "Sluice", "version": "1"}, "paths": {}}
