"""The one Redis pub/sub reconnect loop: hold a subscription, hand each message on, and after a
failure wait and subscribe again (the hub's relay, presence and revocations all use it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent


def subscribe_forever(
    redis: Any,
    channel: str,
    on_message: Callable[[bytes], None],
    *,
    on_up: Callable[[], None] | None = None,
    on_down: Callable[[Exception], None] | None = None,
    retry_s: float = 1.0,
) -> None:
    """Hold one subscription to `channel`, calling `on_message(data)` for each message;
    after a failure, `on_down(exc)`, wait `retry_s` and subscribe again. Runs until killed."""
    while True:
        pubsub = None
        try:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            if on_up is not None:
                on_up()
            for message in pubsub.listen():
                if message.get("type") == "message":
                    on_message(message["data"])
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down: the callers fall back
            if on_down is not None:
                on_down(exc)
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - it is being thrown away
                    pass
        gevent.sleep(retry_s)
