"""Pydantic models of the HTTP API's bodies: the source of the body check and of the OpenAPI document.

Request models are type-level only (JSON types, required fields, the enums of ``type`` tags): value
rules and TGI's exact messages stay in ``tgi_zmq.validation``, which the handlers still run on the
plain dict. Their fields are nullable where a handler treats null as omitted. Unknown fields are
ignored, as TGI does. Response models document what the handlers write; they are never built.
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


class _Out(BaseModel):
    """A response body (documentation only)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- shared parts


class Grammar(_Body):
    """TGI's structured output: a JSON schema or a regular expression the output must match."""

    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = Field(
        description="A JSON schema (object or JSON text) for `json`, a regex string for `regex`"
    )


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: Any = Field(None, alias="schema", description="The JSON schema the output must match")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format`` (text, json_object, json_schema) or TGI's grammar form (json, regex)."""

    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: JsonSchemaFormat | None = None
    value: Any = Field(None, description="TGI's form: the grammar's value")


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


class GenerateRequest(_Body):
    """``/generate``, ``/generate_stream``, ``POST /`` and ``/tokenize``."""

    inputs: str = Field(description="The prompt")
    parameters: GenerateParameters | None = None
    stream: bool | None = Field(None, description="`POST /` only: answer with Server-Sent Events")


TokenizeRequest = GenerateRequest  # TGI's /tokenize takes a GenerateRequest (parameters are ignored)


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


ChatTokenizeRequest = ChatRequest  # TGI's /chat_tokenize takes a ChatRequest


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
            Annotated[GenerateRequest, Tag("generate")]
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


# ---------------------------------------------------------------------------- TGI responses


class Token(_Out):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(_Out):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(_Out):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(_Out):
    finish_reason: str = Field(description="length, eos_token or stop_sequence")
    generated_tokens: int
    seed: int | None = Field(description="null when greedy")
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(_Out):
    generated_text: str
    details: Details | None = None


class CompatGenerateResponse(RootModel[list[GenerateResponse]]):
    """``POST /`` without streaming: one GenerateResponse in an array."""


class StreamDetails(_Out):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(_Out):
    """One ``/generate_stream`` event; the last carries the text and the details."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    details: StreamDetails | None


class ErrorResponse(_Out):
    error: str
    error_type: str


class SimpleToken(_Out):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(RootModel[list[SimpleToken]]):
    """The prompt's tokens and where their text lies in it."""


class ChatTokenizeResponse(_Out):
    tokenize_response: list[SimpleToken]
    templated_text: str = Field(description="The prompt the chat template made")


class ProfileResponse(_Out):
    directory: str = Field(description="--profile-dir, where the workers write their traces")
    traces: list[str] = Field(
        default_factory=list,
        description="/stop_profile: the traces written (worker-<rank>-<time>.trace.json) that appeared "
        "within its wait",
    )


class Info(_Out):
    model_id: str
    model_sha: str | None
    model_dtype: str | None = None
    model_device_type: str | None = None
    quantize: str | None = Field(None, description="--quantize in use; gguf: a GGUF file's own blocks")
    kv_cache_dtype: str | None = None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None


# ---------------------------------------------------------------------------- OpenAI responses


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float


class TokenLogprob(_Out):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class OutputToolCall(_Out):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: dict[str, Any]


class ChatCompletionMessage(_Out):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[OutputToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None = Field(description="stop (EOS), length or stop_sequence")


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: str | None = None
    content: str | None = None
    tool_calls: list[OutputToolCall] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Out):
    """One ``/v1/chat/completions`` event (the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None


class Completion(_Out):
    """A ``/v1/completions`` answer; each streamed event has the same shape (one choice)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class InvocationsResponse(RootModel[CompatGenerateResponse | ChatCompletion | Completion]):
    """What the route that the body picked answers."""


# ---------------------------------------------------------------------------- Responses API responses


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(_Out):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(_Out):
    """A call of one of the request's tools."""

    type: Literal["function_call"]
    id: str = Field(description="fc_<hex>")
    call_id: str = Field(description="call_<hex>: a function_call_output answers it")
    name: str
    arguments: str = Field(description="JSON text")
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"]


class ResponseError(_Out):
    code: str
    message: str


class InputTokensDetails(_Out):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(_Out):
    reasoning_tokens: int


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(_Out):
    """A Responses API ``response``."""

    id: str = Field(description="resp_<hex>")
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None
    incomplete_details: IncompleteDetails | None
    error: ResponseError | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    parallel_tool_calls: bool
    tool_choice: Literal["auto", "none", "required"] | FunctionToolChoice
    tools: list[FunctionTool]
    text: dict[str, Any]


class ResponseStreamEvent(_Out):
    """One ``/v1/responses`` event; its ``event:`` name is its ``type``: response.created,
    response.in_progress, then the output item: response.output_item.added,
    response.content_part.added, response.output_text.delta, response.output_text.done,
    response.content_part.done, response.output_item.done for a message;
    response.output_item.added, response.function_call_arguments.delta,
    response.function_call_arguments.done, response.output_item.done for a function call; then
    response.completed or response.incomplete (error and response.failed on a failure)."""

    type: str
    sequence_number: int


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
