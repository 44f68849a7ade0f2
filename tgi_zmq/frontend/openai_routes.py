"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tgi_zmq.messages import GenerateRequest, RequestDelta
from tgi_zmq.tools import ToolStream, assistant_message, chat_tools, stream_call_id
from tgi_zmq.validation import (
    RequestError,
    chat_messages,
    chat_params,
    completion_params,
    completion_prompts,
    flag,
)

from .http import frontend, json_response, read_json, rid_of
from .jobs import Job, JobGroup
from .streaming import respond

if TYPE_CHECKING:
    from .app import Frontend

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION = "text_completion"


@dataclasses.dataclass(frozen=True)
class _Shape:
    """Per-request choices about the response's shape."""

    model: str
    fingerprint: str
    logprobs: bool = False
    include_usage: bool = False


def _shape(fe: Frontend, body: dict[str, Any], *, logprobs: bool = False) -> _Shape:
    model = body.get("model")
    options = body.get("stream_options")
    return _Shape(
        model=model if isinstance(model, str) and model else fe.config.served_model_name,
        fingerprint=fe.system_fingerprint,
        logprobs=logprobs,
        include_usage=isinstance(options, dict) and flag(options, "include_usage", False),
    )


def _finish_reason(reason: str | None) -> str | None:
    """TGI's OpenAI mapping: only ``eos_token`` becomes ``stop``."""
    return "stop" if reason == "eos_token" else reason


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(job.prompt_tokens for job in jobs)
    completion = sum(job.generated_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _envelope(obj: str, shape: _Shape, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "",
        "object": obj,
        "created": int(time.time()),
        "model": shape.model,
        "system_fingerprint": shape.fingerprint,
        "choices": choices,
    }


def _logprobs(texts: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t, "logprob": lp, "top_logprobs": []} for t, lp in zip(texts, logprobs, strict=False)
        ]
    }


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
    stream = flag(body, "stream", False)
    with fe.admission.admit():
        messages = chat_messages(body)
        tools = chat_tools(body)
        params, max_new_tokens = chat_params(
            body,
            max_stop_sequences=fe.config.max_stop_sequences,
            tool_grammar=tools.grammar if tools else None,
        )
        shape = _shape(fe, body, logprobs=flag(body, "logprobs", False))
        req = GenerateRequest(rid_of(request), None, messages, params, max_new_tokens, time.time())
        if tools:
            req.tools, req.tool_prompt = tools.tools, tools.tool_prompt
        tool_stream = ToolStream(stream_call_id(body["messages"])) if tools and stream else None
        return await respond(
            request,
            [req],
            stream=stream,
            render=functools.partial(_chat_chunk, shape=shape, tool_stream=tool_stream),
            error_events=_error_events,
            tail=functools.partial(_tail, CHAT_CHUNK, shape=shape),
            build=functools.partial(_chat_completion, shape=shape, tools=tools is not None),
            headers={"x-compute-type": fe.compute_type},
        )


def _chat_chunk(
    job: Job, delta: RequestDelta, *, shape: _Shape, tool_stream: ToolStream | None = None
) -> list[dict[str, Any]]:
    if not delta.token_ids and delta.finish_reason is None:
        return []
    if tool_stream is None:
        message = {"role": "assistant", "content": delta.text}
    else:
        message = tool_stream.push(delta.text, final=delta.finish_reason is not None)
        if message is None:  # held until the function's name is known
            return []
    choice = {
        "index": 0,
        "delta": message,
        "logprobs": _logprobs(delta.token_texts, delta.logprobs) if shape.logprobs else None,
        "finish_reason": _chat_finish_reason(delta.finish_reason, message),
    }
    return [{**_envelope(CHAT_CHUNK, shape, [choice]), "usage": None}]


def _chat_completion(group: JobGroup, *, shape: _Shape, tools: bool = False) -> web.Response:
    job = group.jobs[0]
    message = assistant_message(job.text) if tools else {"role": "assistant", "content": job.text}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _logprobs(job.token_texts, job.logprobs) if shape.logprobs else None,
        "finish_reason": _chat_finish_reason(job.finish_reason, message),
    }
    return json_response({**_envelope("chat.completion", shape, [choice]), "usage": _usage(group.jobs)})


def _chat_finish_reason(reason: str | None, message: dict[str, Any]) -> str | None:
    """A tool call the grammar saw through ends with OpenAI's ``tool_calls``."""
    if reason == "eos_token" and "tool_calls" in message:
        return "tool_calls"
    return _finish_reason(reason)


# ---------------------------------------------------------------------------- completions


async def completions(request: web.Request) -> web.StreamResponse:
    fe, body = frontend(request), await read_json(request)
    stream = flag(body, "stream", False)
    prompts = completion_prompts(body, max_client_batch_size=fe.config.max_client_batch_size)
    with fe.admission.admit(len(prompts)):
        rid, requests = rid_of(request), []
        for i, prompt in enumerate(prompts):
            # one call per prompt: each gets its own random seed when none is given
            params, max_new_tokens = completion_params(body, max_stop_sequences=fe.config.max_stop_sequences)
            wire_rid = rid if len(prompts) == 1 else f"{rid}-{i}"
            requests.append(GenerateRequest(wire_rid, prompt, None, params, max_new_tokens, time.time()))
        shape = _shape(fe, body)
        return await respond(
            request,
            requests,
            stream=stream,
            render=functools.partial(_completion_chunk, shape=shape),
            error_events=_error_events,
            tail=functools.partial(_tail, COMPLETION, shape=shape),
            build=functools.partial(_completion, shape=shape),
            headers={"x-compute-type": fe.compute_type},
        )


def _completion_chunk(job: Job, delta: RequestDelta, *, shape: _Shape) -> list[dict[str, Any]]:
    """One chunk per delta; like TGI, a prompt's last chunk also carries that prompt's usage."""
    if not delta.token_ids and delta.finish_reason is None:
        return []
    choice = {
        "index": job.index,
        "text": delta.text,
        "logprobs": None,
        "finish_reason": _finish_reason(delta.finish_reason),
    }
    chunk = _envelope(COMPLETION, shape, [choice])
    if delta.finish_reason is not None:
        chunk["usage"] = _usage([job])
    return [chunk]


def _completion(group: JobGroup, *, shape: _Shape) -> web.Response:
    choices = [
        {
            "index": job.index,
            "text": job.text,
            "logprobs": None,
            "finish_reason": _finish_reason(job.finish_reason),
        }
        for job in group.jobs
    ]
    return json_response({**_envelope(COMPLETION, shape, choices), "usage": _usage(group.jobs)})


# ---------------------------------------------------------------------------- models


async def models(request: web.Request) -> web.Response:
    name = frontend(request).config.served_model_name
    return json_response(
        {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": name}]}
    )
