"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any

from aiohttp import web

from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.messages import GenerateRequest, RequestDelta
from tgi_zmq.tools import ToolStream, assistant_message, chat_tools, stream_call_id
from tgi_zmq.validation import (
    GenerationParams,
    bool_field,
    chat_messages,
    chat_params,
    choices,
    completion_choices,
    completion_logprobs,
    completion_params,
    completion_prompts,
    copy_seed,
)

from .http import Frontend, frontend, json_response, read_json, rid_of
from .jobs import Job, JobGroup
from .streaming import respond

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION = "text_completion"


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Per-request choices about the response's shape."""

    model: str
    fingerprint: str
    created: int  # one value for the answer or for every chunk of its stream (OpenAI, vLLM)
    logprobs: bool = False
    include_usage: bool = False
    echo: bool = False  # completions: the prompt comes first in each choice's text


def _shape(fe: Frontend, body: dict[str, Any], *, logprobs: bool = False, echo: bool = False) -> _Shape:
    model = body.get("model")
    options = body.get("stream_options")
    return _Shape(
        model=model if isinstance(model, str) and model else fe.config.served_model_name,
        fingerprint=fe.system_fingerprint,
        created=int(time.time()),
        logprobs=logprobs,
        include_usage=isinstance(options, dict) and bool_field(options, "include_usage", False),
        echo=echo,
    )


def _copies(rid: str, prompt: str | None, chat: list | None, params: GenerationParams, n: int) -> list:
    """``n`` requests for one prompt (choice i gets seed + i); the rid gets a suffix when n > 1."""
    now = time.time()
    return [
        GenerateRequest(
            rid if n == 1 else f"{rid}-{i}",
            prompt,
            chat,
            copy_seed(params.sampling, i),
            params.max_new_tokens,
            now,
        )
        for i in range(n)
    ]


