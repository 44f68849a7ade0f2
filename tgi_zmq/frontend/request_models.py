"""Pydantic models of the HTTP API's request bodies: the source of the body check (``check_body``) and
of the OpenAPI document's request schemas.

They are type-level only (JSON types, required fields, the enums of ``type`` tags): value rules and
TGI's exact messages stay in ``tgi_zmq.validation``, which the handlers still run on the plain dict.
Their fields are nullable where a handler treats null as omitted. Unknown fields are ignored, as TGI
does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag
from pydantic import ValidationError as PydanticError

from tgi_zmq.errors import ValidationError

# TGI's integer types (Rust's): a value out of range is a type error there (serde's 422) as here. The
# pipeline's messages carry 64-bit integers at most.
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class _Body(BaseModel):
    """A request body: strict JSON types (no ``"1"`` for 1, no ``true`` for 1), unknown fields allowed."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- shared parts


class Grammar(_Body):
    """TGI's structured output: a JSON schema or a regular expression the output must match."""

    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = Field(
        description="A JSON schema (object or JSON text) for `json` and `json_object`, "
        "`{name?, schema}` for `json_schema`, a regex string for `regex`"
    )


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: Any = Field(None, alias="schema", description="The JSON schema the output must match")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format`` (text, json_object, json_schema) or TGI's: a ``Grammar``."""

    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: JsonSchemaFormat | None = Field(None, description="OpenAI's form of `json_schema`")
    value: Any = Field(None, description="TGI's form: the grammar's value (as `Grammar.value`)")


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage")


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: Any = Field(None, description="The arguments' JSON schema (TGI: also `arguments`)")


class Tool(_Body):
    type: str = Field("function", description="function")
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: str = Field(description="function")
    function: FunctionName


class ToolCallFunction(_Body):
    name: str
    arguments: Any = Field(None, description="JSON text (OpenAI) or an object")


class ToolCall(_Body):
    id: str | None = None
    type: str | None = "function"
    function: ToolCallFunction


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: str = Field(description="system, user, assistant, tool...")
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier tool calls")
    tool_call_id: str | None = Field(None, description="The call a `tool` message answers")
    name: str | None = None


# ---------------------------------------------------------------------------- TGI requests


class GenerateParameters(_Body):
    """TGI's generation parameters (all optional; omitting the whole object turns sampling on)."""

    best_of: U64 | None = Field(None, description="Copies to generate, the best returned (needs sampling)")
    decoder_input_details: bool | None = Field(None, description="Return the prompt's tokens (not streaming)")
    details: bool | None = Field(None, description="Return the generation's details")
    do_sample: bool | None = Field(None, description="Sample instead of greedy decoding")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]")
    grammar: Grammar | None = None
    max_new_tokens: U32 | None = Field(None, description="Strictly positive; null: up to the context's end")
    repetition_penalty: float | None = Field(None, description="Strictly positive; 1.0 is off")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to the generated text")
    seed: U64 | None = Field(None, description="Random seed of sampling")
    stop: list[str] | None = Field(None, description="Stop sequences (kept in the text)")
    temperature: float | None = Field(None, description="Strictly positive")
    top_k: I32 | None = Field(None, description="Strictly positive")
    top_n_tokens: U32 | None = Field(None, description="Most likely tokens to return at each step")
    top_p: float | None = Field(None, description="In (0, 1)")
    truncate: U64 | None = Field(None, description="Keep only the prompt's last `truncate` tokens")
    typical_p: float | None = Field(None, description="In (0, 1)")
    watermark: bool | None = Field(None, description="Kirchenbauer watermark")
    adapter_id: str | None = Field(None, description="LoRA adapter (unknown ids: the base model)")
    ignore_eos: bool | None = Field(None, description="Extension: do not stop at the EOS token")
    min_tokens: U32 | None = Field(None, description="Extension: generate at least this many tokens")
    stop_token_ids: list[U32] | None = Field(None, description="Extension: token ids that finish like EOS")


class GenerateBody(_Body):
    """TGI's ``GenerateRequest`` (not the wire message ``messages.GenerateRequest``): ``/generate``,
    ``/generate_stream``, ``POST /`` and ``/tokenize`` (which ignores ``parameters``, as TGI)."""

    inputs: str = Field(description="The prompt")
    parameters: GenerateParameters | None = None
    stream: bool | None = Field(
        None,
        description="`POST /` and `/generate` (ours, as SGLang's: a router that carries only `/generate`, "
        "as SMG, carries streams): answer with `/generate_stream`'s Server-Sent Events",
    )


# ---------------------------------------------------------------------------- OpenAI requests


class _OpenAISampling(_Body):
    """Fields that chat and completions share."""

    model: str | None = Field(None, description="Echoed in the answer")
    max_tokens: U32 | None = Field(None, description="Strictly positive; null: up to the context's end")
    temperature: float | None = Field(None, description="0 is greedy")
    top_p: float | None = Field(None, description="In (0, 1)")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]")
    presence_penalty: float | None = Field(None, description="Mapped to repetition_penalty + 2, like TGI")
    repetition_penalty: float | None = Field(None, description="Extension (vLLM): strictly positive")
    stop: str | list[str] | None = Field(None, description="Stop sequences")
    seed: U64 | None = None
    n: U32 | None = Field(None, description="Only 1 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias")
    stream: bool | None = Field(None, description="Answer with Server-Sent Events ending in `[DONE]`")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    min_tokens: U32 | None = Field(None, description="Extension: generate at least this many tokens")
    stop_token_ids: list[U32] | None = Field(None, description="Extension: token ids that finish like EOS")
    ignore_eos: bool | None = Field(None, description="Extension: do not stop at the EOS token")


