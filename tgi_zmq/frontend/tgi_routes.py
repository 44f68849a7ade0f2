"""TGI's own routes: ``POST /``, ``/generate``, ``/generate_stream`` and ``/tokenize``."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from aiohttp import web

from tgi_zmq.errors import RequestError
from tgi_zmq.messages import GenerateRequest, RequestDelta, TokenList
from tgi_zmq.validation import Limits, best_of, bool_field, copy_seed, generate_inputs, generate_params

from .http import Frontend, frontend, json_response, read_json, rid_of
from .jobs import Job, JobGroup
from .streaming import respond


@dataclasses.dataclass(frozen=True)
class _Options:
    """What the HTTP layer does with the output (the pipeline never sees these)."""

    details: bool
    return_full_text: bool
    prompt: str
    decoder_input_details: bool = False  # ``prefill`` in the details (empty unless enabled, as TGI)


def _prepare(
    fe: Frontend, request: web.Request, body: dict[str, Any], *, stream: bool, full_text_default: bool
) -> tuple[list[GenerateRequest], _Options]:
    """The request's copies (``best_of`` of them: the best is answered) and its options."""
    parameters = body.get("parameters")  # null is treated like omitted
    config = fe.config
    limits = Limits(
        config.max_stop_sequences, config.max_top_n_tokens, config.max_best_of, config.max_input_tokens
    )
    params, max_new_tokens = generate_params(parameters, limits, stream=stream)
    params.prompt_logprobs &= config.enable_prefill_logprobs  # else TGI's empty ``prefill``
    inputs = generate_inputs(body)
    p = parameters or {}
    decoder_input_details = bool_field(p, "decoder_input_details", False)
    options = _Options(
        details=bool_field(p, "details", False) or decoder_input_details,
        return_full_text=bool_field(p, "return_full_text", full_text_default),
        prompt=inputs,
        decoder_input_details=decoder_input_details,
    )
    rid, copies, now = rid_of(request), best_of(p), time.time()
    requests = [
        GenerateRequest(
            rid if copies == 1 else f"{rid}-{i}", inputs, None, copy_seed(params, i), max_new_tokens, now
        )
        for i in range(copies)
    ]
    return requests, options


# ---------------------------------------------------------------------------- handlers


