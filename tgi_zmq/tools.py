"""Tool calling on ``/v1/chat/completions`` with TGI's semantics, as pure functions (no I/O).

The tools in effect (``chat_tools``) become one JSON-schema grammar, as TGI's ``tool_grammar.rs``
builds it: the model must write ``{"function": {"_name": "<tool>", <its arguments>...}}``. With
``tool_choice`` "auto" a pseudo tool ``no_tool`` joins them: the model answers in plain words
inside it (``{"_name": "no_tool", "content": "..."}``), which we return as ordinary content.

The output is read back as the model wrote it (``read_output``): a call's ``arguments`` are the
text of its object with ``_name`` cut out, so that the streamed fragments (``ToolStream``) and the
whole response say exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.messages import Grammar

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt. Respond in the format {name: function name, "
    "parameters: dictionary of argument name and its value}.Do not use variables."
)
_NO_TOOL_DEF = {
    "type": "function",
    "function": {
        "name": NO_TOOL,
        "description": "Open ended response with no specific tool selected",
        "parameters": {
            "type": "object",
            "properties": {"content": {"type": "string", "description": "The response content"}},
            "required": ["content"],
        },
    },
}

# The head of a tool-grammar output, up to the separator after the function's name.
_HEAD = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*([,}])')
_CONTENT_KEY = re.compile(r'\s*"content"\s*:\s*"')
_STRING_BODY = re.compile(r'((?:[^"\\]|\\.)*)("?)', re.DOTALL)
# What may still turn out to close the outer object: trailing blanks and one brace.
_MAYBE_CLOSING = re.compile(r"\s*(\}\s*)?\Z")


class ToolError(RequestError):
    """TGI's 422 ``tool_error``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Tool error: {reason}", error_type="tool_error", status=422)


@dataclasses.dataclass(frozen=True)
class ChatTools:
    """The tools a chat request puts in effect."""

    tools: list[dict[str, Any]]  # OpenAI form ``{type, function: {name, description?, parameters}}``
    tool_prompt: str
    grammar: Grammar


# ---------------------------------------------------------------------------- request


def chat_tools(body: Mapping[str, Any]) -> ChatTools | None:
    """The tools in effect for a chat body (``tools``, ``tool_choice``, ``tool_prompt``); None when
    there are none (no tools given, or ``tool_choice`` "none")."""
    tools = _tools(body.get("tools"))
    tool_prompt = body.get("tool_prompt")
    if tool_prompt is not None and not isinstance(tool_prompt, str):
        raise ValidationError("`tool_prompt` must be a string")
    chosen = _choose(tools, body.get("tool_choice")) if tools else []
    if not chosen:
        return None
    return ChatTools(chosen, tool_prompt or DEFAULT_TOOL_PROMPT, tool_grammar(chosen))


def _tools(value: Any) -> list[dict[str, Any]]:
    """``tools`` normalised to OpenAI's form (TGI also takes ``arguments`` for ``parameters``)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError("`tools` must be a list")
    return [_tool(tool, i) for i, tool in enumerate(value)]


def _tool(tool: Any, index: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type", "function") != "function":
        raise ValidationError(f'`tools[{index}]` must be {{"type": "function", "function": {{...}}}}')
    name, description = fn.get("name"), fn.get("description")
    parameters = fn.get("parameters", fn.get("arguments", {"type": "object"}))
    if not isinstance(name, str) or not name:
        raise ValidationError(f"`tools[{index}].function.name` must be a non-empty string")
    if description is not None and not isinstance(description, str):
        raise ValidationError(f"`tools[{index}].function.description` must be a string")
    if not _is_object_schema(parameters):
        raise ValidationError(f"`tools[{index}].function.parameters` must be a JSON schema object")
    function = {"name": name, "parameters": parameters}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def _is_object_schema(schema: Any) -> bool:
    """What the tool grammar reads of a tool's ``parameters`` has the right types."""
    return isinstance(schema, dict) and all(
        isinstance(schema.get(key, kind()), kind)
        for key, kind in (("properties", dict), ("required", list), ("$defs", dict))
    )


