"""TGI's ``/chat_tokenize`` and SageMaker's ``/invocations``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tgi_zmq.tools import chat_tools
from tgi_zmq.validation import chat_messages

from . import openai_routes, tgi_routes
from .http import frontend, json_response, read_json, rid_of
from .request_models import invocation_kind

_INVOKED: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "generate": tgi_routes.compat_generate,
    "chat": openai_routes.chat_completions,
    "completion": openai_routes.completions,
}


async def chat_tokenize(request: web.Request) -> web.Response:
    """``POST /chat_tokenize``: the prompt the chat template makes of a chat request (its tools in
    effect included, as ``/v1/chat/completions`` renders them), and its tokens."""
    fe, body = frontend(request), await read_json(request)
    messages, tools = chat_messages(body), chat_tools(body)
    result = await fe.pipeline.chat_tokenize(
        rid_of(request), messages, tools and tools.tools, tools and tools.tool_prompt
    )
    tokens = [{"id": s.id, "text": s.text, "start": s.start, "stop": s.stop} for s in result.tokens]
    return json_response({"tokenize_response": tokens, "templated_text": result.templated_text})


async def invocations(request: web.Request) -> web.StreamResponse:
    """``POST /invocations``: ``POST /``, chat or completion, as the body's keys say (TGI's order).

    The route's model (``request_models.InvocationsRequest``) already refused a body that is none of them.
    """
    body = await read_json(request)
    return await _INVOKED[invocation_kind(body)](request)