async def generate(request: web.Request) -> web.StreamResponse:
    """``POST /generate``: one GenerateResponse object; with ``"stream": true`` (ours, as SGLang's
    ``/generate``: routers that carry only that route, as SMG, carry streams too) ``/generate_stream``'s
    events."""
    body = await read_json(request)
    return await _generate(request, body, stream=bool_field(body, "stream", False), full_text_default=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """``POST /generate_stream``: SSE StreamResponse events, no ``[DONE]``."""
    return await _generate(request, await read_json(request), stream=True, full_text_default=False)


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """``POST /``: ``stream`` picks the SSE or the one-element-array form; full text by default."""
    body = await read_json(request)
    stream = bool_field(body, "stream", False)
    return await _generate(request, body, stream=stream, full_text_default=True, as_list=True)


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize``: ``[{id, text, start, stop}]`` (byte offsets into the input)."""
    fe, body = frontend(request), await read_json(request)
    spans = await fe.pipeline.tokenize(rid_of(request), generate_inputs(body))
    return json_response([{"id": s.id, "text": s.text, "start": s.start, "stop": s.stop} for s in spans])


async def _generate(
    request: web.Request,
    body: dict[str, Any],
    *,
    stream: bool,
    full_text_default: bool,
    as_list: bool = False,
) -> web.StreamResponse:
    """One generation, streamed as SSE or answered as one object (``as_list``: in a one-element array)."""
    fe = frontend(request)
    with fe.admission.admit():
        requests, options = _prepare(fe, request, body, stream=stream, full_text_default=full_text_default)
        return await respond(
            request,
            requests,
            stream=stream,
            render=functools.partial(_stream_events, options=options),
            error_events=_error_event,
            build=functools.partial(_generate_json, fe=fe, options=options, as_list=as_list),
            headers={"x-compute-type": fe.compute_type, "x-compute-characters": str(len(options.prompt))},
        )


# ---------------------------------------------------------------------------- response shapes


def _token(job_or_delta: Job | RequestDelta, i: int) -> dict[str, Any]:
    return {
        "id": job_or_delta.token_ids[i],
        "text": job_or_delta.token_texts[i],
        "logprob": job_or_delta.logprobs[i],
        "special": job_or_delta.specials[i],
    }


def _top_tokens(tokens: TokenList) -> list[dict[str, Any]]:
    return [
        {"id": t, "text": text, "logprob": lp, "special": special}
        for t, text, lp, special in zip(
            tokens.ids, tokens.texts, tokens.logprobs, tokens.specials, strict=True
        )
    ]


def _prefill(job: Job) -> list[dict[str, Any]]:
    """The prompt's tokens with their logprobs (the first has none); empty if not scored."""
    p = job.prompt
    if p is None:
        return []
    return [
        {"id": t, "text": text, "logprob": lp} for t, text, lp in zip(p.ids, p.texts, p.logprobs, strict=True)
    ]


def _full_text(job: Job, options: _Options) -> str:
    return options.prompt + job.text if options.return_full_text else job.text


def _generate_json(group: JobGroup, *, fe: Frontend, options: _Options, as_list: bool) -> web.Response:
    """The best copy's answer (TGI's ``best_of``: the highest mean token logprob); the others go in
    its details' ``best_of_sequences``."""
    best, *others = sorted(group.jobs, key=lambda job: job.mean_logprob, reverse=True)
    payload: dict[str, Any] = {"generated_text": _full_text(best, options)}
    if options.details:
        payload["details"] = _details(best, options)
        if others:
            sequences = [
                {"generated_text": _full_text(job, options), **_details(job, options)} for job in others
            ]
            payload["details"]["best_of_sequences"] = sequences
    return json_response([payload] if as_list else payload, headers=_timing_headers(fe, best))


def _details(job: Job, options: _Options) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": job.finish_reason,
        "generated_tokens": job.generated_tokens,
        "seed": job.seed,
        "prefill": _prefill(job) if options.decoder_input_details else [],
        "tokens": [_token(job, i) for i in range(len(job.token_ids))],
    }
    if job.top_tokens:
        details["top_tokens"] = [_top_tokens(top) for top in job.top_tokens]
    return details


def _stream_events(job: Job, delta: RequestDelta, *, options: _Options) -> list[dict[str, Any]]:
    """One event per token (1-based ``index``); the last carries the text and the details."""
    first_index = len(job.token_ids) - len(delta.token_ids) + 1
    events = [_event(first_index + i, _token(delta, i)) for i in range(len(delta.token_ids))]
    for event, top in zip(events, delta.top_tokens, strict=False):
        event["top_tokens"] = _top_tokens(top)
    if delta.finish_reason is None:
        return events
    if not events:  # a final delta without tokens: close the stream with an empty special token
        last_id = job.token_ids[-1] if job.token_ids else 0
        events.append(_event(first_index, {"id": last_id, "text": "", "logprob": 0.0, "special": True}))
    events[-1]["generated_text"] = _full_text(job, options)
    if options.details:
        events[-1]["details"] = {
            "finish_reason": job.finish_reason,
            "generated_tokens": job.generated_tokens,
            "seed": job.seed,
            "input_length": job.prompt_tokens,
        }
    return events


def _event(index: int, token: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "token": token, "generated_text": None, "details": None}


def _error_event(exc: RequestError) -> list[dict[str, Any]]:
    return [{"error": exc.error, "error_type": exc.error_type}]


def _timing_headers(fe: Frontend, job: Job) -> dict[str, str]:
    """TGI's ``x-*`` timing headers. We cannot split validation from queueing: ``x-queue-time`` is
    the time to the first token, ``x-inference-time`` the rest."""
    total = job.duration()
    first = (job.first_output or job.started) - job.started
    decode = max(total - first, 0.0)
    return {
        "x-compute-type": fe.compute_type,
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(job.request.prompt or "")),
        "x-total-time": str(round(total * 1000)),
        "x-validation-time": "0",
        "x-queue-time": str(round(first * 1000)),
        "x-inference-time": str(round(decode * 1000)),
        "x-time-per-token": str(round(decode * 1000 / max(job.generated_tokens - 1, 1))),
        "x-prompt-tokens": str(job.prompt_tokens),
        "x-generated-tokens": str(job.generated_tokens),
    }