def _choose(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]]:
    """TGI's ``tool_choice``: auto (also null) adds ``no_tool``, none drops the tools, required
    keeps them all, a name (or ``{"type": "function", "function": {"name"}}``) keeps that one."""
    if choice is None or choice == "auto":
        return [*tools, _NO_TOOL_DEF]
    if choice == "none":
        return []
    if choice == "required":
        return tools
    name = choice
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise ValidationError(
            '`tool_choice` must be "auto", "none", "required", a tool name or '
            '{"type": "function", "function": {"name": ...}}'
        )
    for tool in tools:
        if tool["function"]["name"] == name:
            return [tool]
    raise ToolError(f"Tool with name {name} not found")


def tool_grammar(tools: list[dict[str, Any]]) -> Grammar:
    """The JSON schema of a call to one of ``tools`` (TGI's ``$functions`` + ``anyOf`` shape)."""
    functions = {tool["function"]["name"]: _function_schema(tool["function"]) for tool in tools}
    schema: dict[str, Any] = {
        "$functions": functions,
        "type": "object",
        "properties": {"function": {"anyOf": [{"$ref": "#/$functions/" + _pointer(n)} for n in functions]}},
        "required": ["function"],
        "additionalProperties": False,
    }
    # a tool's own definitions are referred to from the root ("#/$defs/x"): lift them there
    defs = {k: v for t in tools for k, v in t["function"]["parameters"].get("$defs", {}).items()}
    if defs:
        schema["$defs"] = defs
    return Grammar("json", json.dumps(schema))


def _function_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    params = function["parameters"]
    schema = {
        "type": "object",
        "properties": {
            "_name": {"type": "string", "const": function["name"]},
            **params.get("properties", {}),
        },
        "required": [*params.get("required", []), "_name"],
        "additionalProperties": params.get("additionalProperties") is True,
    }
    if function.get("description"):
        schema["description"] = function["description"]
    return schema


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def with_tool_prompt(
    chat: list[dict[str, Any]], tools: list[dict[str, Any]], tool_prompt: str | None, *, in_template: bool
) -> list[dict[str, Any]]:
    """``chat`` with TGI's tool prompt after its last message's content: ``"\\n---\\n"``, then the
    tools' JSON unless the template shows them itself (``in_template``), then the prompt."""
    prompt = tool_prompt or DEFAULT_TOOL_PROMPT
    if not in_template:
        prompt = json.dumps(tools, separators=(",", ":"), ensure_ascii=False) + "\n" + prompt
    last = chat[-1]
    return [*chat[:-1], {**last, "content": f"{last.get('content') or ''}\n---\n{prompt}"}]


