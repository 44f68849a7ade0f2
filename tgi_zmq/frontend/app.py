"""The aiohttp application: the route table, the error middleware, info/health, draining,
and ``main()``."""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import prometheus_client
import uvloop
from aiohttp import web
from pydantic import BaseModel

from tgi_zmq import cpus
from tgi_zmq.config import ServerConfig
from tgi_zmq.errors import RequestError
from tgi_zmq.runtime import die_with_supervisord, freeze_heap, setup_logging

from . import extra_routes, openai_routes, openapi, profile_routes, responses_routes, tgi_routes
from . import request_models as rq
from . import response_models as rs
from .auth import require_api_key
from .http import (
    BODY_MODELS,
    FRONTEND,
    RID,
    VERSION,
    Frontend,
    client_id_of,
    error_response,
    frontend,
    json_response,
    new_rid,
)
from .metrics import CONTENT_TYPE_LATEST
from .openapi import Route
from .streaming import log_failure

log = logging.getLogger("tgi_zmq.frontend")

KEEPALIVE_TIMEOUT_S = 75.0  # longer than the usual 60 s idle timeout of load balancers
CLOSE_TIMEOUT_S = 1.0  # after draining: wait for the handlers still running (then they are cancelled)
DRAIN_POLL_S = 0.1

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request its rid; turn refusals into TGI's JSON error body."""
    request[RID] = new_rid(client_id_of(request))
    try:
        return await handler(request)
    except RequestError as exc:
        log_failure(request[RID], exc)
        response = error_response(exc)
        if exc.status == 408:  # as RFC 9110 asks: the rest of the body may never come
            response.force_close()
        return response
    except web.HTTPException as exc:  # aiohttp's own: no such route (404), a wrong method (405)
        if exc.status < 400:
            raise
        return _routing_error(exc)


