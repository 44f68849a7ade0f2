"""OpenAI's Responses API, ``POST /v1/responses``: text and function tools, on the chat machinery.

The request becomes a chat request (``instructions`` a system message first, ``input`` the
messages, flat function tools nested as chat's) and runs as ``/v1/chat/completions`` does, tools
with TGI's semantics (``tgi_zmq.tools``). The answer is a ``response`` object, or its typed
Server-Sent Events (``event: <type>``, each with a ``sequence_number``); its one output item is
the model's message, or its call of a function.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from tgi_zmq.errors import RequestError
from tgi_zmq.messages import GenerateRequest, RequestDelta
from tgi_zmq.tools import ToolCall, ToolStream, chat_tools, read_output
from tgi_zmq.validation import bool_field, chat_messages, chat_params

from .http import NamedEvent, frontend, json_response, read_json, rid_of
from .jobs import Job
from .streaming import respond

_ROLES = {"developer": "system"}  # chat templates know no "developer"
_ERROR_CODES = {422: "invalid_prompt", 429: "rate_limit_exceeded"}  # OpenAI's, by our status


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: a ``response`` object, or its events with ``stream``."""
    fe, body = frontend(request), await read_json(request)  # checked against request_models.ResponsesRequest
    chat, rid = _chat_body(body), rid_of(request)
    with fe.admission.admit():
        messages = chat_messages(chat)
        tools = chat_tools(chat)
        params, max_new_tokens = chat_params(
            chat,
            max_stop_sequences=fe.config.max_stop_sequences,
            tool_grammar=tools.grammar if tools else None,
        )
        req = GenerateRequest(rid, None, messages, params, max_new_tokens, time.time())
        if tools:
            req.tools, req.tool_prompt = tools.tools, tools.tool_prompt
        shape = _Shape.of(body, rid, fe.config.served_model_name, tools=tools is not None)
        events = _Events(shape)
        return await respond(
            request,
            [req],
            stream=bool_field(body, "stream", False),
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
    messages += [_chat_message(item) for item in items]
    chat = {
        "messages": messages,
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": [_chat_tool(tool) for tool in body.get("tools") or []],
        "tool_choice": _chat_tool_choice(body.get("tool_choice")),
    }
    fmt = (body.get("text") or {}).get("format") or {}  # request_models.TextConfig
    if fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema") or {}}}
    elif fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def _chat_message(item: dict[str, Any]) -> dict[str, Any]:
    """The chat message of one input item (``request_models.InputItem``)."""
    kind = item.get("type") or "message"
    if kind == "function_call":
        function = {"name": item["name"], "arguments": item["arguments"]}
        call = {"id": item["call_id"], "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item["output"])}
    return {"role": _ROLES.get(item["role"], item["role"]), "content": _text(item["content"])}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A flat Responses function tool (``request_models.FunctionTool``) in chat's nested form."""
    function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``{"type": "function", "name"}`` in chat's form; "auto", "none", "required" as they are."""
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _status(job: Job) -> str:
    return "incomplete" if job.finish_reason == "length" else "completed"


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What every ``response`` object of one request repeats."""

    rid: str
    created_at: int
    model: str
    request: dict[str, Any]
    tools: bool  # tools are in effect: the output is read as a tool-grammar output

    @classmethod
    def of(cls, body: dict[str, Any], rid: str, default_model: str, *, tools: bool = False) -> _Shape:
        return cls(rid, int(time.time()), body.get("model") or default_model, body, tools)

    @property
    def id(self) -> str:
        return f"resp_{self.rid}"

    @property
    def message_id(self) -> str:
        return f"msg_{self.rid}"

    @property
    def call_item_id(self) -> str:
        return f"fc_{self.rid}"

    @property
    def call_id(self) -> str:
        return f"call_{self.rid}"

    def output(self, job: Job) -> ToolCall | str:
        """What the finished generation says: a call, or the message's text."""
        return read_output(job.text) if self.tools else job.text

    def item(self, status: str, output: ToolCall | str | None) -> dict[str, Any]:
        """The output item: the function call, or the message (no content part yet for None)."""
        if isinstance(output, ToolCall):
            return {
                "type": "function_call",
                "id": self.call_item_id,
                "call_id": self.call_id,
                "name": output.name,
                "arguments": output.arguments,
                "status": status,
            }
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [] if output is None else [_text_part(output)],
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
            "output": [] if job is None else [self.item(status, self.output(job))],
            "usage": None if job is None else _usage(job),
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": error,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "parallel_tool_calls": False,
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
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
    """The typed events of one streamed response, numbered in order. With tools, ``ToolStream``
    holds the text until it knows whether the output item is a call or a message."""

    def __init__(self, shape: _Shape) -> None:
        self.shape = shape
        self.sequence_number = 0
        self.opened = False
        self.calls: bool | None = None  # the output item is a function call; None: not open yet
        self.tool_stream = ToolStream(shape.call_id) if shape.tools else None

    def _event(self, kind: str, **fields: Any) -> NamedEvent:
        event = NamedEvent(kind, {"type": kind, "sequence_number": self.sequence_number, **fields})
        self.sequence_number += 1
        return event

    def _part(self, kind: str, **fields: Any) -> NamedEvent:
        """An event about the one text part of the output message."""
        return self._event(kind, item_id=self.shape.message_id, output_index=0, content_index=0, **fields)

    def _call(self, kind: str, **fields: Any) -> NamedEvent:
        """An event about the arguments of the output function call."""
        return self._event(kind, item_id=self.shape.call_item_id, output_index=0, **fields)

    def render(self, job: Job, delta: RequestDelta) -> list[NamedEvent]:
        events = [] if self.opened else self._opening()
        self.opened = True
        final = delta.finish_reason is not None
        piece = self._piece(delta.text, final)
        if piece is not None:
            events += self._grow(*piece)
        if final:
            events += self._closing(job)
        return events

    def _piece(self, text: str, final: bool) -> tuple[str | None, str] | None:
        """What ``text`` adds to the output item: the called function's name (None for a message)
        and the fragment of its arguments or text; None while ``ToolStream`` holds the text."""
        if self.tool_stream is None:
            return None, text
        chat = self.tool_stream.push(text, final=final)
        if chat is None:
            return None
        if "tool_calls" in chat:
            return self.tool_stream.name, chat["tool_calls"][0]["function"]["arguments"]
        return None, chat["content"]

    def _grow(self, name: str | None, fragment: str) -> list[NamedEvent]:
        """The events of one more fragment of the output item, opened first if need be."""
        events = self._open_item(name) if self.calls is None else []
        if fragment and self.calls:
            events.append(self._call("response.function_call_arguments.delta", delta=fragment))
        elif fragment:
            events.append(self._part("response.output_text.delta", delta=fragment, logprobs=[]))
        return events

    def _opening(self) -> list[NamedEvent]:
        started = self.shape.response("in_progress")
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def _open_item(self, name: str | None) -> list[NamedEvent]:
        """The output item's first events: a call of ``name`` (no arguments yet), or a message."""
        self.calls = name is not None
        item = self.shape.item("in_progress", ToolCall(name, "") if name is not None else None)
        events = [self._event("response.output_item.added", output_index=0, item=item)]
        if not self.calls:
            events.append(self._part("response.content_part.added", part=_text_part("")))
        return events

    def _closing(self, job: Job) -> list[NamedEvent]:
        status, output = _status(job), self.shape.output(job)
        if isinstance(output, ToolCall):
            done = [self._call("response.function_call_arguments.done", arguments=output.arguments)]
        else:
            done = [
                self._part("response.output_text.done", text=output, logprobs=[]),
                self._part("response.content_part.done", part=_text_part(output)),
            ]
        return [
            *done,
            self._event("response.output_item.done", output_index=0, item=self.shape.item(status, output)),
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
