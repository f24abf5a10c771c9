"""Everything a subscription needs decided before the first byte: the streams, the credential,
the grants, the resume point, the connection id and the streams' existence. A failed check
raises a Problem (400 malformed, 401 token, 403 not granted, 404 unknown stream), so the client
gets a status and a body instead of a stream; SSE and long-poll share it all.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from auth.grants import is_pattern, valid_pattern
from auth.limits import token_key
from common.problems import Problem, invalid_parameter, not_granted, unauthorized, unknown_stream
from ingest.ids import parse_position
from ingest.schema import invalid_stream, valid_stream
from streaming.deps import StreamingServices
from streaming.subscription import Subscription, subject_key

SID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
SID_MAX = 32


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    """The parts of an HTTP subscribe request the checks read, taken out by the HTTP layer."""

    streams: list[str]
    token: str | None  # from Authorization, ?token= or the sluice_token cookie
    headers: Mapping[str, str]  # for the origin, when there is no token
    address: str | None  # the client address (after PROXY_HOPS)
    last_event_id: str | None  # Last-Event-ID, ?lastEventId= or ?cursor=
    sid: str | None  # ?sid=


@dataclass
class Checked:
    """A subscribe request that passed every check: what to send and from where."""

    streams: list[str]  # exact stream names
    resume: int | None  # resume after this position; None means "from now"
    sid: str | None  # connection id carried in from Last-Event-ID or ?sid=
    subject: str = ""  # the token's subject
    token_key: str = ""  # identifies the credential, for MAX_CONNECTIONS_PER_TOKEN
    expires_at: float = 0.0  # when the credential stops admitting (unix time; 0: never)
    jti: str | None = None  # the token's id, for revocation by jti
    issued_at: float | None = None  # the token's iat, for revocation by subject
    patterns: list[str] = field(default_factory=list)  # `room/*`: matching streams, even later
    # With patterns: may this credential subscribe to a stream a pattern matched? (The same
    # grant a direct subscribe asks; memoised per stream name by the grant.)
    admits: Callable[[str], bool] | None = None


def unpaced_key(subject: str, address: str | None) -> str:
    """What a long-poll without a `sid` is paced by: its subject and address together."""
    return subject_key("a", subject, address or "-")


def subscribe_checked(svc: StreamingServices, checked: Checked) -> tuple[Subscription, int]:
    """Register a checked subscription with the hub (both transports): what it was admitted
    with, its credential's expiry and revocation keys, and its grant for pattern matches."""
    return svc.hub.subscribe(
        checked.streams,
        svc.settings.subscriber_queue_max,
        expires_at=checked.expires_at,
        jti=checked.jti,
        subject=checked.subject,
        issued_at=checked.issued_at,
        patterns=checked.patterns,
        admits=checked.admits,
    )


def new_sid() -> str:
    return "".join(secrets.choice(SID_ALPHABET) for _ in range(10))


_SID_CHARS = frozenset(SID_ALPHABET)


def valid_sid(sid: str) -> bool:
    return 0 < len(sid) <= SID_MAX and _SID_CHARS.issuperset(sid)


def parse_last_event_id(raw: str) -> tuple[str | None, int]:
    """`sid.position` or a bare `position` (as the ingest and read APIs give it)."""
    sid, dot, _ = raw.rpartition(".")
    position = parse_position(raw)
    if dot and not valid_sid(sid):
        raise ValueError("bad connection id")
    return (sid or None), position


def sid_of(last_event_id: str | None, query_sid: str | None) -> str | None:
    """The connection id a request carries, if any and well-formed (no Problem raised)."""
    try:
        sid, _ = parse_last_event_id(last_event_id or "")
    except ValueError:
        sid = None
    sid = sid or query_sid
    return sid if sid and valid_sid(sid) else None


def check_subscribe(svc: StreamingServices, req: SubscribeRequest) -> Checked:
    """Every check a subscription needs, before anything is sent (raises a Problem; or
    OriginUnavailable / DatabaseUnavailable when the answer cannot be known now)."""
    settings = svc.settings
    streams = req.streams
    if not streams:
        raise invalid_parameter("stream", "name at least one `stream`")
    if len(streams) > settings.subscribe_max_streams:
        raise Problem(
            400,
            "too-many-streams",
            f"at most {settings.subscribe_max_streams} streams per subscription",
            field="stream",
            limit=settings.subscribe_max_streams,
        )
    streams = list(dict.fromkeys(streams))
    patterns = [s for s in streams if is_pattern(s)]
    streams = [s for s in streams if not is_pattern(s)]
    if not all(valid_stream(stream) for stream in streams):
        raise invalid_stream()
    if not all(valid_pattern(p) for p in patterns):
        raise Problem(
            400,
            "invalid-stream",
            "a pattern is a stream name with `*` for one segment or a trailing `/**` (or `**` alone)",
            field="stream",
        )
    if req.token is not None:
        principal = svc.tokens.verify(req.token)
        key = token_key(req.token)
    elif svc.authorizer is not None:  # no token: ask the origin (raises OriginUnavailable)
        principal, key = svc.authorizer.authorize(req.headers, streams + patterns, req.address)
    else:
        raise unauthorized(
            "a token is required (Authorization: Bearer <token>, ?token= or the sluice_token cookie)"
        )
    for stream in streams:
        if not principal.subscribe.allows(stream):
            raise not_granted("subscribe", stream)
    for pattern in patterns:  # decided once: every stream it may ever match is granted
        if not principal.subscribe.covers(pattern):
            raise not_granted("subscribe", pattern)
    sid, resume = None, None
    if req.last_event_id:
        try:
            sid, resume = parse_last_event_id(req.last_event_id)
        except ValueError:
            raise Problem(
                400, "invalid-last-event-id", "Last-Event-ID must be `<sid>.<position>` or a position"
            ) from None
    if req.sid and not sid:
        if not valid_sid(req.sid):
            raise invalid_parameter("sid", "bad `sid`")
        sid = req.sid
    missing = svc.hub.missing_streams(streams) if streams else set()
    if missing:
        raise unknown_stream(sorted(missing)[0])
    leeway = svc.tokens.leeway_s if req.token is not None else 0.0
    jti, iat = principal.claims.get("jti"), principal.claims.get("iat")
    return Checked(
        streams,
        resume,
        sid,
        principal.subject,
        key,
        expires_at=principal.expires_at + leeway if principal.expires_at else 0.0,
        jti=jti if isinstance(jti, str) else None,
        issued_at=float(iat) if isinstance(iat, (int, float)) else None,
        patterns=patterns,
        admits=principal.subscribe.allows if patterns else None,
    )