def _routing_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's error in TGI's shape: ``{"error": "Not Found", "error_type": "not_found"}``, its
    headers kept (405's ``Allow``)."""
    error_type = exc.reason.lower().replace(" ", "_")
    response = error_response(RequestError(exc.reason, error_type=error_type, status=exc.status))
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    client_id = client_id_of(request)
    if client_id is not None:
        response.headers["x-request-id"] = client_id


def _shutting_down() -> RequestError:
    return RequestError("the server is shutting down", error_type="unavailable", status=503)


async def health(request: web.Request) -> web.Response:
    """200 with an empty body iff every pipeline process is alive and ready and we are not draining."""
    fe = frontend(request)
    if fe.draining:
        return error_response(_shutting_down())
    if fe.health.healthy():
        return web.Response(status=200)
    return error_response(RequestError("unhealthy", error_type="healthcheck", status=503))


def _refused_when_draining(handler: Handler) -> Handler:
    """A route that sends work down the pipeline: 503 once the server drains, before the body is read."""

    async def refused_when_draining(request: web.Request) -> web.StreamResponse:
        if frontend(request).draining:
            raise _shutting_down()
        return await handler(request)

    return refused_when_draining


def _counted(handler: Handler) -> Handler:
    """A generation route: counted in ``tgi_request_count``, with any failure escaping it."""

    async def counted(request: web.Request) -> web.StreamResponse:
        with frontend(request).pipeline.metrics.request():
            return await handler(request)

    return counted


def _generation(handler: Handler) -> Handler:
    """A generation route: refused while draining, else counted in ``tgi_request_count``."""
    return _refused_when_draining(_counted(handler))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of TGI's metrics."""
    body = frontend(request).pipeline.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def loads(request: web.Request) -> web.Response:
    """SGLang's ``GET /v1/loads``, which SMG polls from an engine it does not take for vLLM or SGLang
    (``?include=`` is accepted: only the core fields are served)."""
    fe = frontend(request)
    row = fe.pipeline.metrics.load(fe.config.max_concurrent_requests)
    now = datetime.datetime.now(datetime.UTC).isoformat()
    return json_response({"timestamp": now, "dp_rank_count": 1, "loads": [row]})


async def info(request: web.Request) -> web.Response:
    c = frontend(request).config
    return json_response(
        {
            "model_id": c.served_model_name,
            "model_sha": None,
            "model_dtype": c.dtype,
            "model_device_type": c.device,
            "quantize": c.quantize,
            "kv_cache_dtype": c.kv_cache_dtype,
            "kernels": c.kernels,
            "deterministic": c.batch_invariant,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_best_of": c.max_best_of,
            "max_stop_sequences": c.max_stop_sequences,
            "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens,
            "max_batch_total_tokens": c.max_batch_total_tokens,
            "max_batch_prefill_tokens": c.max_batch_prefill_tokens,
            "validation_workers": 1,
            "max_client_batch_size": c.max_client_batch_size,
            "router": "tgi-zmq",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }
    )


async def _run_pipeline(app: web.Application) -> AsyncIterator[None]:
    fe = app[FRONTEND]
    await fe.pipeline.start()
    log.info("frontend listening on %s:%d", fe.config.hostname, fe.config.port)
    yield
    await fe.pipeline.close()


def _post(
    path: str,
    handler: Handler,
    request: type[BaseModel],
    response: type[BaseModel] | None,
    events: type[BaseModel] | None = None,
    *,
    summary: str,
    wrap: Callable[[Handler], Handler] = _generation,
) -> Route:
    return Route("POST", path, wrap(handler), summary, request, response, events, errors=openapi.WORK_ERRORS)


def _get(path: str, handler: Handler, summary: str, **fields: Any) -> Route:
    return Route("GET", path, handler, summary, **fields)


def _profile(path: str, handler: Handler, summary: str) -> Route:
    """A profiling route: no body; 404 unless the service runs with --profile-dir."""
    return Route("POST", path, handler, summary, response=rs.ProfileResponse, errors=(401, 404))


# Every route but the two of the document itself: what aiohttp serves and what the document says.
# TGI's /tokenize takes a generate body (its parameters ignored), /chat_tokenize a chat body.
ROUTES = (
    _get("/", health, "Health (as /health)", errors=(503,)),
    _get("/health", health, "200 when every process is ready", errors=(503,)),
    _get("/ping", health, "Health (SageMaker)", errors=(503,)),
    _get("/info", info, "The model and the server's limits", response=rs.Info),
    _get("/metrics", metrics, "Prometheus metrics", media="text/plain"),
    _get("/v1/models", openai_routes.models, "The model under each served name", response=rs.ModelList),
    _get("/v1/loads", loads, "The engine's load as SGLang serves it (SMG polls it)", response=rs.Loads),
    _post("/", tgi_routes.compat_generate, rq.GenerateBody, rs.CompatGenerateResponse, rs.StreamResponse,
          summary="Generate: a JSON array, or SSE with `stream`"),
    _post("/generate", tgi_routes.generate, rq.GenerateBody, rs.GenerateResponse, rs.StreamResponse,
          summary="Generate (SSE with `stream`)"),
    _post("/generate_stream", tgi_routes.generate_stream, rq.GenerateBody, None, rs.StreamResponse,
          summary="Generate, as SSE"),
    _post("/tokenize", tgi_routes.tokenize, rq.GenerateBody, rs.TokenizeResponse,
          summary="A prompt's tokens", wrap=_refused_when_draining),
    _post("/chat_tokenize", extra_routes.chat_tokenize, rq.ChatRequest, rs.ChatTokenizeResponse,
          summary="The chat template's prompt and its tokens", wrap=_refused_when_draining),
    _post("/v1/chat/completions", openai_routes.chat_completions, rq.ChatRequest, rs.ChatCompletion,
          rs.ChatCompletionChunk, summary="Chat"),
    _post("/v1/completions", openai_routes.completions, rq.CompletionRequest, rs.Completion, rs.Completion,
          summary="Completions"),
    _post("/v1/responses", responses_routes.responses, rq.ResponsesRequest, rs.ResponseObject,
          rs.ResponseStreamEvent, summary="Responses (text, function tools)"),
    _post("/invocations", extra_routes.invocations, rq.InvocationsRequest, rs.InvocationsResponse,
          rs.StreamResponse, summary="SageMaker: a POST /, chat or completion body"),
    _profile("/start_profile", profile_routes.start_profile,
             "Start torch.profiler on every worker (needs --profile-dir)"),
    _profile("/stop_profile", profile_routes.stop_profile,
             "Stop torch.profiler; each worker writes its trace into --profile-dir"),
)  # fmt: skip


def create_app(config: ServerConfig) -> web.Application:
    """The application; its pipeline sockets open on startup and close on cleanup."""
    middlewares = [_errors] + ([require_api_key(config.api_key)] if config.api_key else [])
    app = web.Application(middlewares=middlewares, client_max_size=config.payload_limit)
    app[FRONTEND] = Frontend.create(config)
    app[BODY_MODELS] = openapi.body_models(ROUTES)
    app.cleanup_ctx.append(_run_pipeline)
    app.on_response_prepare.append(_echo_request_id)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get(openapi.DOCUMENT_PATH, openapi.document_handler(ROUTES, VERSION))
    app.router.add_get(openapi.DOCS_PATH, openapi.docs)
    return app


def main() -> None:
    """Entry point of the frontend process (config from ``$TGI_ZMQ_RUNTIME_DIR``)."""
    setup_logging("frontend")
    die_with_supervisord()
    prometheus_client.disable_created_metrics()  # TGI exposes no *_created series
    config = ServerConfig.load()
    cpus.apply("frontend", config.local_ranks)
    uvloop.run(serve(config))


async def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, drain, then close the listener, the connections and the pipeline."""
    app = create_app(config)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        access_log=None,
        shutdown_timeout=CLOSE_TIMEOUT_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.hostname, config.port).start()
        freeze_heap()
        await _signalled()
        await drain(app[FRONTEND])
    finally:
        await runner.cleanup()


async def _signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def drain(fe: Frontend) -> None:
    """Refuse new work (503) with the listener still open, so that a load balancer sees /health fail
    instead of connections refused, until the requests in flight finish or ``--shutdown-timeout``."""
    fe.draining = True
    timeout = fe.config.shutdown_timeout
    log.info("draining: %d requests in flight, waiting up to %g s", fe.admission.in_flight, timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while fe.admission.in_flight and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if fe.admission.in_flight:
        log.warning("drain timed out: cancelling %d requests in flight", fe.admission.in_flight)
    else:
        log.info("drained: no request in flight, stopping")