def _finish_reason(reason: str | None) -> str | None:
    """TGI's OpenAI mapping: only ``eos_token`` becomes ``stop``."""
    return "stop" if reason == "eos_token" else reason


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(job.prompt_tokens for job in jobs)
    completion = sum(job.generated_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _envelope(obj: str, shape: _Shape, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "",  # TGI's
        "object": obj,
        "created": shape.created,
        "model": shape.model,
        "system_fingerprint": shape.fingerprint,
        "choices": choices,
    }


def _logprob(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _logprobs(out: Job | RequestDelta) -> dict[str, Any]:
    """Chat's ``logprobs``: each token's, with its ``top_logprobs`` when they were asked for."""
    content = []
    for i, (text, logprob) in enumerate(zip(out.token_texts, out.logprobs, strict=True)):
        top = out.top_tokens[i] if i < len(out.top_tokens) else None
        tops = [] if top is None else [_logprob(t, lp) for t, lp in zip(top.texts, top.logprobs, strict=True)]
        content.append({**_logprob(text, logprob), "top_logprobs": tops})
    return {"content": content}


def _error_events(exc: RequestError) -> list[Any]:
    return [{"error": {"message": exc.error, "http_status_code": exc.status}}, "[DONE]"]


def _tail(obj: str, group: JobGroup, shape: _Shape) -> list[Any]:
    """What ends a successful stream: the usage chunk if asked for, then ``[DONE]``."""
    if not shape.include_usage:
        return ["[DONE]"]
    return [{**_envelope(obj, shape, []), "usage": _usage(group.jobs)}, "[DONE]"]


# ---------------------------------------------------------------------------- chat


async def chat_completions(request: web.Request) -> web.StreamResponse:
    fe, body = frontend(request), await read_json(request)
    stream = bool_field(body, "stream", False)
    n = choices(body, fe.config.max_best_of)
    with fe.admission.admit(n):
        messages = chat_messages(body)
        tools = chat_tools(body)
        params = chat_params(
            body,
            max_stop_sequences=fe.config.max_stop_sequences,
            tool_grammar=tools.grammar if tools else None,
            max_top_n_tokens=fe.config.max_top_n_tokens,
        )
        shape = _shape(fe, body, logprobs=bool_field(body, "logprobs", False))
        requests = _copies(rid_of(request), None, messages, params, n)
        for req in requests:
            if tools:
                req.tools, req.tool_prompt = tools.tools, tools.tool_prompt
        tool_streams = [ToolStream(stream_call_id(body["messages"])) for _ in requests] if tools else None
        return await respond(
            request,
            requests,
            stream=stream,
            render=functools.partial(_chat_chunk, shape=shape, tool_streams=tool_streams),
            error_events=_error_events,
            tail=functools.partial(_tail, CHAT_CHUNK, shape=shape),
            build=functools.partial(_chat_completion, shape=shape, tools=tools is not None),
            headers={"x-compute-type": fe.compute_type},
        )


def _chat_chunk(
    job: Job, delta: RequestDelta, *, shape: _Shape, tool_streams: list[ToolStream] | None = None
) -> list[dict[str, Any]]:
    if not delta.token_ids and delta.finish_reason is None:
        return []
    if tool_streams is None:
        message = {"role": "assistant", "content": delta.text}
    else:
        message = tool_streams[job.index].push(delta.text, final=delta.finish_reason is not None)
        if message is None:  # held until the function's name is known
            return []
    choice = {
        "index": job.index,
        "delta": message,
        "logprobs": _logprobs(delta) if shape.logprobs else None,
        "finish_reason": _chat_finish_reason(delta.finish_reason, message),
    }
    return [{**_envelope(CHAT_CHUNK, shape, [choice]), "usage": None}]


def _chat_completion(group: JobGroup, *, shape: _Shape, tools: bool = False) -> web.Response:
    choices = []
    for job in group.jobs:
        message = assistant_message(job.text) if tools else {"role": "assistant", "content": job.text}
        choices.append(
            {
                "index": job.index,
                "message": message,
                "logprobs": _logprobs(job) if shape.logprobs else None,
                "finish_reason": _chat_finish_reason(job.finish_reason, message),
            }
        )
    return json_response({**_envelope("chat.completion", shape, choices), "usage": _usage(group.jobs)})


def _chat_finish_reason(reason: str | None, message: dict[str, Any]) -> str | None:
    """A tool call the grammar saw through ends with OpenAI's ``tool_calls``."""
    if reason == "eos_token" and "tool_calls" in message:
        return "tool_calls"
    return _finish_reason(reason)


# ---------------------------------------------------------------------------- completions


async def completions(request: web.Request) -> web.StreamResponse:
    fe, body = frontend(request), await read_json(request)
    stream = bool_field(body, "stream", False)
    config = fe.config
    prompts = completion_prompts(body, max_client_batch_size=config.max_client_batch_size)
    n, runs = completion_choices(body, config.max_best_of, stream=stream)
    with fe.admission.admit(len(prompts) * runs):
        rid, requests = rid_of(request), []
        for i, prompt in enumerate(prompts):
            # one call per prompt: each gets its own random seed when none is given
            params = completion_params(
                body, max_stop_sequences=config.max_stop_sequences, max_top_n_tokens=config.max_top_n_tokens
            )
            if params.sampling.prompt_logprobs and not config.enable_prefill_logprobs:
                raise ValidationError("`echo` with `logprobs` needs the server's --enable-prefill-logprobs")
            requests += _copies(rid if len(prompts) == 1 else f"{rid}-{i}", prompt, None, params, runs)
        logprobs = completion_logprobs(body, config.max_top_n_tokens) is not None
        shape = _shape(fe, body, logprobs=logprobs, echo=bool_field(body, "echo", False))
        return await respond(
            request,
            requests,
            stream=stream,
            render=functools.partial(_completion_chunk, shape=shape),
            error_events=_error_events,
            tail=functools.partial(_tail, COMPLETION, shape=shape),
            build=functools.partial(_completion, shape=shape, n=n, runs=runs),
            headers={"x-compute-type": fe.compute_type},
        )


def _completion_chunk(job: Job, delta: RequestDelta, *, shape: _Shape) -> list[dict[str, Any]]:
    """One chunk per delta; like TGI, a prompt's last chunk also carries that prompt's usage. With
    ``echo`` the first chunk starts with the prompt."""
    if not delta.token_ids and delta.finish_reason is None:
        return []
    first = len(job.token_ids) == len(delta.token_ids)
    echoed = shape.echo and first
    choice = {
        "index": job.index,
        "text": (job.request.prompt if echoed else "") + delta.text,
        "logprobs": _completion_logprobs(job, shape.echo, len(delta.token_ids)) if shape.logprobs else None,
        "finish_reason": _finish_reason(delta.finish_reason),
    }
    chunk = _envelope(COMPLETION, shape, [choice])
    if delta.finish_reason is not None:
        chunk["usage"] = _usage([job])
    return [chunk]


def _completion(group: JobGroup, *, shape: _Shape, n: int, runs: int) -> web.Response:
    """Each prompt's ``n`` best of its ``runs`` copies (by mean logprob), as OpenAI's ``best_of``."""
    choices = []
    for first in range(0, len(group.jobs), runs):
        copies = group.jobs[first : first + runs]
        if runs > n:
            copies = sorted(copies, key=lambda job: job.mean_logprob, reverse=True)
        for job in copies[:n]:
            choices.append(
                {
                    "index": len(choices),
                    "text": (job.request.prompt if shape.echo else "") + job.text,
                    "logprobs": _completion_logprobs(job, shape.echo) if shape.logprobs else None,
                    "finish_reason": _finish_reason(job.finish_reason),
                }
            )
    return json_response({**_envelope(COMPLETION, shape, choices), "usage": _usage(group.jobs)})


def _completion_logprobs(job: Job, echo: bool, last: int | None = None) -> dict[str, Any]:
    """The legacy ``logprobs`` object of the job's tokens (the scored prompt's first with ``echo``);
    ``last``: only the last N generated tokens (a stream's chunk; its first one has the prompt's)."""
    prompt = job.prompt if echo and job.prompt is not None else None
    texts = (prompt.texts if prompt else []) + job.token_texts
    logprobs = (prompt.logprobs if prompt else []) + job.logprobs
    tops: list[dict[str, float | None] | None] = (
        [None] + [{t: lp} for t, lp in zip(prompt.texts[1:], prompt.logprobs[1:], strict=True)]
        if prompt
        else []
    )
    for i, (text, logprob) in enumerate(zip(job.token_texts, job.logprobs, strict=True)):
        top = job.top_tokens[i] if i < len(job.top_tokens) else None
        tops.append(dict(zip(top.texts, top.logprobs, strict=True)) if top else {text: logprob})
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0)) if texts else []
    start = 0 if last is None or last == len(job.token_ids) else len(texts) - last
    return {
        "tokens": texts[start:],
        "token_logprobs": logprobs[start:],
        "top_logprobs": tops[start:],
        "text_offset": offsets[start:],
    }


# ---------------------------------------------------------------------------- models


async def models(request: web.Request) -> web.Response:
    """Every served name (``--served-model-name``): a router offers requests for these names only."""
    names = frontend(request).config.served_model_names
    cards = [{"id": name, "object": "model", "created": 0, "owned_by": "tgi-zmq"} for name in names]
    return json_response({"object": "list", "data": cards})
