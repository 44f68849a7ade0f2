"""The OpenAPI 3.1 document (``GET /api-doc/openapi.json``) and its Swagger UI page (``GET /docs``),
built from the app's route table and the models of ``request_models`` and ``response_models``."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import response_models

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DOCUMENT_PATH = "/api-doc/openapi.json"
DOCS_PATH = "/docs"
_REF = "#/components/schemas/{model}"
# Referenced by the error responses, or only named in the SSE descriptions.
_EXTRA_MODELS = (
    response_models.ErrorResponse,
    response_models.StreamResponse,
    response_models.ChatCompletionChunk,
    response_models.ResponseStreamEvent,
)

ERRORS = {
    400: "The body is not JSON (or is nested deeper than 128 levels)",
    401: "Missing or wrong API key (only with --api-key)",
    404: "Profiling is off (the service runs without --profile-dir)",
    408: "The body did not arrive within --body-timeout",
    413: "The body is over --payload-limit",
    415: "The body is not sent as `Content-Type: application/json`",
    422: "Input validation error (or template_error, tool_error...)",
    424: "Request failed during generation",
    429: "Model is overloaded",
    503: "The server is shutting down, or the pipeline is unhealthy",
}
WORK_ERRORS = (400, 401, 408, 413, 415, 422, 424, 429, 503)  # a route that sends work down the pipeline


@dataclasses.dataclass(frozen=True)
class Route:
    """One route of the app: what aiohttp registers and what the document says of it."""

    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None  # the JSON body, checked before the handler runs
    response: type[BaseModel] | None = None  # the 200 JSON body
    events: type[BaseModel] | None = None  # each SSE ``data:``, when the route streams
    media: str | None = None  # the media type of a 200 body that is not JSON
    errors: tuple[int, ...] = ()  # statuses answered with an ErrorResponse


def body_models(routes: Sequence[Route]) -> dict[str, type[BaseModel]]:
    """``http.BODY_MODELS``: each POST path's request model."""
    return {r.path: r.request for r in routes if r.method == "POST" and r.request is not None}


@functools.cache
def document(routes: tuple[Route, ...], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (built once)."""
    pairs = {(r.request, "validation") for r in routes if r.request}
    pairs |= {(m, "serialization") for r in routes for m in (r.response, r.events) if m}
    pairs |= {(m, "serialization") for m in _EXTRA_MODELS}
    refs, defs = models_json_schema(sorted(pairs, key=lambda p: p[0].__name__), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tgi-zmq",
            "version": version,
            "description": "A Text Generation Inference compatible server. With --api-key, every route "
            "but /health, /ping, /metrics, GET / and this document needs `Authorization: Bearer <key>`.",
        },
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def _operation(route: Route, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "tags": [_tag(route.path)],
        "responses": _responses(route, refs),
    }
    if route.request is not None:
        schema = refs[(route.request, "validation")]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return op


def _tag(path: str) -> str:
    if path.endswith("_profile"):
        return "Profiling"
    return (
        "OpenAI" if path.startswith("/v1/") else "SageMaker" if path in ("/invocations", "/ping") else "TGI"
    )


def _operation_id(route: Route) -> str:
    name = route.path.strip("/").replace("/", "_").replace("-", "_").replace(".", "_") or "root"
    return f"{route.method.lower()}_{name}"


def _responses(route: Route, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if route.response is not None:
        content["application/json"] = {"schema": refs[(route.response, "serialization")]}
    if route.events is not None:
        name = route.events.__name__
        description = f"Server-Sent Events; each `data:` is a {name} (#/components/schemas/{name})"
        content["text/event-stream"] = {"schema": {"type": "string", "description": description}}
    if route.media is not None:
        content[route.media] = {"schema": {"type": "string"}}
    ok: dict[str, Any] = {"description": "OK"}
    if content:
        ok["content"] = content
    error = {"application/json": {"schema": refs[(response_models.ErrorResponse, "serialization")]}}
    return {"200": ok} | {str(s): {"description": ERRORS[s], "content": error} for s in route.errors}


def document_handler(routes: Sequence[Route], version: str) -> Handler:
    """``GET /api-doc/openapi.json``."""
    frozen = tuple(routes)

    async def openapi_json(request: web.Request) -> web.Response:
        text = json.dumps(document(frozen, version), separators=(",", ":"))
        return web.Response(text=text, content_type="application/json")

    return openapi_json


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>tgi-zmq API</title>
  <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "api-doc/openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""


async def docs(request: web.Request) -> web.Response:
    """``GET /docs``: Swagger UI (loaded from a CDN) over the document."""
    return web.Response(text=_DOCS_PAGE, content_type="text/html")