def stream_call_id(messages: Any) -> str:
    """TGI's id for a streamed call: one more than the conversation's integer tool-call ids ("0"
    when there are none), or a UUID when they are not all integers."""
    ids = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        ids.append(message.get("tool_call_id"))
        calls = message.get("tool_calls")
        ids += [call.get("id") for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []
    ids = [str(i) for i in ids if i is not None]
    if not ids:
        return "0"
    if all(i.isdigit() for i in ids):
        return str(max(int(i) for i in ids) + 1)
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------- response


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call read from a tool-grammar output."""

    name: str
    arguments: str  # its JSON object's text as the model wrote it, ``_name`` left out


def read_output(text: str) -> ToolCall | str:
    """What a tool-grammar output says: a call, or plain content (what the model wrote in
    ``no_tool``, or the text itself when it stops before naming a function)."""
    head = _HEAD.match(text)
    if head is None:
        return _reordered(text) or text
    name = _string(head[1])
    if name == NO_TOOL:
        return _no_tool_content(text, head.end())
    if head[2] == "}":
        return ToolCall(name, "{}")
    rest = text[head.end() :]
    if _is_call(text):  # complete: drop the outer object's closing brace
        rest = rest.rstrip()[:-1].rstrip()
    return ToolCall(name, "{" + rest)


def _is_call(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("function"), dict)


def _reordered(text: str) -> ToolCall | str | None:
    """A complete call whose ``_name`` is not its function's first member."""
    if not _is_call(text):
        return None
    function = json.loads(text)["function"]
    name = function.pop("_name", None)
    if not isinstance(name, str):
        return None
    if name == NO_TOOL:
        return function["content"] if isinstance(function.get("content"), str) else ""
    return ToolCall(name, json.dumps(function, separators=(",", ":"), ensure_ascii=False))


def _string(body: str) -> str:
    """A JSON string's value from the text between its quotes."""
    return json.loads(f'"{body}"', strict=False)


def _string_prefix(raw: str) -> str:
    """The value of a JSON string from the text after its opening quote, as far as it goes: always
    a prefix of the final value, wherever the text was cut."""
    body, closed = _STRING_BODY.match(raw).groups()
    if closed:
        return _string(body)
    for cut in range(6):  # drop an unfinished escape ("\u12")
        try:
            value = _string(body[: len(body) - cut])
        except json.JSONDecodeError:
            continue
        return value[:-1] if value and "\ud800" <= value[-1] <= "\udbff" else value  # half a pair
    return ""


def _no_tool_content(text: str, head_end: int) -> str:
    key = _CONTENT_KEY.match(text, head_end)
    return _string_prefix(text[key.end() :]) if key else ""


def assistant_message(text: str) -> dict[str, Any]:
    """The chat message of a tool-grammar generation (a call's id is always "0", as in TGI)."""
    output = read_output(text)
    if isinstance(output, str):
        return {"role": "assistant", "content": output}
    function = {"name": output.name, "arguments": output.arguments, "description": None}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "0", "type": "function", "function": function}],
    }


class ToolStream:
    """The streamed form of ``assistant_message``: ``push`` each piece of text as it comes, get the
    chunk delta to send. Text is held until the function's name is known; then a call streams its
    arguments (its name on the first delta only) and ``no_tool`` streams its content as text. The
    fragments add up to what ``read_output`` reads in the whole text."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.text = ""
        self.name: str | None = None
        self._head_end = 0
        self._sent = ""  # the arguments (or content) sent so far
        self._started = False

    @property
    def calls_tool(self) -> bool:
        return self.name is not None and self.name != NO_TOOL

    def push(self, text: str, *, final: bool) -> dict[str, Any] | None:
        """The delta for one more piece of text (None: nothing to send yet); the ``final`` piece
        always gets one, to carry the finish reason."""
        self.text += text
        if final:
            output = read_output(self.text)
            if isinstance(output, str):
                return self._send(output, final=True)
            self.name = output.name
            return self._send(output.arguments, final=True)
        if self.name is None:
            head = _HEAD.match(self.text)
            if head is None:
                return None
            self.name, self._head_end = _string(head[1]), head.end()
        if self.name == NO_TOOL:
            return self._send(_no_tool_content(self.text, self._head_end), final=False)
        return self._send(self._arguments(), final=False)

    def _arguments(self) -> str:
        """The arguments so far, less what may yet turn out to close the outer object."""
        if self.text[self._head_end - 1] == "}":  # the function's object closed after _name
            return "{}"
        return "{" + _MAYBE_CLOSING.sub("", self.text[self._head_end :], count=1)

    def _send(self, so_far: str, *, final: bool) -> dict[str, Any] | None:
        fragment = so_far[len(self._sent) :] if so_far.startswith(self._sent) else ""
        announce = self.calls_tool and not self._started  # the call's name goes out at once
        if not (fragment or final or announce):
            return None
        self._sent += fragment
        if not self.calls_tool:
            delta = {"role": "assistant", "content": fragment}
        else:
            function = {"name": None if self._started else self.name, "arguments": fragment}
            call = {"index": 0, "id": self.call_id, "type": "function", "function": function}
            delta = {"role": "assistant", "tool_calls": [call]}
        self._started = True
        return delta
