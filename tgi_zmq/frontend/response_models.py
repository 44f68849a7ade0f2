"""Pydantic models of the HTTP API's response bodies and stream events: documentation only (the
OpenAPI document's response schemas), never built. The handlers write plain dicts of these shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from .request_models import FunctionTool, FunctionToolChoice


class _Out(BaseModel):
    """A response body (documentation only)."""

    model_config = ConfigDict(extra="allow")


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
    kernels: str | None = Field(
        None,
        description="the CPU kernels that serve: native avx512 | native avx2 | torch fallback | torch cuda",
    )
    deterministic: bool = Field(
        False,
        description="batch-invariant steps (--deterministic): a request's tokens do not depend on its batch",
    )
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


class SchedulerLoad(_Out):
    """One rank's load as SGLang's ``/v1/loads`` gives it, in the types SMG reads."""

    dp_rank: int
    num_running_reqs: int
    num_waiting_reqs: int
    num_total_reqs: int
    num_used_tokens: int  # KV tokens held by requests (not those only the prefix cache keeps)
    max_total_num_tokens: int
    token_usage: float  # 0-1
    gen_throughput: float  # tokens/s
    cache_hit_rate: float  # prompt tokens found in the prefix cache / looked up, since the start
    utilization: float
    max_running_requests: int


class Loads(_Out):
    timestamp: str
    dp_rank_count: int
    loads: list[SchedulerLoad]


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
