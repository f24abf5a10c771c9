"""Token verification and grant patterns (single-use tokens against a real Redis)."""

import time
import uuid

import jwt
import pytest
import redis

from auth.grants import Grants, pattern_to_regex
from auth.tokens import TokenVerifier, mint
from common.problems import Problem


@pytest.mark.parametrize(
    "pattern, stream, allowed",
    [
        ("client/1", "client/1", True),
        ("client/1", "client/10", False),
        ("client/*", "client/1", True),
        ("client/*", "client/1/x", False),
        ("client/*", "client", False),
        ("a/**", "a/b/c", True),
        ("a/**", "a", False),
        ("a/**", "ab/c", False),
        ("**", "anything/at/all", True),
        ("a.b", "axb", False),
        ("mail/*-x", "mail/user-x", True),
        ("*:1", "acct:1", True),
    ],
)
def test_patterns(pattern, stream, allowed):
    assert Grants([pattern]).allows(stream) is allowed


def test_pattern_regexes_are_anchored_and_escaped():
    assert pattern_to_regex("a.b/*") == "^a\\.b/[^/]*$"
    assert pattern_to_regex("*/x") == "^[A-Za-z0-9][^/]*/x$"  # native names only
    with pytest.raises(ValueError):
        pattern_to_regex("a/**/b")


def test_grants_sql_filter():
    assert Grants(["**"]).sql_filter() is None
    assert Grants([]).sql_filter() == []


def test_rotation_by_kid_and_without_kid():
    v = TokenVerifier({"old": "secret-old-0123456789abcdef01234", "new": "secret-new-0123456789abcdef01234"})
    assert v.verify(mint("secret-old-0123456789abcdef01234", "a", kid="old")).subject == "a"
    assert v.verify(mint("secret-new-0123456789abcdef01234", "b")).subject == "b"
    with pytest.raises(Problem) as info:
        v.verify(mint("secret-new-0123456789abcdef01234", "c", kid="old"))
    assert info.value.status == 401


def test_cached_token_still_expires():
    key = "k" * 32
    v = TokenVerifier({"k": key}, leeway_s=0)
    tok = jwt.encode({"sub": "a", "exp": time.time() + 1}, key, algorithm="HS256")
    assert v.verify(tok).subject == "a"
    time.sleep(1.2)
    with pytest.raises(Problem) as info:
        v.verify(tok)  # served from the cache, yet refused once expired
    assert info.value.status == 401


def test_single_use_tokens_are_spent_in_redis(redis_url):
    key = "k" * 32
    client = redis.Redis.from_url(redis_url)
    first = TokenVerifier({"k": key}, redis=client)
    second = TokenVerifier({"k": key}, redis=client)  # another process, same Redis
    tok = mint(key, "a", once=True, jti=str(uuid.uuid4()))
    assert first.verify(tok).subject == "a"
    with pytest.raises(Problem) as info:
        second.verify(tok)
    assert info.value.status == 401 and "already used" in info.value.detail
    with pytest.raises(Problem):
        first.verify(mint(key, "a", once=True))  # no jti: cannot be single-use


def test_single_use_without_redis_is_unavailable():
    key = "k" * 32
    v = TokenVerifier({"k": key}, redis=redis.Redis(port=1, socket_connect_timeout=0.5))
    with pytest.raises(Problem) as info:
        v.verify(mint(key, "a", once=True, jti="x"))
    assert info.value.status == 503
