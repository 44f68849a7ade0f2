"""Answering a job group: its deltas streamed to the client as Server-Sent Events, or collected
into one response."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tgi_zmq.errors import RequestError
from tgi_zmq.messages import GenerateRequest, RequestDelta

from .http import Sse, frontend, rid_of
from .jobs import Job, JobGroup, submit

log = logging.getLogger("tgi_zmq.frontend")

# Wait this long for the first output before sending headers, so that errors found by the
# tokenizer (prompt too long...) still get a real status instead of an in-stream error event; a
# request with a grammar waits for its compile too (rank 0 refuses it with a 422: header_wait).
HEADER_WAIT_S = 2.0

Render = Callable[[Job, RequestDelta], list[Any]]


def log_failure(rid: str, exc: RequestError) -> None:
    log.warning("rid=%s failed status=%d error_type=%s error=%s", rid, exc.status, exc.error_type, exc.error)


async def respond(
    request: web.Request,
    requests: list[GenerateRequest],
    *,
    stream: bool,
    render: Render,
    error_events: Callable[[RequestError], list[Any]],
    build: Callable[[JobGroup], web.Response],
    tail: Callable[[JobGroup], list[Any]] = lambda group: [],
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Submit ``requests``, then stream them (see ``stream_group``) or answer ``build(group)`` once
    every one finished. ``headers`` are the stream's (``build`` sets the response's own)."""
    pipeline = frontend(request).pipeline
    with submit(pipeline, requests, route=request.path) as group:
        if stream:
            return await stream_group(
                request,
                group,
                render=render,
                error_events=error_events,
                tail=lambda: tail(group),
                headers=headers,
            )
        await group.collect()
    return build(group)


async def stream_group(
    request: web.Request,
    group: JobGroup,
    *,
    render: Render,
    error_events: Callable[[RequestError], list[Any]],
    tail: Callable[[], list[Any]] = list,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Send ``render(job, delta)`` events until every job finished, then ``tail()``.

    A failure before the first output raises (a normal HTTP error); after that it becomes
    ``error_events(exc)`` inside the 200 stream. A client gone mid-stream just ends the handler:
    the caller's ``submit`` block aborts the unfinished jobs.
    """
    first = await group.next(header_wait(request, group))
    sse = await Sse(request, headers).open()
    try:
        try:
            await _pump(sse, group, first, render, frontend(request).config.sse_keep_alive)
            await sse.send(*tail())
        except RequestError as exc:
            log_failure(rid_of(request), exc)
            await sse.send(*error_events(exc))
    except ConnectionResetError:
        log.info("rid=%s client disconnected", rid_of(request))
    return sse.response


def header_wait(request: web.Request, group: JobGroup) -> float:
    """How long a stream waits for its first output before it sends its headers: longer for a grammar,
    which the worker that samples compiles first (up to ``--grammar-compile-timeout``; a refusal is a
    422, not an error event in a 200 stream)."""
    if any(job.request.params.grammar is not None for job in group.jobs):
        return HEADER_WAIT_S + frontend(request).config.grammar_compile_timeout
    return HEADER_WAIT_S


async def _pump(
    sse: Sse, group: JobGroup, deltas: list[tuple[Job, RequestDelta]], render: Render, keep_alive: float
) -> None:
    """Send the deltas as they come, and a keep-alive comment after ``keep_alive`` silent seconds (0:
    never)."""
    while True:
        await sse.send(*(event for job, delta in deltas for event in render(job, delta)))
        if group.done:
            return
        deltas = await group.next(keep_alive or None)
        if not deltas:
            await sse.keep_alive()
