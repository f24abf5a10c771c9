"""Schemathesis against the served `/openapi.json`: generated requests (valid and invalid) to
every operation of a real server find no 5xx and no answer the document does not describe.

Bounded: FUZZ_EXAMPLES examples per operation (hypothesis, no shrinking database), so the whole
module runs in well under a minute. A failure prints the request that caused it. Both
schema-valid and schema-invalid requests are generated; invalid ones must be refused with a 4xx.
The one schemathesis check left out is `positive_data_acceptance`: the API has rules a schema
cannot state (an `Idempotency-Key` header applies to a single event; `data` has a size limit;
token grants), so a schema-valid request can rightly be refused with 400, 403 or 413.
"""

import collections
import itertools
import os

import jwt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.helpers import auth

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
MERCURE_PUB_KEY = "fuzz-mercure-publisher-0123456789abcdef0123"  # the Mercure door is on
MERCURE_SUB_KEY = "fuzz-mercure-subscriber-0123456789abcdef012"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, pg_admin_url, redis_url):
    from tests.helpers import SluiceServer, fresh_database, server_env

    tmp = tmp_path_factory.mktemp("fuzz")
    # Short holds so a generated long-poll answers quickly; small pages keep reads cheap.
    server = SluiceServer(
        server_env(
            fresh_database(pg_admin_url),
            redis_url,
            tmp / "data",
            LONGPOLL_MAX_S="0.2",
            INGEST_COMMIT_TIMEOUT_S="5",
            MERCURE_PUBLISHER_JWT_KEY=MERCURE_PUB_KEY,
            MERCURE_SUBSCRIBER_JWT_KEY=MERCURE_SUB_KEY,
        ),
        tmp / "server.log",
    ).start()
    # A few streams exist, so generated names sometimes hit one.
    for name in ("a", "a/1", "b"):
        server.put(f"/api/v1/streams/{name}", headers=auth())
    yield server
    server.stop()


def operations(base_url: str):
    import schemathesis

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    return schema, [result.ok() for result in schema.get_all_operations()]


def has_inputs(op) -> bool:
    return any(len(group) for group in (op.query, op.headers, op.path_parameters, op.body))


def headers_for(path: str) -> dict[str, str]:
    if path == "/.well-known/mercure":
        # Signed with the publisher key: publishing is fuzzed for real, and a subscription is
        # refused at once (401, the subscriber key differs) instead of held open.
        publisher = jwt.encode({"mercure": {"publish": ["*"]}}, MERCURE_PUB_KEY, algorithm="HS256")
        return {"Authorization": f"Bearer {publisher}"}
    if path == "/api/v1/stats":
        # A stream that never ends: fuzz its refusal path (a token that does not verify).
        return {"Authorization": "Bearer not-a-token"}
    if path in ("/api/v1/sse", "/api/v1/poll"):
        # May publish but subscribe to nothing: every SSE or poll request is answered
        # (400/401/403/404) at once instead of holding a stream or a poll open for the fuzzer
        # (a pattern matching nothing yet is a valid subscription that waits).
        return auth(publish=("**",), subscribe=())
    return auth()


def test_every_operation_answers_as_documented_and_never_5xx(fuzz_server):
    schema, ops = operations(fuzz_server.url)
    labels = sorted(op.label for op in ops)
    assert "POST /api/v1/events" in labels and "GET /api/v1/sse" in labels  # the whole API
    assert "POST /.well-known/mercure" in labels and "GET /.well-known/mercure" in labels
    failures: list[str] = []
    sent: collections.Counter = collections.Counter()
    from schemathesis import GenerationMode

    for op, mode in itertools.product(ops, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        if mode is GenerationMode.NEGATIVE and not has_inputs(op):
            continue  # nothing to make invalid

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case):  # run at once below, within this iteration: `op` and `mode` are its
            sent[mode.value] += 1  # noqa: B023
            response = case.call(
                base_url=fuzz_server.url,
                headers=headers_for(op.path),  # noqa: B023
                timeout=10,
            )
            assert response.status_code < 500, (
                f"{response.status_code} for {case.method} {case.formatted_path} "
                f"{case.query} {case.body!r}: {response.text[:300]}"
            )
            case.validate_response(
                response,
                headers=headers_for(op.path),  # noqa: B023
                excluded_checks=[positive_data_acceptance],
            )

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - collect every operation's first failure
            failures.append(f"{op.label} ({mode.value}): {str(exc)[:2000]}")
    assert failures == [], "\n\n".join(failures)
    assert sent["positive"] > 5 * len(ops) and sent["negative"] > 5 * len(ops), sent
    assert "Traceback" not in fuzz_server.log()
