"""Request validation: TGI's parameter rules and messages, as pure functions (no I/O).

The HTTP frontend turns request bodies into ``GenerationParams`` with these functions; the
tokenizer process calls ``check_lengths`` once it knows the prompt's token count. Every
rejection is a ``RequestError`` (``tgi_zmq.errors``) carrying the HTTP status and TGI
``error_type`` to answer with; ``ValidationError`` is TGI's 422 ``Input validation error: ...``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Mapping
from typing import Any, NamedTuple

from tgi_zmq.config import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.messages import Grammar, SamplingParams, TokenBias


class GenerationParams(NamedTuple):
    """A generation's parameters as the client asked for them."""

    sampling: SamplingParams
    max_new_tokens: int | None  # None = up to max_total_tokens (the tokenizer resolves it)


# ---------------------------------------------------------------------------- typed field readers


def _float(obj: Mapping[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a number. Given: {value!r:.60}")
    return float(value)


def _int(obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"`{name}` must be an integer. Given: {value!r:.60}")
    return value


def _uint(obj: Mapping[str, Any], name: str) -> int | None:
    value = _int(obj, name)
    if value is not None and value < 0:
        raise ValidationError(f"`{name}` must be a non-negative integer. Given: {value}")
    return value


def bool_field(obj: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field; absent or null gives ``default``."""
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean. Given: {value!r:.60}")
    return value


def _int_list(obj: Mapping[str, Any], name: str) -> list[int]:
    value = obj.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValidationError(f"`{name}` must be a list of integers")
    return value


def _str_list(obj: Mapping[str, Any], name: str, *, allow_str: bool = False) -> list[str]:
    value = obj.get(name)
    if value is None:
        return []
    if allow_str and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"`{name}` must be a list of strings")
    return value


# ---------------------------------------------------------------------------- shared rules


def _check_ranges(
    *,
    temperature: float | None,
    repetition_penalty: float | None,
    frequency_penalty: float | None,
    top_p: float | None,
    typical_p: float | None,
    top_k: int | None,
    max_new_tokens: int | None,
    stop: list[str],
    max_stop_sequences: int,
) -> None:
    """TGI's router checks, in the router's order and with its messages."""
    if temperature is not None and temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    if repetition_penalty is not None and repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if frequency_penalty is not None and not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if typical_p is not None and not 0.0 < typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if top_k is not None and top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(stop) > max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {len(stop)}"
        )


def _seed(seed: int | None, sampling: bool) -> int | None:
    """Greedy requests carry no seed; sampled ones always do (random when not given)."""
    if not sampling:
        return None
    if seed is None:
        return random.getrandbits(63)
    if seed >= 2**64:
        raise ValidationError(f"`seed` must be < 2^64. Given: {seed}")
    return seed


GRAMMAR_KINDS = ("json", "json_object", "json_schema", "regex")


def grammar(value: Any, name: str = "grammar") -> Grammar | None:
    """TGI's ``GrammarType`` (serde's tag + content: ``{"type": ..., "value": ...}``): ``json`` (alias
    ``json_object``) with a JSON schema (an object or its JSON text), ``json_schema`` with ``{"name"?,
    "schema"}``, or ``regex`` with a regular expression (the engine checks that it compiles:
    ``tgi_zmq.grammar``, on the worker that samples). ``name``: the field, for the messages."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in GRAMMAR_KINDS or "value" not in value:
        raise ValidationError(f'`{name}` must be {{"type": "json", "json_schema" or "regex", "value": ...}}')
    kind, body = value["type"], value["value"]
    if kind == "regex":
        if not isinstance(body, str):
            raise ValidationError("a regex grammar's `value` must be a string")
        return Grammar("regex", body)
    if kind == "json_schema":
        if not isinstance(body, dict) or "schema" not in body:
            raise ValidationError('a json_schema grammar\'s `value` must be {"name": ..., "schema": {...}}')
        body = body["schema"]
    return _json_schema(body)


def _json_schema(schema: Any) -> Grammar:
    """A JSON-schema grammar of a schema given as an object (or ``true``/``false``) or as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"a json grammar's `value` is not JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise ValidationError("a json grammar's `value` must be a JSON schema (an object)")
    return Grammar("json", json.dumps(schema))


# ---------------------------------------------------------------------------- /generate family


class Limits(NamedTuple):
    """The service's per-request bounds that validation checks (from ``ServerConfig``)."""

    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_input_tokens: int | None = None  # checks ``truncate`` before tokenizing, as TGI


def generate_params(
    parameters: dict[str, Any] | None, limits: Limits = Limits(), *, stream: bool = False
) -> GenerationParams:
    """``parameters`` of ``/generate``, ``/generate_stream`` and ``POST /`` (None = omitted).

    ``best_of`` is checked here (the frontend runs that many copies, ``best_of``); ``truncate``'s
    upper bound is checked again after tokenizing (``check_lengths``) in any case.
    """
    omitted = parameters is None
    p: dict[str, Any] = {} if omitted else parameters
    if not isinstance(p, dict):
        raise ValidationError("`parameters` must be an object")
    temperature, top_p, typical_p = _float(p, "temperature"), _float(p, "top_p"), _float(p, "typical_p")
    top_k, max_new_tokens = _int(p, "top_k"), _int(p, "max_new_tokens")
    repetition_penalty, frequency_penalty = _float(p, "repetition_penalty"), _float(p, "frequency_penalty")
    stop, seed, truncate = _str_list(p, "stop"), _uint(p, "seed"), _uint(p, "truncate")
    for name in ("details", "return_full_text"):
        bool_field(p, name, False)  # type check only: the frontend reads them
    _check_ranges(
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        top_p=top_p,
        typical_p=typical_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop=stop,
        max_stop_sequences=limits.max_stop_sequences,
    )
    top_n_tokens = _top_n(_uint(p, "top_n_tokens"), limits.max_top_n_tokens, "top_n_tokens")
    _check_truncate(truncate, limits.max_input_tokens)
    # Mirror the shard's NextTokenChooser: any warper turns sampling on.
    sampling = (
        bool_field(p, "do_sample", omitted)
        or (temperature is not None and temperature != 1.0)
        or bool(top_k)
        or (top_p is not None and top_p < 1.0)
        or (typical_p is not None and typical_p < 1.0)
    )
    _check_best_of(_uint(p, "best_of"), sampling=sampling, seed=seed, stream=stream, limit=limits.max_best_of)
    if stream and bool_field(p, "decoder_input_details", False):
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    sampling_params = SamplingParams(
        do_sample=sampling,
        temperature=1.0 if temperature is None else temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        typical_p=1.0 if typical_p is None else typical_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency_penalty or 0.0,
        seed=_seed(seed, sampling),
        stop=stop,
        truncate=truncate,
        grammar=grammar(p.get("grammar")),
        watermark=bool_field(p, "watermark", False),
        top_n_tokens=top_n_tokens,
        prompt_logprobs=bool_field(p, "decoder_input_details", False),  # the route drops it unless enabled
        **_extensions(p),
    )
    return GenerationParams(sampling_params, max_new_tokens)


def _extensions(p: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's parameters we take on every route: ``ignore_eos``, ``min_tokens``, ``stop_token_ids``."""
    min_tokens = _uint(p, "min_tokens") or 0
    stop_token_ids = _int_list(p, "stop_token_ids")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValidationError(
            f"`stop_token_ids` supports up to {MAX_STOP_TOKEN_IDS} tokens. Given: {len(stop_token_ids)}"
        )
    return {
        "ignore_eos": bool_field(p, "ignore_eos", False),
        "min_tokens": min_tokens,
        "stop_token_ids": stop_token_ids,
    }


def _top_n(value: int | None, limit: int, name: str) -> int:
    if value is not None and value > limit:
        raise ValidationError(f"`{name}` must be >= 0 and <= {limit}. Given: {value}")
    return value or 0


def _check_best_of(
    best_of: int | None, *, sampling: bool, seed: int | None, stream: bool, limit: int
) -> None:
    """TGI's ``best_of`` rules, in its order."""
    if best_of is None or best_of == 1:
        return
    if limit == 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of == 0 or best_of > limit:
        raise ValidationError(f"`best_of` must be > 0 and <= {limit}. Given: {best_of}")
    if not sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")


def best_of(parameters: Mapping[str, Any] | None) -> int:
    """How many copies a ``/generate`` request runs (validated by ``generate_params``)."""
    return (parameters or {}).get("best_of") or 1


def _check_truncate(truncate: int | None, max_input_tokens: int | None) -> None:
    if truncate is None:
        return
    if truncate == 0 or (max_input_tokens is not None and truncate > max_input_tokens):
        bound = "" if max_input_tokens is None else f" and less than {max_input_tokens}"
        raise ValidationError(f"`truncate` must be strictly positive{bound}. Given: {truncate}")


def generate_inputs(body: Mapping[str, Any]) -> str:
    """The ``inputs`` prompt of a ``/generate``-family body."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    return inputs


# ---------------------------------------------------------------------------- OpenAI routes


def _openai_params(
    body: Mapping[str, Any], *, max_stop_sequences: int, repetition_penalty: float | None
) -> GenerationParams:
    """Rules shared by chat and completions: temperature 0 means greedy, anything else samples."""
    temperature = _float(body, "temperature")
    max_tokens = _int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_completion_tokens")
    top_p, frequency_penalty = _float(body, "top_p"), _float(body, "frequency_penalty")
    stop = _str_list(body, "stop", allow_str=True)
    greedy = temperature == 0.0
    temperature = None if greedy else temperature
    _check_ranges(
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        top_p=top_p,
        typical_p=None,
        top_k=None,
        max_new_tokens=max_tokens,
        stop=stop,
        max_stop_sequences=max_stop_sequences,
    )
    sampling_params = SamplingParams(
        do_sample=not greedy,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency_penalty or 0.0,
        seed=_seed(_uint(body, "seed"), not greedy),
        stop=stop,
        logit_bias=_logit_bias(body.get("logit_bias")),
        **_extensions(body),
    )
    return GenerationParams(sampling_params, max_tokens)


def choices(body: Mapping[str, Any], limit: int) -> int:
    """OpenAI's ``n``: how many choices to generate for each prompt (at most ``--max-best-of``)."""
    n = _int(body, "n")
    if n is not None and not 0 < n <= limit:
        raise ValidationError(f"`n` must be > 0 and <= {limit}. Given: {n}")
    return n or 1


def copy_seed(params: SamplingParams, copy: int) -> SamplingParams:
    """The parameters of choice ``copy`` of several (``n``, ``best_of``): a given seed moves on by
    one per copy, so each copy is reproducible and they differ; without one each draws its own."""
    if copy == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + copy) % 2**64)


def _logit_bias(value: Any) -> list[TokenBias]:
    """OpenAI's ``logit_bias``: ``{"<token id>": bias in [-100, 100]}`` (TGI's list form is ignored)."""
    if value is None or isinstance(value, list):
        return []
    if not isinstance(value, dict):
        raise ValidationError("`logit_bias` must map token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValidationError(f"`logit_bias` supports up to {MAX_LOGIT_BIAS} tokens. Given: {len(value)}")
    biases = []
    for key, bias in value.items():
        if not key.isdigit() or len(key) > 9 or isinstance(bias, bool) or not isinstance(bias, int | float):
            raise ValidationError(
                f"`logit_bias` must map token ids to numbers. Given: {key!r:.20}: {bias!r:.20}"
            )
        if not -100 <= bias <= 100:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {bias}")
        biases.append(TokenBias(int(key), float(bias)))
    return biases


def _repetition_penalty(body: Mapping[str, Any]) -> float | None:
    """``repetition_penalty`` (vLLM extension) wins; else a nonzero ``presence_penalty``.

    TGI maps ``presence_penalty`` to ``repetition_penalty = presence_penalty + 2.0`` even when it is
    0.0 (turning a neutral OpenAI default into a strong penalty). We ignore 0.0 and map any other
    value exactly like TGI, so -2.0 is refused as a non-positive repetition penalty.
    """
    penalty = _float(body, "repetition_penalty")
    presence = _float(body, "presence_penalty")
    if penalty is None and presence:
        penalty = presence + 2.0
    return penalty


def chat_params(
    body: Mapping[str, Any],
    *,
    max_stop_sequences: int,
    tool_grammar: Grammar | None = None,
    max_top_n_tokens: int = 5,
) -> GenerationParams:
    """Sampling parameters of a ``/v1/chat/completions`` body; ``tool_grammar`` is the grammar of
    the tools in effect (``tgi_zmq.tools.chat_tools``), if any. ``top_logprobs`` (with
    ``logprobs``) asks for the most likely tokens, as TGI's ``top_n_tokens``."""
    logprobs = bool_field(body, "logprobs", False)
    top_logprobs = _top_n(_uint(body, "top_logprobs"), max_top_n_tokens, "top_logprobs")
    if top_logprobs and not logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs` set to true")
    params = _openai_params(
        body, max_stop_sequences=max_stop_sequences, repetition_penalty=_repetition_penalty(body)
    )
    params.sampling.grammar = _chat_grammar(_response_format(body.get("response_format")), tool_grammar)
    params.sampling.top_n_tokens = top_logprobs
    return params


def _response_format(fmt: Any) -> Grammar | None:
    """OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema`` with its schema under
    ``json_schema``) or TGI's, a grammar (``{"type", "value"}``: ``grammar``'s forms)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object" and "value" not in fmt:  # OpenAI's: any JSON object
        return Grammar("json", '{"type": "object"}')
    if kind == "json_schema" and "value" not in fmt:  # OpenAI's form
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise ValidationError("`response_format.json_schema` must be an object with a `schema`")
        return Grammar("json", json.dumps(spec.get("schema", {"type": "object"})))
    if kind in GRAMMAR_KINDS:
        return grammar(fmt, "response_format")
    raise ValidationError(
        "`response_format.type` must be one of text, json_object, json_schema (or TGI's json, regex)"
    )


def _chat_grammar(response_format: Grammar | None, tool_grammar: Grammar | None) -> Grammar | None:
    """TGI refuses a ``response_format`` grammar while tools are in effect."""
    if tool_grammar is None:
        return response_format
    if response_format is not None:
        raise RequestError("Tool error: Grammar and tools are mutually exclusive", error_type="tool_error")
    return tool_grammar


def completion_params(
    body: Mapping[str, Any], *, max_stop_sequences: int, max_top_n_tokens: int = 5
) -> GenerationParams:
    """Sampling parameters of a ``/v1/completions`` body (``suffix`` is refused like TGI).

    ``logprobs`` N (0 to ``max_top_n_tokens``) returns each token's logprob and the N most likely;
    with ``echo`` the prompt's tokens are scored too (``prompt_logprobs``)."""
    if body.get("suffix") is not None:
        raise RequestError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            error_type="suffix not supported",
        )
    logprobs = completion_logprobs(body, max_top_n_tokens)
    params = _openai_params(
        body, max_stop_sequences=max_stop_sequences, repetition_penalty=_repetition_penalty(body)
    )
    params.sampling.grammar = _response_format(body.get("response_format"))  # as vLLM takes it here
    params.sampling.top_n_tokens = logprobs or 0
    params.sampling.prompt_logprobs = logprobs is not None and bool_field(body, "echo", False)
    return params


def completion_logprobs(body: Mapping[str, Any], max_top_n_tokens: int) -> int | None:
    """The legacy completions' ``logprobs``: None (no logprobs) or how many top tokens to return."""
    value = _uint(body, "logprobs")
    return None if value is None else _top_n(value, max_top_n_tokens, "logprobs")


def completion_choices(body: Mapping[str, Any], limit: int, *, stream: bool) -> tuple[int, int]:
    """``(n, best_of)`` of a completions body: ``best_of`` copies run, the ``n`` best answer."""
    n = choices(body, limit)
    runs = _int(body, "best_of")
    if runs is None:
        return n, n
    if not n <= runs <= limit:
        raise ValidationError(f"`best_of` must be >= `n` and <= {limit}. Given: {runs}")
    if stream and runs != n:
        raise ValidationError("`best_of` != `n` is not supported when streaming tokens")
    return n, runs


def completion_prompts(body: Mapping[str, Any], *, max_client_batch_size: int) -> list[str]:
    """``prompt``: a string or a non-empty list of strings, at most ``max_client_batch_size``."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("`prompt` must be a string or a non-empty list of strings")
    if len(prompts) > max_client_batch_size:
        raise RequestError(
            f"Number of prompts exceeds the maximum allowed batch size of {max_client_batch_size}",
            error_type="batch size exceeded",
        )
    if not all(prompts):
        raise ValidationError("`inputs` cannot be empty")
    return prompts


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` normalised to ``[{"role", "content": str, "name"?, "tool_call_id"?}]`` (text parts
    joined, no images, an assistant's tool calls as JSON text)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationError("`messages` must be a non-empty list")
    return [_chat_message(m, i) for i, m in enumerate(messages)]


def _chat_message(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValidationError(f"`messages[{index}]` must be an object with a string `role`")
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        content = _tool_calls_text(message["tool_calls"])
    normalised = {"role": message["role"], "content": _content_text(content, index)}
    for key in ("name", "tool_call_id"):  # a template may show them (a tool reply's call id)
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValidationError(f"`messages[{index}].{key}` must be a string")
        normalised[key] = value
    return normalised


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"`messages[{index}].content` must be a string or a list of content parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            raise ValidationError("image modality is not supported")
        else:
            raise ValidationError(
                f'`messages[{index}].content` parts must be {{"type": "text", "text": str}}'
            )
    return "".join(parts)


def _tool_calls_text(tool_calls: Any) -> str:
    """TGI feeds an assistant's earlier tool calls to the template as JSON text."""
    return json.dumps(tool_calls, separators=(",", ":"))


# ---------------------------------------------------------------------------- after tokenization


def check_lengths(
    input_tokens: int,
    max_new_tokens: int | None,
    *,
    truncate: int | None = None,
    max_input_tokens: int,
    max_total_tokens: int,
) -> int:
    """Check a tokenized (and truncated) prompt against the limits; return the resolved
    ``max_new_tokens`` (the asked one, or the rest of the context when None)."""
    _check_truncate(truncate, max_input_tokens)
    if max_new_tokens is None:
        max_new_tokens = max(max_total_tokens - input_tokens, 0)
    if input_tokens + max_new_tokens > max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
            f"Given: {input_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if input_tokens > max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {max_input_tokens} tokens. Given: {input_tokens}"
        )
    return max_new_tokens
