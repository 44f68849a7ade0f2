"""Every message that crosses a process boundary, and the msgpack codec for them.

A message is a dataclass registered with ``@message``. On the wire it is
``msgpack([PROTOCOL_VERSION, tag, field_1, field_2, ...])``; nested messages are
encoded the same way (as arrays). Decoding checks the version, the tag and the type
of every field, so a malformed or foreign frame raises ``ProtocolError`` instead of
reaching a process's logic. No pickle anywhere.

Bulk per-step tensors do not travel in these messages: ``StepRequest`` and
``StepResult`` carry only ``TensorRef`` headers that point into shared memory
(see ``tgi_zmq.transport``).

Naming rule (``tests/test_messages.py`` checks every type against it); a name says what its
receiver does with it:

- ``…Request``: a command, acted on by its receiver. Commands follow the pipeline (frontend ->
  tokenizer -> scheduler -> workers or detokenizer), except ``StopRequest`` (detokenizer -> scheduler).
- ``…Result``: the answer to one command, back to its sender (``TokenizeTextRequest`` ->
  ``TokenizeResult``, ``StepRequest`` -> ``StepResult``).
- ``…Output``: what a stage produced for requests, sent on towards the frontend. ``Batch…Output``
  covers every request of one step, as parallel lists (every field is a list).
- ``<Process><Fact>``: a notice a process sends about itself, answered by nobody (``FrontendStarted``,
  ``SchedulerStats``, ``WorkerReady``...); ``Heartbeat``, sent by every process, names no process.
- Anything else is a part: a value nested in other messages, never sent alone (``SamplingParams``,
  ``TensorRef``...).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

import msgpack

# 10: NodeJoinRequest/NodeJoinResult, RestartRanksRequest (--nnodes);
# 9: GrammarStart.rid, StepRequest.grammars the starts only, GrammarDropRequest (rank 0 holds a request's
# compiled grammar until it ends; matchers and compiles are dropped between steps, idle or not);
# 8: GrammarRequest/GrammarResult (rank 0 compiles the grammars), StepRequest.grammars a GrammarRows,
# DetokRequestInfo.prompt_ids only the prompt's tail; 7: ProfileRequest; StageTimes on DetokRequestInfo
# and RequestDelta, ScheduleRequest.tokenize_seconds;
# 6: StepRequest.grammars (the workers keep the grammar matchers); 5: logprobs, top tokens, tools, more
# sampling parameters; 4: SamplingParams.grammar; 3: the naming rule's renames, typed parts,
# max_new_tokens resolved once
PROTOCOL_VERSION = 10

_REGISTRY: dict[int, type] = {}
T = TypeVar("T")


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def message(tag: int):
    """Class decorator: make a dataclass a wire message with a unique integer tag."""

    def wrap(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(slots=True)(cls)
        if tag in _REGISTRY:
            raise TypeError(f"message tag {tag} used twice ({_REGISTRY[tag].__name__}, {cls.__name__})")
        cls.TAG = tag
        hints = typing.get_type_hints(cls)
        cls._FIELDS = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        cls._CHECKS = tuple(_checker(hint) for _, hint in cls._FIELDS)
        cls._WHERE = tuple(f"{cls.__name__}.{name}" for name, _ in cls._FIELDS)  # for errors
        cls._NAMES = tuple(name for name, _ in cls._FIELDS)
        cls._NESTED = tuple(i for i, (_, hint) in enumerate(cls._FIELDS) if _holds_messages(hint))
        _REGISTRY[tag] = cls
        return cls

    return wrap


# ---------------------------------------------------------------------------- codec
#
# Each field's check is built once, from its type hint, when its message is registered; a list of
# scalars (token ids, logprobs, texts) is checked in one pass over its items' types (``_list_of``), so
# a 32k-token prompt or a 128-row step costs a fraction of a millisecond (docs/benchmarks.md, issue 20).

Check = Callable[[Any, str], Any]  # (value, where) -> the value, rebuilt where needed


def _to_wire(value: Any) -> Any:
    if hasattr(value, "TAG"):
        fields = [getattr(value, name) for name in value._NAMES]
        for i in value._NESTED:  # only the fields that may hold messages are walked
            fields[i] = _to_wire(fields[i])
        return [value.TAG, *fields]
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Any) -> bytes:
    """Serialise one message to bytes."""
    return msgpack.packb([PROTOCOL_VERSION, *_to_wire(msg)], use_bin_type=True)


def decode(frame: bytes, expected: type[T] | tuple[type, ...] | None = None) -> T:
    """Parse and validate one frame; ``expected`` restricts the accepted message types."""
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProtocolError("a message is an array [version, tag, fields...]")
    if raw[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {raw[0]!r}, expected {PROTOCOL_VERSION}")
    msg = _from_wire(raw[1:], "message")
    if expected is not None and not isinstance(msg, expected):
        raise ProtocolError(f"unexpected message {type(msg).__name__}")
    return msg


def _from_wire(raw: Any, where: str) -> Any:
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], int):
        raise ProtocolError(f"{where}: expected a tagged array")
    cls = _REGISTRY.get(raw[0])
    if cls is None:
        raise ProtocolError(f"{where}: unknown message tag {raw[0]}")
    fields = cls._FIELDS
    if len(raw) - 1 != len(fields):
        raise ProtocolError(f"{cls.__name__}: {len(raw) - 1} fields, expected {len(fields)}")
    return cls(*(check(v, where) for v, check, where in zip(raw[1:], cls._CHECKS, cls._WHERE, strict=True)))


def _holds_messages(hint: Any) -> bool:
    """A value of ``hint`` may contain messages (so encoding must walk it)."""
    return hasattr(hint, "TAG") or any(_holds_messages(arg) for arg in typing.get_args(hint))


# Scalar hints whose values msgpack decodes to exactly that type (an int where a float is expected is
# converted, item by item).
_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})


def _checker(hint: Any) -> Check:
    """The check of a value against a type hint, rebuilding nested messages."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (Union, types.UnionType):
        return _union(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return _list_of(item, _checker(item))
    if origin is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return _dict_of(_checker(key_t), _checker(val_t))
    if hasattr(hint, "TAG"):
        return _nested(hint)
    return _scalar(hint)


def _union(hint: Any) -> Check:
    """``X | None`` takes None at once; otherwise the first option that accepts the value."""
    args = typing.get_args(hint)
    none_ok = type(None) in args
    options = [_checker(option) for option in args if option is not type(None)]

    def check(value: Any, where: str) -> Any:
        if value is None and none_ok:
            return None
        for option in options:
            try:
                return option(value, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: {value!r:.80} matches none of {hint}")

    return check


def _list_of(item: Any, check_item: Check) -> Check:
    """A list's check: one pass over its items' types when they are scalars of the exact wire types."""
    options = typing.get_args(item) if typing.get_origin(item) in (Union, types.UnionType) else (item,)
    exact = frozenset(options) if _SCALARS.issuperset(options) else None

    def check(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        if exact is not None and exact.issuperset(map(type, value)):
            return value
        return [check_item(v, f"{where}[]") for v in value]

    return check


def _dict_of(check_key: Check, check_value: Check) -> Check:
    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        return {check_key(k, where): check_value(v, where) for k, v in value.items()}

    return check


def _nested(cls: type) -> Check:
    def check(value: Any, where: str) -> Any:
        msg = _from_wire(value, where)
        if not isinstance(msg, cls):
            raise ProtocolError(f"{where}: expected {cls.__name__}")
        return msg

    return check


def _scalar(hint: type) -> Check:
    if hint is type(None):

        def check_none(value: Any, where: str) -> None:
            if value is not None:
                raise ProtocolError(f"{where}: expected None")

        return check_none
    if hint is float:

        def check_float(value: Any, where: str) -> float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise ProtocolError(f"{where}: expected a float")

        return check_float

    def check(value: Any, where: str) -> Any:
        if type(value) is hint:
            return value
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value

    return check


# ---------------------------------------------------------------------------- requests


@message(tag=19)
class Grammar:
    """A constraint on the output: ``kind`` "json" (``value`` a JSON schema, as JSON text) or "regex"."""

    kind: str
    value: str


@message(tag=28)
class TokenBias:
    """A bias added to one token's logit (OpenAI's ``logit_bias``; -inf bans the token)."""

    token: int
    bias: float


@message(tag=1)
class SamplingParams:
    """How to pick each token and when to stop, after validation and defaulting (see
    ``tgi_zmq.validation``). How many tokens to generate is not here: the frontend asks for it
    (``GenerateRequest.max_new_tokens``), the tokenizer resolves it (``ScheduleRequest``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # set for sampled requests, None for greedy
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    truncate: int | None = None  # keep only the prompt's last ``truncate`` tokens (the tokenizer does)
    grammar: Grammar | None = None  # structured output (``tgi_zmq.grammar``)
    typical_p: float = 1.0  # 1.0 = off
    watermark: bool = False  # Kirchenbauer's green-list bias (``--watermark-gamma/-delta``)
    logit_bias: list[TokenBias] = dataclasses.field(default_factory=list)
    min_tokens: int = 0  # EOS and ``stop_token_ids`` are banned before this many tokens
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # finish like EOS
    top_n_tokens: int = 0  # also return the n most likely tokens at each step
    prompt_logprobs: bool = False  # also return each prompt token's logprob (no prefix cache)

    @property
    def penalised(self) -> bool:
        """Its logits depend on the counts of the tokens so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


@message(tag=2)
class GenerateRequest:
    """frontend -> tokenizer: one generation, given as a prompt or as chat messages."""

    rid: str
    prompt: str | None
    chat: list[dict[str, str]] | None  # [{"role", "content"}], as ``validation.chat_messages`` made them
    params: SamplingParams
    max_new_tokens: int | None  # as the client asked; None = up to max_total_tokens
    arrival_time: float
    # A replay after a fault: the prompt as tokenized the first time, and the tokens already streamed.
    prompt_ids: list[int] | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    # Chat only: OpenAI ``tools`` (function definitions) for the template, and TGI's ``tool_prompt``.
    tools: list[dict[str, Any]] | None = None
    tool_prompt: str | None = None


@message(tag=3)
class TokenizeTextRequest:
    """frontend -> tokenizer: the /tokenize route."""

    rid: str
    prompt: str


@message(tag=17)
class TokenSpan:
    """One token of a /tokenize answer: its id and where its text lies in the input."""

    id: int
    text: str
    start: int  # character offsets into the input: ``text == input[start:stop]``
    stop: int


@message(tag=4)
class TokenizeResult:
    """tokenizer -> frontend: the answer to a ``TokenizeTextRequest``, one span per token."""

    rid: str
    tokens: list[TokenSpan]


@message(tag=29)
class ChatTokenizeRequest:
    """frontend -> tokenizer: the /chat_tokenize route (render the chat template, tokenize it)."""

    rid: str
    chat: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_prompt: str | None


@message(tag=30)
class ChatTokenizeResult:
    """tokenizer -> frontend: the answer to a ``ChatTokenizeRequest``."""

    rid: str
    templated_text: str
    tokens: list[TokenSpan]


@message(tag=15)
class PromptIdsOutput:
    """tokenizer -> frontend: a request's prompt as tokenized, kept to replay it after a fault."""

    rid: str
    input_ids: list[int]


@message(tag=16)
class FrontendStarted:
    """frontend -> tokenizer -> scheduler -> detokenizer: a (new) frontend owns no request yet, so
    every request in the pipeline belongs to a dead frontend's clients: forget them all."""

    boot_id: str


@message(tag=5)
class AbortRequest:
    """frontend -> tokenizer -> scheduler -> detokenizer: forget this request, free its pages.

    It takes the same road as the request itself, not a shortcut to the scheduler: each hop is one
    ordered pipe, so an abort always arrives after its request (and, at the detokenizer, after the
    tokens already sent). Sent straight to the scheduler, it could overtake a request still in the
    tokenizer, find nothing to abort, and the request would then run for nobody."""

    rid: str


@message(tag=6)
class ScheduleRequest:
    """tokenizer -> scheduler: a validated, tokenized request ready to be scheduled."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # resolved by the tokenizer (``validation.check_lengths``): the limit to obey
    arrival_time: float
    output_ids: list[int] = dataclasses.field(default_factory=list)  # already generated (a replay)
    tokenize_seconds: float = 0.0  # the tokenizer process's time on it (the ``tokenize`` stage)


@message(tag=7)
class ErrorOutput:
    """any process -> frontend: the request failed; ``status`` is the HTTP code to answer with.

    Built from a ``validation.RequestError`` (``RequestError.output``, ``generation_error``), so
    ``message`` is the text of the response's ``error`` field, TGI's prefix included."""

    rid: str
    message: str
    error_type: str
    status: int


# ---------------------------------------------------------------------------- outputs


@message(tag=33)
class StageTimes:
    """Seconds a request spent in each stage of the pipeline, measured where it happens, for
    ``tgi_request_stage_duration{stage}``. The scheduler fills the first four at the request's first
    token (``decode`` 0 then); the detokenizer closes ``decode`` and adds its own time at the last."""

    tokenize: float  # in the tokenizer process (chat template, tokenization, checks)
    queue: float  # from its arrival at the scheduler to its first scheduled step
    prefill: float  # from its first scheduled step to its first token
    decode: float  # from its first token to its last
    detokenize: float  # in the detokenizer, over all its tokens


@message(tag=8)
class DetokRequestInfo:
    """scheduler -> detokenizer, with a request's first tokens: what the detokenizer needs to know."""

    rid: str
    # The prompt's last ids (``textstream.PROMPT_TAIL``), so the first word's spacing decodes right; the
    # whole prompt if its logprobs are asked; [] for seq2seq, whose output is decoded on its own.
    prompt_ids: list[int]
    prompt_tokens: int
    stop: list[str]
    output_ids: list[int] = dataclasses.field(default_factory=list)  # a replay's earlier tokens, not re-sent
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)  # if asked; first: None
    stages: StageTimes | None = None  # up to its first token
    first_token_time: float = 0.0  # time.time() when the scheduler got its first token


@message(tag=27)
class TokenList:
    """Tokens with their text and logprob (None where there is none): a step's top tokens, a prompt."""

    ids: list[int]
    texts: list[str]
    logprobs: list[float | None]
    specials: list[bool]


@message(tag=9)
class BatchTokenOutput:
    """scheduler -> detokenizer: the tokens sampled in one step (parallel lists)."""

    new_requests: list[DetokRequestInfo]
    rids: list[str]
    token_ids: list[int]
    logprobs: list[float]
    finish_reasons: list[str | None]  # "length" | "eos_token" | None
    # Per token, the most likely tokens and their logprobs: [] when no request of the step asked
    # (``top_n_tokens``), else parallel to ``rids`` ([] for a request that did not ask).
    top_ids: list[list[int]] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[float]] = dataclasses.field(default_factory=list)


@message(tag=10)
class RequestDelta:
    """What one request gained in one step, ready for the HTTP layer."""

    rid: str
    token_ids: list[int]
    token_texts: list[str]
    logprobs: list[float]
    specials: list[bool]
    text: str  # visible text added by these tokens (special tokens skipped)
    finish_reason: str | None  # "length" | "eos_token" | "stop_sequence" | None
    generated_tokens: int
    prompt_tokens: int
    top_tokens: list[TokenList] = dataclasses.field(default_factory=list)  # per token, if asked
    prompt: TokenList | None = None  # the prompt's tokens and logprobs, on the first delta, if asked
    stages: StageTimes | None = None  # on the last delta: where the request spent its time


@message(tag=11)
class BatchTextOutput:
    """detokenizer -> frontend: every request's delta for one step."""

    deltas: list[RequestDelta]


@message(tag=12)
class StopRequest:
    """detokenizer -> scheduler: a stop sequence matched; finish the request and free its pages."""

    rid: str


@message(tag=32)
class ProfileRequest:
    """frontend -> tokenizer -> scheduler -> every worker (or ``scripts/profile`` -> scheduler): start
    or stop recording the workers' steps with torch.profiler; on "stop" each worker writes
    ``<directory>/worker-<rank>-<time>.trace.json`` (``tgi_zmq.profiling``)."""

    action: str  # "start" | "stop"
    directory: str


@message(tag=13)
class Heartbeat:
    """every process -> frontend, twice a second: who is alive and ready (drives /health)."""

    process: str
    boot_id: str
    pid: int
    ready: bool


@message(tag=18)
class ForwardTiming:
    """One step, for ``tgi_batch_forward_duration{method}`` and TGI's other batch metrics."""

    method: str  # "prefill" | "decode"
    seconds: float  # in the worker: the whole step
    decode_seconds: float = 0.0  # in the worker: after the forward (sampling: TGI's "decode")
    inference_seconds: float = 0.0  # in the scheduler: from its launch to its result
    admitted: int = 0  # requests it took in from the queue (tgi_batch_next_size)


@message(tag=14)
class SchedulerStats:
    """scheduler -> frontend, twice a second: gauges now, and what happened since the last one.

    The frontend turns these into Prometheus metrics (``/metrics``).
    """

    queue_size: int  # requests waiting for their first step
    batch_size: int  # requests running
    kv_blocks_used: int  # held by requests or by the prefix cache
    kv_blocks_cached: int  # of those, held only by the prefix cache
    kv_blocks_total: int
    max_batch_total_tokens: int
    prefix_cache_hit_tokens: int  # since the last stats message
    prefix_cache_query_tokens: int  # prompt tokens looked up in the prefix cache, since the last message
    preemptions: int  # since the last stats message
    queue_seconds: list[float]  # per request admitted since the last message: arrival -> first step
    forward_seconds: list[ForwardTiming]  # per step since the last message
    generated_tokens: int  # since the last message
    interval_seconds: float  # since the last message (0: the first)
    batch_max_tokens: int = 0  # the tokens the running requests may grow to (prompt + max_new_tokens)


# ---------------------------------------------------------------------------- scheduler <-> worker


@message(tag=20)
class TensorRef:
    """Where one tensor lies in a shared buffer (bytes never travel on the socket)."""

    name: str
    dtype: str
    shape: list[int]
    offset: int


# A CUDA IPC handle is torch's own tuple (``storage._share_cuda_()``: ints, bytes and bools, whose
# layout torch may change between versions): it is passed through untouched, so it stays ``list[Any]``.
CudaHandle = list[Any]


@message(tag=31)
class GrammarStart:
    """A request's grammar, sent to the worker that samples (rank 0) in the first step that samples for
    it in its state row: the worker's matcher for that row starts there, past ``output_ids`` (the
    tokens generated so far: a replay or a recompute resumes its grammar where it was)."""

    rid: str
    row: int  # the request's state row
    grammar: Grammar
    output_ids: list[int]


@message(tag=21)
class StepRequest:
    """scheduler -> every worker: run one forward pass over the tensors in ``buffer``.

    ``grammars`` travel here, not in shared memory: a grammar's text can be megabytes, sent once."""

    step_id: int
    scheduler_boot: str  # a worker answers with it, so a new scheduler ignores its predecessor's steps
    buffer: str
    tensors: list[TensorRef]
    cuda_handle: CudaHandle | None  # of ``buffer`` on GPU; None for shared memory
    grammars: list[GrammarStart] = dataclasses.field(default_factory=list)  # rank 0's only


@message(tag=35)
class GrammarRequest:
    """scheduler -> worker rank 0 (the one that samples), when a request with a grammar arrives, and again
    for every such request after the workers restarted: compile it (off the worker's loop) and say so.
    The request runs only once it is compiled."""

    rid: str
    grammar: Grammar


@message(tag=34)
class GrammarDropRequest:
    """scheduler -> worker rank 0, before the next step (or at once when idle): drop the matchers of the
    state ``rows`` whose requests left them, and the compiles held for the requests ``rids`` that ended."""

    rows: list[int]
    rids: list[str]


@message(tag=36)
class GrammarResult:
    """worker rank 0 -> scheduler: a ``GrammarRequest``'s grammar is compiled (``refusal`` "") or refused
    (the engine's reason, or a compile past ``--grammar-compile-timeout``: the request's 422)."""

    rid: str
    boot_id: str  # the worker's: an answer from a process already replaced is ignored
    refusal: str


@message(tag=22)
class StepResult:
    """worker rank 0 -> scheduler: the sampled ids and logprobs of a step, in ``buffer``."""

    step_id: int
    scheduler_boot: str
    buffer: str
    tensors: list[TensorRef]
    cuda_handle: CudaHandle | None
    forward_seconds: float  # the whole step, in the worker
    decode_seconds: float = 0.0  # of which after the forward: sampling (TGI's "decode")


@message(tag=23)
class WorkerReady:
    """worker -> scheduler when the model is loaded and the KV pages are allocated, and again every
    second while idle, so a restarted scheduler learns which workers are up (their KV cache holds
    nothing it knows of: it starts with an empty prefix cache)."""

    rank: int
    boot_id: str
    pid: int
    num_blocks: int


@message(tag=24)
class WorkerFailure:
    """worker -> scheduler: a step raised (``message`` is for the log; clients get a short one)."""

    step_id: int
    scheduler_boot: str
    boot_id: str  # the worker's: a report from a process already replaced is ignored
    message: str


@message(tag=25)
class WorkerBooting:
    """worker -> scheduler as soon as it starts (before loading): a new ``boot_id`` for a rank
    means the old process is gone, and with tensor parallelism its whole group must restart."""

    rank: int
    boot_id: str
    pid: int


@message(tag=37)
class NodeJoinRequest:
    """another node's launcher -> node 0's scheduler (``--nnodes``): send me your configuration.
    ``reply_to`` is the asking socket's identity."""

    node_rank: int
    reply_to: str


@message(tag=38)
class NodeJoinResult:
    """node 0's scheduler -> a joining node's launcher: node 0's ``ServerConfig`` as JSON."""

    config: str


@message(tag=39)
class RestartRanksRequest:
    """node 0's scheduler -> another node's agent: kill this node's ranks but ``spare`` (-1: none; a
    rank restarting already), which its supervisord restarts, as node 0 kills its own when the group
    must restart (the scheduler logs why)."""

    spare: int
