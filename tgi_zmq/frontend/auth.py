"""``--api-key``: every route but the health checks, the metrics and the API's document needs
``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from tgi_zmq.errors import RequestError

from .openapi import DOCS_PATH, DOCUMENT_PATH

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# and GET /, the health alias; the API's document is open, like TGI's
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", DOCUMENT_PATH, DOCS_PATH})


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <api_key>`` (the scheme in any case)."""
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    # surrogateescape keeps undecodable header bytes distinct instead of failing on them
    given = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, api_key.encode())


def is_open(request: web.Request) -> bool:
    """The routes a load balancer or a scraper calls without a key."""
    return request.path in OPEN_PATHS or (request.path == "/" and request.method in ("GET", "HEAD"))


def require_api_key(api_key: str) -> Middleware:
    """A middleware that answers 401 before the handler runs (so before any body is read)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_open(request) and not authorized(request.headers.get("Authorization"), api_key):
            raise RequestError("Unauthorized", error_type="unauthorized", status=401)
        return await handler(request)

    return check
