"""Each attack class of SECURITY.md's table against a real server (or the matcher itself): the
request that froze, crashed or fooled the landed server, and what it gets now."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth.grants import MAX_WILDCARDS, Grants, PatternIndex, pattern_covers, valid_pattern
from mercure.selectors import MAX_EXPRESSIONS, Selectors, TemplateTooComplex, compile_template
from tests.helpers import EVENTS, SSE, HealthProbe, auth, token
from tests.sse import Stream

HUB = "/.well-known/mercure"
MATCH_BUDGET_S = 0.05  # one match, whatever the input; backtracking took seconds to hours
HEALTHZ_BUDGET_S = 0.25  # API.md: /healthz answers within 250 ms while any request runs


# -- 1. linear-time matching ------------------------------------------------------------------

def _timed(fn, *args) -> float:
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


_OPS = st.sampled_from(["", "+", "#", ".", "/", ";", "?", "&"])
_TEMPLATE = st.lists(st.tuples(st.text("a/?&=.,;#", max_size=3), _OPS),
                     min_size=1, max_size=MAX_EXPRESSIONS).map(
    lambda parts: "".join(f"{lit}{{{op}a}}" for lit, op in parts) + "?")
_TOPIC = st.builds(lambda ch, n, tail: ch * n + tail, st.sampled_from("a/?&=.,;#"),
                   st.integers(500, 4000), st.text("ab/?", max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEMPLATE, _TOPIC)
def test_hostile_uri_templates_match_any_topic_within_a_fixed_budget(template, topic):
    matcher = Selectors()
    assert _timed(matcher.matches, template, topic) < MATCH_BUDGET_S


_PATTERN = st.builds(lambda ps, tail: "user/42/" + "".join(ps) + tail,
                     st.lists(st.sampled_from(["*a", "a*a", "*b", "*ab"]), min_size=1,
                              max_size=MAX_WILDCARDS - 1), st.sampled_from(["", "*", "b"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_PATTERN, st.integers(100, 190))
def test_hostile_stream_patterns_match_any_name_within_a_fixed_budget(pattern, n):
    assert valid_pattern(pattern)
    stream = "user/42/" + "a" * n
    index = PatternIndex()
    index.add(pattern)
    assert _timed(index.matching, stream) < MATCH_BUDGET_S
    assert _timed(Grants([pattern]).allows, stream) < MATCH_BUDGET_S
    assert _timed(pattern_covers, "user/42/" + "a*" * 3, pattern) < MATCH_BUDGET_S


def test_what_was_slow_is_refused_or_instant():
    # 25: twelve `{+a}` took 45 s for one match; past MAX_EXPRESSIONS a selector is refused.
    with pytest.raises(TemplateTooComplex):
        compile_template("{+a}" * (MAX_EXPRESSIONS + 1) + "?")
    assert Selectors().matches("{+a}" * (MAX_EXPRESSIONS + 1), "x") is False  # a claim: itself
    regex = compile_template("{+a}" * MAX_EXPRESSIONS + "?")
    assert regex is not None and regex.fullmatch("a" * 2000) is None
    assert valid_pattern("user/42/" + "*a" * MAX_WILDCARDS) is True
    assert valid_pattern("user/42/" + "*a" * (MAX_WILDCARDS + 1) + "b") is False
    assert Grants(["user/42/" + "*a" * MAX_WILDCARDS + "b"]).allows("user/42/" + "a" * 190) is False


def test_a_new_stream_is_tested_only_against_patterns_that_can_match_it():
    index = PatternIndex()
    for n in range(50):
        index.add(f"room/{n}/*")
    index.add("*/lobby")
    assert index.candidates("room/7/x") == 2  # `room/7/*` and `*/lobby`, not all 51
    assert index.matching("room/7/x") == ("room/7/*",)
    assert index.matching("hall/lobby") == ("*/lobby",)


def test_selectors_past_the_bounds_are_refused_before_the_first_byte(make_server, database_url):
    server = make_server(database_url, MERCURE_ANONYMOUS="1",
                         MERCURE_PUBLISHER_JWT_KEY="p" * 40, MERCURE_SUBSCRIBER_JWT_KEY="s" * 40)
    too_many = "{+a}" * (MAX_EXPRESSIONS + 1) + "?"
    r = server.get(HUB, params={"topic": too_many}, stream=True)
    assert r.status_code == 400 and r.json()["field"] == "topic"
    r = server.get(SSE, params={"stream": "user/" + "*a" * (MAX_WILDCARDS + 1)}, headers=auth())
    assert r.status_code == 400 and r.json()["field"] == "stream"


def test_the_freezing_attacks_leave_healthz_answering(make_server, database_url):
    """The 45-character selector and the `*a*a…b` pattern, at their allowed maximum, subscribed
    and then matched by publishes with long names, while /healthz is asked every 20 ms."""
    import jwt

    pub_key = "p" * 40
    server = make_server(database_url, MERCURE_ANONYMOUS="1", MERCURE_PUBLISHER_JWT_KEY=pub_key,
                         MERCURE_SUBSCRIBER_JWT_KEY="s" * 40)
    publisher = jwt.encode({"mercure": {"publish": ["*"]}}, pub_key, algorithm="HS256")
    selector = Stream(server.url + HUB, params={"topic": "{+a}" * MAX_EXPRESSIONS + "?"})
    pattern = "user/42/" + "*a" * (MAX_WILDCARDS - 1) + "*b"
    native = Stream(server.url + SSE, params={"stream": pattern},
                    headers={"Authorization": f"Bearer {token('u', subscribe=['user/42/**'])}"})
    try:
        assert selector.response.status_code == 200 and native.response.status_code == 200
        with HealthProbe(server) as probe:
            for n in range(5):
                r = server.post(HUB, data={"topic": "a" * (1000 + n), "data": "x"},
                                headers={"Authorization": f"Bearer {publisher}"})
                assert r.status_code == 200, r.text
                r = server.post(EVENTS, json={"stream": "user/42/" + "a" * (180 + n),
                                              "data": n}, headers=auth())
                assert r.status_code == 201, r.text
            time.sleep(0.5)  # the probe keeps asking while the fan-out runs
    finally:
        selector.close()
        native.close()
    assert probe.answers > 0
    assert probe.worst < HEALTHZ_BUDGET_S, probe.worst


# -- 7. a pattern delivers only what a direct subscribe admits --------------------------------

def test_a_pattern_delivers_only_streams_the_grant_admits_live_and_from_history(server):
    reader = {"Authorization": f"Bearer {token('u', subscribe=['user/42/**'])}"}
    assert server.get(SSE, params={"stream": "user/42/"}, headers=reader).status_code in (403, 404)

    def post(stream, n):
        r = server.post(EVENTS, json={"stream": stream, "data": n}, headers=auth())
        assert r.status_code == 201, r.text

    post("user/42/", 0)  # matched by `user/42/*` (an empty segment), not granted by the token
    post("user/42/x", 1)
    assert server.get(SSE, params={"stream": "user/42/", "timeout": "0"},
                      headers=reader).status_code == 403
    sse = Stream(server.url + SSE, headers=reader, params={"stream": "user/42/*",
                                                            "lastEventId": "0"})
    try:
        assert sse.response.status_code == 200
        got = sse.events(1)
        post("user/42/", 2)
        post("user/42/y", 3)
        got += sse.events(1)
        polled = server.get("/api/v1/poll", params={"stream": "user/42/*", "cursor": "0",
                                                    "timeout": "0"}, headers=reader).json()
    finally:
        sse.close()
    assert [e[2] for e in got] == ["1", "3"]
    assert [e["data"] for e in polled["events"]] == [1, 3]
