"""End to end: schemathesis drives every operation of the service's own /api-doc/openapi.json.

Checks: no 5xx, and JSON answers that conform to the document (SSE bodies are not checked). To keep
it short on two cores, the test (not the document) makes each generated body cheap: at most
``MAX_TOKENS`` new tokens, strings of at most ``MAX_CHARS`` characters.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import response_schema_conformance

from tgi_zmq.frontend.app import ROUTES

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8
MAX_CHARS = 64
EXAMPLES = 10  # per operation, positive and negative mixed
TOP_LEVEL_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # OpenAI bodies


def cheap(body: Any) -> Any:
    """The body with short strings and every token limit it may carry capped (absent means "up to
    the context's end")."""
    body = _shorten(body)
    if not isinstance(body, dict):
        return body
    capped = {**body, **{name: _cap(body.get(name)) for name in TOP_LEVEL_LIMITS}}
    if "inputs" in body:  # a TGI body
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        capped["parameters"] = {**parameters, "max_new_tokens": _cap(parameters.get("max_new_tokens"))}
    return capped


def _shorten(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_CHARS]
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


def _cap(value: Any) -> Any:
    """A small limit in place of a large or absent one (a value of the wrong type stays: it is a 422)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS):
        return MAX_TOKENS
    return value


@pytest.fixture(scope="module")
def api_schema(service) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(service.url + "/api-doc/openapi.json")


@pytest.mark.parametrize(("method", "path"), [(route.method, route.path) for route in ROUTES])
def test_operation(api_schema: schemathesis.BaseSchema, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking against a live service
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        if case.body is not NOT_SET:
            case.body = cheap(case.body)
        response = case.call(timeout=120)
        checks = [not_a_server_error]
        if not any("text/event-stream" in value for value in response.headers.get("content-type", [])):
            checks.append(response_schema_conformance)
        case.validate_response(response, checks=checks)

    check()
