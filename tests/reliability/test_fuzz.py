"""Fuzzing: schemathesis generates requests from the app's own OpenAPI schema (every operation,
bodies, path and query parameters) and sends them, with a valid API key, to the app in process
(ASGI, no network): schema-valid requests, and requests that break the schema somewhere (a
wrong type, a missing field, bytes that are not JSON). Each response must not be a 5xx and must
match the schema: a documented status code, the documented content type, headers and body.

The number of examples per operation is bounded (``KT_TEST_FUZZ_EXAMPLES``, default 40) so the
whole run stays well under a minute on a small machine; hypothesis derandomized, so a failure
reproduces. A run sends about 1,500 requests and checks that every operation was reached.

What it found, and was fixed: a huge ``offset`` on the listings (an integer overflow in the
database driver: 500; now 422), and a schema that did not say what the API answers (422 bodies
are ``{"detail": "<message>", "errors": [...]}``, not FastAPI's list; 401 and 429 on every
authenticated route; 400 for a body that cannot be parsed) - see ``service.api.openapi``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import ignored_auth, negative_data_rejection, positive_data_acceptance

from service.admin import create_tenant_key
from service.app import create_app
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings

EXAMPLES = int(os.environ.get("KT_TEST_FUZZ_EXAMPLES", "40"))
SENT: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    data_dir.mkdir()
    # no rate limits here: the fuzzer sends far more than a client should, as fast as it can, and
    # checks every operation with bad credentials (which must answer 401, not the failures' 429)
    app_settings = Settings(data_dir=data_dir, rate_limit_per_min=0, auth_failures_per_min=0)  # type: ignore[call-arg]
    init_db(app_settings.database_url)
    engine = make_engine(app_settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            key = create_tenant_key(session, "fuzz")
    finally:
        engine.dispose()
    app = create_app(app_settings, migrate=False)
    yield app, key
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzz_app: tuple[Any, str]) -> Any:
    app, _ = fuzz_app
    return schemathesis.openapi.from_asgi("/v1/openapi.json", app)


@pytest.fixture(scope="module")
def api_key(fuzz_app: tuple[Any, str]) -> str:
    return fuzz_app[1]


def fuzz_operation(
    operation: Any, mode: GenerationMode, headers: dict[str, str], failures: dict[str, str]
) -> None:
    """Send up to ``EXAMPLES`` generated requests (``mode``: schema-valid, or each breaking the schema
    somewhere) to ``operation``; record its first failure in ``failures`` (unshrunk, to keep the run
    short) and count the requests in ``SENT``."""
    label = f"{mode.value} {operation.method.upper()} {operation.path}"
    SENT[label] = 0
    # Every default check (no 5xx; documented status code, content type, headers and body; a
    # schema-breaking request refused with a 4xx) except:
    # - "schema-valid data is accepted": a valid JSON shape may still name an unknown dataset (404)
    #   or carry a file that is no zip (400);
    # - on schema-breaking requests, "refused with a 4xx" and "auth is enforced": the valid key is
    #   put back on every request, so a case whose only flaw was a missing or broken Authorization
    #   header is a valid request (and an unknown query parameter is ignored, as HTTP APIs do).
    excluded = [positive_data_acceptance]
    if mode is GenerationMode.NEGATIVE:
        excluded += [negative_data_rejection, ignored_auth]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        if label in failures:
            return
        SENT[label] += 1
        try:
            response = case.call_and_validate(headers=headers, excluded_checks=excluded)
        except (Exception, FailureGroup) as err:  # a failed check: keep the first
            failures[label] = f"{type(err).__name__}: {str(err)[:2000]}"
            return
        if response.status_code >= 500:
            failures[label] = f"{response.status_code}: {response.text[:500]}"

    if mode is GenerationMode.NEGATIVE:
        # an operation without parameters or body has nothing to break
        with contextlib.suppress(Unsatisfiable):
            fuzz()
    else:
        fuzz()


def test_api_conforms_to_its_schema(api_schema: Any, api_key: str) -> None:
    """Every operation, schema-valid and schema-breaking requests; fails listing each failing one."""
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20, [f"{op.method} {op.path}" for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, {"Authorization": f"Bearer {api_key}"}, failures)
    assert not failures, f"{len(failures)} of {len(SENT)} operation x mode failed:\n\n" + "\n\n".join(
        f"{label}\n{why}" for label, why in failures.items()
    )
    # every operation was called (guards against a silently empty run); those with parameters or a
    # body many times (one without has a single distinct request)
    positive = {label: n for label, n in SENT.items() if label.startswith("positive")}
    assert len(positive) == len(operations) and all(n >= 1 for n in positive.values()), SENT
    assert sum(n >= min(10, EXAMPLES) for n in positive.values()) >= 15, SENT
    print(f"fuzz: {sum(SENT.values())} requests over {len(operations)} operations, 0 failures")


def test_schema_documents_auth_rate_limit_and_error_bodies(fuzz_app: tuple[Any, str]) -> None:
    app, _ = fuzz_app
    spec = app.openapi()
    operations = [
        (path, op) for path, ops in spec["paths"].items() if path.startswith("/v1/") for op in ops.values()
    ]
    assert len(operations) >= 20
    for path, op in operations:
        responses = op["responses"]
        assert {"401", "429"} <= set(responses), path
        assert "Retry-After" in responses["429"]["headers"], path
        assert op["security"], path
        for code, response in responses.items():
            if code[0] in "45":
                schema_ref = response["content"]["application/json"]["schema"]["$ref"]
                assert schema_ref.endswith("/HTTPValidationError" if code == "422" else "/ErrorDetail"), (
                    path,
                    code,
                )
    assert spec["components"]["schemas"]["HTTPValidationError"]["properties"]["detail"]["type"] == "string"


def test_an_unparsable_body_is_a_400_that_says_what_to_send(fuzz_app: tuple[Any, str]) -> None:
    app, key = fuzz_app
    with TestClient(app) as client:
        response = client.post(
            "/v1/jobs",
            content=b"\xff\xfe\x00",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert "send UTF-8 JSON" in response.json()["detail"]