class ChatRequest(_OpenAISampling):
    """``/v1/chat/completions`` and ``/chat_tokenize``."""

    messages: list[ChatMessage]
    max_completion_tokens: U32 | None = Field(None, description="Alias of `max_tokens`")
    logprobs: bool | None = Field(None, description="Return each token's logprob")
    top_logprobs: U32 | None = Field(None, description="Most likely tokens to return at each step")
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = Field(None, description="auto, none, required or a tool")
    tool_prompt: str | None = Field(None, description="TGI: text put before the tools in the prompt")


class CompletionRequest(_OpenAISampling):
    """``/v1/completions``."""

    prompt: str | list[str] = Field(description="One prompt or a list of prompts")
    suffix: str | None = Field(None, description="Not supported (422)")
    logprobs: U32 | None = Field(None, description="0 to 5")
    echo: bool | None = None
    best_of: U32 | None = None


# ---------------------------------------------------------------------------- Responses API request


class InputText(_Body):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Body):
    """One message of the conversation (the Responses API's "easy input message")."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class FunctionCallInput(_Body):
    """An earlier call of the model's, given back: an assistant message with ``tool_calls``."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="The call's arguments, JSON text")


class FunctionCallOutputInput(_Body):
    """A call's result: a ``tool`` message."""

    type: Literal["function_call_output"]
    call_id: str | None = None
    output: str | list[InputText]


def _input_item_kind(item: Any) -> str | None:
    """Which input item ``item`` is, by its ``type`` (a message's may be left out)."""
    kind = (item.get("type") or "message") if isinstance(item, dict) else None
    return kind if kind in ("message", "function_call", "function_call_output") else None


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")],
    Discriminator(
        _input_item_kind,
        custom_error_type="input_item_kind",
        custom_error_message="an input item must be a message, function_call or function_call_output",
    ),
]


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class FunctionTool(_Body):
    """A Responses API tool: a function, flat (chat nests it under ``function``)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema")
    strict: bool | None = Field(None, description="Ignored: the tool grammar always holds")


class FunctionToolChoice(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Body):
    """``/v1/responses``: OpenAI's Responses API (text and function tools)."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = Field(None, description="A system message put first")
    max_output_tokens: U32 | None = Field(None, description="Strictly positive")
    temperature: float | None = Field(None, description="0 is greedy")
    top_p: float | None = Field(None, description="In (0, 1)")
    stream: bool | None = Field(None, description="Answer with typed Server-Sent Events")
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionToolChoice | None = Field(
        None, description="TGI's semantics: auto lets the model answer in words instead"
    )


# ---------------------------------------------------------------------------- SageMaker


def invocation_kind(body: Any) -> str | None:
    """Which request a ``/invocations`` body is, as TGI tries them: generate, then chat, then completion."""
    if isinstance(body, dict):
        for key, kind in (("inputs", "generate"), ("messages", "chat"), ("prompt", "completion")):
            if key in body:
                return kind
    return None


class InvocationsRequest(
    RootModel[
        Annotated[
            Annotated[GenerateBody, Tag("generate")]
            | Annotated[ChatRequest, Tag("chat")]
            | Annotated[CompletionRequest, Tag("completion")],
            Discriminator(
                invocation_kind,
                custom_error_type="invocation_kind",
                custom_error_message="the body must have `inputs`, `messages` or `prompt`",
            ),
        ]
    ]
):
    """SageMaker's ``/invocations``: a ``POST /``, chat or completion body, told apart by its keys."""


# ---------------------------------------------------------------------------- the body check


def check_body(model: type[BaseModel], body: Any) -> None:
    """Validate a JSON body against ``model``; a mismatch is TGI's 422 validation error."""
    try:
        model.model_validate(body)
    except PydanticError as exc:
        raise ValidationError(_message(exc, body)) from None


def _message(exc: PydanticError, body: Any) -> str:
    """``<field path>: <pydantic message>`` of the deepest error (a union's branch that got further
    says more); the other branches' errors at that path are joined with "or"."""
    errors = [(_path(e["loc"], body, e["type"] == "missing"), e["msg"]) for e in exc.errors()]
    path = max((p for p, _ in errors), key=len)
    reasons = list(dict.fromkeys(msg for p, msg in errors if p == path))
    prefix = "Input should be "
    if len(reasons) > 1 and all(r.startswith(prefix) for r in reasons):
        reasons = [prefix + " or ".join(r.removeprefix(prefix) for r in reasons)]
    text = " or ".join(reasons)
    return f"{path}: {text}" if path else text


def _path(loc: tuple[int | str, ...], body: Any, missing: bool) -> str:
    """The error's place in the body, as ``a.b[0].c``: a union's tags in ``loc`` are left out, by
    following ``loc`` through the body itself (a missing field's name is the last step)."""
    out, node = "", body
    for i, step in enumerate(loc):
        if isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            out, node = f"{out}[{step}]", node[step]
        elif (isinstance(node, dict) and step in node) or (missing and i == len(loc) - 1):
            out = f"{out}.{step}" if out else str(step)
            node = node.get(step) if isinstance(node, dict) else None
    return out
