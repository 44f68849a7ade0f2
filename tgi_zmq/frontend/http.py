"""HTTP plumbing: the process's shared state (``Frontend``), what a handler reads off its request, JSON
bodies in and out, TGI error bodies, Server-Sent Events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from importlib import metadata
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from tgi_zmq.config import ServerConfig
from tgi_zmq.errors import RequestError, ValidationError

from .health import Health, expected_processes, remote_processes
from .jobs import Admission
from .pipeline import Pipeline
from .request_models import check_body

try:
    VERSION = metadata.version("tgi-zmq")
except metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"


@dataclasses.dataclass
class Frontend:
    """The process's shared state, which every handler reaches with ``frontend(request)``."""

    config: ServerConfig
    health: Health
    pipeline: Pipeline
    admission: Admission
    draining: bool = False  # set on SIGTERM: /health and new work get 503 until the process exits

    @classmethod
    def create(cls, config: ServerConfig) -> Frontend:
        health = Health(expected_processes(config), remote=remote_processes(config))
        return cls(config, health, Pipeline(config, health), Admission(config.max_concurrent_requests))

    @property
    def compute_type(self) -> str:
        return "cpu" if self.config.device == "cpu" else "gpu+optimized"

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: this server's version and backend."""
        return f"{VERSION}-native"


FRONTEND: web.AppKey[Frontend] = web.AppKey("frontend")
RID: web.RequestKey[str] = web.RequestKey("rid")  # the request's internal id (``rid_of``)
BODY_MODELS: web.AppKey[dict[str, type[BaseModel]]] = web.AppKey("body_models")  # path -> request model
# The request's checked body: a handler may hand the request on to another (``/invocations``).
_BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("json_body")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def frontend(request: web.Request) -> Frontend:
    """The process's shared state."""
    return request.app[FRONTEND]


def rid_of(request: web.Request) -> str:
    """The request's internal id (unique, set by the app's middleware)."""
    return request[RID]


def client_id_of(request: web.Request) -> str | None:
    """The client's own ``x-request-id`` (echoed back in the response)."""
    return request.headers.get("x-request-id")


_UNSAFE_IN_RID = re.compile(r"[^A-Za-z0-9._:-]")
CLIENT_ID_CHARS = 64  # of the client's id kept in the rid


def new_rid(client_id: str | None) -> str:
    """A request's id on the wire and in every process's log: the client's ``x-request-id`` (its
    safe characters, at most 64) when it sent one, then a unique suffix, since clients reuse ids."""
    unique = uuid.uuid4().hex
    if not client_id:
        return unique
    return f"{_UNSAFE_IN_RID.sub('_', client_id[:CLIENT_ID_CHARS])}-{unique[:12]}"


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 text kept as is (like serde_json)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(exc: RequestError) -> web.Response:
    """TGI's error body ``{"error", "error_type"}`` with the error's status."""
    return json_response({"error": exc.error, "error_type": exc.error_type}, status=exc.status)


MAX_DEPTH = 128  # serde_json's recursion limit: TGI cannot parse a body nested deeper


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 415 unless sent as JSON, 413 over the payload limit, 408 if it
    takes longer than ``--body-timeout`` to arrive, 400 if not JSON (or nested too deep), 422 if not
    an object, if a string in it is no text (``_check_values``) or if not of the route's request
    model (``BODY_MODELS``). Read once: later calls return the same dict."""
    if _BODY not in request:
        _check_content_type(request)
        body = await _read_object(request)
        _check_values(body)
        model = request.app.get(BODY_MODELS, {}).get(request.path)
        if model is not None:
            check_body(model, body)
        request[_BODY] = body
    return request[_BODY]


async def _read_object(request: web.Request) -> dict[str, Any]:
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    timeout = frontend(request).config.body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, limit) from None
    except TimeoutError:
        raise RequestError(
            f"Request body not received within {timeout:g} s", error_type="request_timeout", status=408
        ) from None
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unparsable(str(exc)) from None
    except RecursionError:
        raise _unparsable(f"nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def _check_content_type(request: web.Request) -> None:
    """TGI's (axum's) rule: a JSON body comes as ``application/json`` or ``application/<name>+json``
    (parameters such as ``charset`` allowed)."""
    kind = request.content_type  # lower case, no parameters; application/octet-stream when missing
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise RequestError(
            "Expected request with `Content-Type: application/json`",
            error_type="unsupported_media_type",
            status=415,
        )


def _check_values(body: dict[str, Any]) -> None:
    """Refuse what JSON parses but no request can carry, before any handler sees it: a string or a key
    that is no text (``"\\ud800"``, a lone surrogate escape: msgpack, the tokenizer and the response
    cannot encode it), a 422 that says where; nesting deeper than ``MAX_DEPTH``, a 400 as in TGI."""
    stack: list[tuple[tuple[str | int, ...], dict[str, Any] | list[Any]]] = [((), body)]
    while stack:
        path, value = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise _unparsable(f"nested deeper than {MAX_DEPTH} levels")
        for step, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(step, str) and not _is_text(step):
                where = f"`{_dotted(path)}`" if path else "the body"
                raise ValidationError(f"a key in {where} {_NOT_TEXT}")
            if isinstance(item, str) and not _is_text(item):
                raise ValidationError(f"`{_dotted((*path, step))}` {_NOT_TEXT}")
            if isinstance(item, dict | list):
                stack.append(((*path, step), item))


_NOT_TEXT = "is not valid Unicode text: it holds a lone surrogate (\\ud800 to \\udfff)"


def _is_text(value: str) -> bool:
    """Whether UTF-8 can encode ``value``."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _dotted(path: tuple[str | int, ...]) -> str:
    """A place in the body as ``a.b[0].c``."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).removeprefix(".")


def _unparsable(reason: str) -> RequestError:
    return RequestError(
        f"Failed to parse the request body as JSON: {reason}", error_type="bad_request", status=400
    )


def _too_large(size: int | None, limit: int) -> RequestError:
    given = "" if size is None else f" Given: {size} bytes"
    return RequestError(
        f"Payload too large: the limit is {limit} bytes.{given}", error_type="payload_too_large", status=413
    )


@dataclasses.dataclass(frozen=True)
class NamedEvent:
    """An SSE event with an ``event:`` line (the Responses API's typed events)."""

    name: str
    data: Any


class Sse:
    """A ``text/event-stream`` response: ``data: <json>\\n\\n`` events and ``:`` keep-alive comments."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {})})

    async def open(self) -> Sse:
        await self.response.prepare(self.request)
        return self

    async def send(self, *events: Any) -> None:
        """Write events (JSON-able payloads, ``NamedEvent``s or ``"[DONE]"``) in one write."""
        if events:
            await self.response.write("".join(map(_frame, events)).encode())

    async def keep_alive(self) -> None:
        await self.response.write(b":\n\n")


def _frame(event: Any) -> str:
    if isinstance(event, NamedEvent):
        return f"event: {event.name}\ndata: {dumps(event.data)}\n\n"
    return f"data: {event if isinstance(event, str) else dumps(event)}\n\n"
