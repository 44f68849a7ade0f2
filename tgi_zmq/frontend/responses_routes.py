"""OpenAI's Responses API, ``POST /v1/responses``: text in, text out, on the chat machinery.

The request becomes a chat request (``instructions`` a system message first, ``input`` the
messages) and runs as ``/v1/chat/completions`` does; the answer is a ``response`` object, or its
typed Server-Sent Events (``event: <type>``, each with a ``sequence_number``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from tgi_zmq.messages import GenerateRequest, RequestDelta
from tgi_zmq.validation import RequestError, ValidationError, chat_messages, chat_params, flag

from .http import NamedEvent, frontend, json_response, read_json, rid_of
from .jobs import Job
from .streaming import respond

_ROLES = {"developer": "system"}  # chat templates know no "developer"
_ERROR_CODES = {422: "invalid_prompt", 429: "rate_limit_exceeded"}  # OpenAI's, by our status


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: a ``response`` object, or its events with ``stream``."""
    fe, body = frontend(request), await read_json(request)  # checked against schemas.ResponsesRequest
    if body.get("tools"):
        raise ValidationError("tools are not supported on /v1/responses yet")
    chat = _chat_body(body)
    with fe.admission.admit():
        messages = chat_messages(chat)
        params, max_new_tokens = chat_params(chat, max_stop_sequences=fe.config.max_stop_sequences)
        req = GenerateRequest(rid_of(request), None, messages, params, max_new_tokens, time.time())
        shape = _Shape.of(body, rid_of(request), fe.config.served_model_name)
        events = _Events(shape)
        return await respond(
            request,
            [req],
            stream=flag(body, "stream", False),
            render=events.render,
            error_events=events.failed,
            build=lambda group: json_response(shape.response(_status(group.jobs[0]), group.jobs[0])),
            headers={"x-compute-type": fe.compute_type},
        )


def _chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request that a Responses request asks for."""
    instructions, given = body.get("instructions"), body["input"]
    messages = [] if instructions is None else [{"role": "system", "content": instructions}]
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    messages += [{"role": _ROLES.get(m["role"], m["role"]), "content": _text(m["content"])} for m in items]
    chat = {
        "messages": messages,
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
    }
    fmt = (body.get("text") or {}).get("format") or {}  # schemas.TextConfig
    if fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema") or {}}}
    elif fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _status(job: Job) -> str:
    return "incomplete" if job.finish_reason == "length" else "completed"


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What every ``response`` object of one request repeats."""

    id: str
    message_id: str
    created_at: int
    model: str
    request: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any], rid: str, default_model: str) -> _Shape:
        model = body.get("model") or default_model
        return cls(f"resp_{rid}", f"msg_{rid}", int(time.time()), model, body)

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        """The output message (no content part yet when ``text`` is None)."""
        content = [] if text is None else [_text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(
        self, status: str, job: Job | None = None, error: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The ``response`` object; ``job`` is the finished generation, if any."""
        body = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [] if job is None else [self.message(status, job.text)],
            "usage": None if job is None else _usage(job),
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": error,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": body.get("text") or {"format": {"type": "text"}},
        }


def _usage(job: Job) -> dict[str, Any]:
    return {
        "input_tokens": job.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": job.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job.prompt_tokens + job.generated_tokens,
    }


class _Events:
    """The typed events of one streamed response, numbered in order."""

    def __init__(self, shape: _Shape) -> None:
        self.shape = shape
        self.sequence_number = 0
        self.opened = False

    def _event(self, kind: str, **fields: Any) -> NamedEvent:
        event = NamedEvent(kind, {"type": kind, "sequence_number": self.sequence_number, **fields})
        self.sequence_number += 1
        return event

    def _part(self, kind: str, **fields: Any) -> NamedEvent:
        """An event about the one text part of the one output message."""
        return self._event(kind, item_id=self.shape.message_id, output_index=0, content_index=0, **fields)

    def render(self, job: Job, delta: RequestDelta) -> list[NamedEvent]:
        events = [] if self.opened else self._opening()
        self.opened = True
        if delta.text:
            events.append(self._part("response.output_text.delta", delta=delta.text, logprobs=[]))
        if delta.finish_reason is not None:
            events += self._closing(job)
        return events

    def _opening(self) -> list[NamedEvent]:
        started = self.shape.response("in_progress")
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
            self._event(
                "response.output_item.added", output_index=0, item=self.shape.message("in_progress", None)
            ),
            self._part("response.content_part.added", part=_text_part("")),
        ]

    def _closing(self, job: Job) -> list[NamedEvent]:
        status = _status(job)
        return [
            self._part("response.output_text.done", text=job.text, logprobs=[]),
            self._part("response.content_part.done", part=_text_part(job.text)),
            self._event(
                "response.output_item.done", output_index=0, item=self.shape.message(status, job.text)
            ),
            self._event(f"response.{status}", response=self.shape.response(status, job)),
        ]

    def failed(self, exc: RequestError) -> list[NamedEvent]:
        """A failure after the headers: OpenAI's ``error`` event, then ``response.failed``."""
        code = _ERROR_CODES.get(exc.status, "server_error")
        return [
            self._event("error", code=code, message=exc.error, param=None),
            self._event(
                "response.failed",
                response=self.shape.response("failed", error={"code": code, "message": exc.error}),
            ),
        ]


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}
