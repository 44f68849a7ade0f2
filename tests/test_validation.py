"""TGI's request validation rules and messages (tgi_zmq.validation)."""

from __future__ import annotations

import json

import pytest

from tgi_zmq.errors import RequestError, ValidationError, generation_error, request_error
from tgi_zmq.messages import ErrorOutput, Grammar, SamplingParams, TokenBias
from tgi_zmq.validation import (
    GenerationParams,
    Limits,
    chat_messages,
    chat_params,
    check_lengths,
    choices,
    completion_params,
    completion_prompts,
    copy_seed,
    generate_inputs,
    generate_params,
)

MAX_STOP = 4


def test_openai_n_and_copy_seeds():
    assert choices({"n": 2}, 2) == 2 and choices({}, 2) == 1
    assert message_of(choices, {"n": 3}, 2) == "`n` must be > 0 and <= 2. Given: 3"
    seeded = SamplingParams(do_sample=True, seed=2**64 - 1)
    assert [copy_seed(seeded, i).seed for i in range(3)] == [2**64 - 1, 0, 1]
    assert copy_seed(SamplingParams(), 1).seed is None


def test_logit_bias_becomes_token_biases():
    params = chat_asked(logit_bias={"12": -100, "7": 2.5}).sampling
    assert params.logit_bias == [TokenBias(12, -100.0), TokenBias(7, 2.5)]
    assert chat_asked(logit_bias=[0.5]).sampling.logit_bias == []  # TGI's list form: ignored


def gen(parameters, stream: bool = False, **limits) -> SamplingParams:
    return generate_params(parameters, Limits(max_stop_sequences=MAX_STOP, **limits), stream=stream).sampling


def chat_asked(**body) -> GenerationParams:
    return chat_params({"messages": [{"role": "user", "content": "hi"}], **body}, max_stop_sequences=MAX_STOP)


def chat(**body) -> SamplingParams:
    return chat_asked(**body).sampling


def message_of(call, *args, **kwargs) -> str:
    with pytest.raises(ValidationError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------- errors


def test_validation_error_body_text_has_tgi_prefix():
    exc = ValidationError("`top_k` must be strictly positive")
    assert exc.error == "Input validation error: `top_k` must be strictly positive"
    assert (exc.status, exc.error_type) == (422, "validation")
    assert isinstance(exc, RequestError)


def test_request_error_keeps_its_own_type_and_status():
    exc = RequestError("Model is overloaded", error_type="overloaded", status=429)
    assert (exc.error, exc.error_type, exc.status) == ("Model is overloaded", "overloaded", 429)


def test_errors_cross_the_wire_with_their_prefix_and_come_back_unchanged():
    output = ValidationError("`inputs` cannot be empty").output("r")
    assert output == ErrorOutput("r", "Input validation error: `inputs` cannot be empty", "validation", 422)
    failed = generation_error("r", "the model workers failed")
    assert failed == ErrorOutput(
        "r", "Request failed during generation: the model workers failed", "generation", 424
    )
    for out in (output, failed):
        exc = request_error(out)
        assert (exc.error, exc.error_type, exc.status) == (out.message, out.error_type, out.status)


# ---------------------------------------------------------------------------- /generate defaults


def test_omitted_parameters_sample_with_a_random_seed():
    params = gen(None)
    assert params.do_sample is True
    assert isinstance(params.seed, int) and 0 <= params.seed < 2**63


def test_empty_parameters_are_greedy_without_seed():
    params = gen({})
    assert params == SamplingParams()
    assert not params.do_sample and params.seed is None


def test_random_seeds_differ_between_requests():
    assert len({gen({"do_sample": True}).seed for _ in range(8)}) > 1


def test_given_seed_is_kept_when_sampling_and_dropped_when_greedy():
    assert gen({"do_sample": True, "seed": 42}).seed == 42
    assert gen({"seed": 42}).seed is None


@pytest.mark.parametrize(
    "parameters",
    [{"temperature": 0.5}, {"top_k": 10}, {"top_p": 0.9}, {"typical_p": 0.9}, {"do_sample": True}],
)
def test_any_warper_turns_sampling_on(parameters):
    params = gen(parameters)
    assert params.do_sample and params.seed is not None


@pytest.mark.parametrize(
    "parameters",
    [{"temperature": 1.0}, {"repetition_penalty": 1.3}, {"frequency_penalty": 0.5}, {"do_sample": False}],
)
def test_non_warpers_stay_greedy(parameters):
    assert not gen(parameters).do_sample


def test_values_are_carried_over():
    params, max_new_tokens = generate_params(
        {
            "temperature": 0.7,
            "top_k": 5,
            "top_p": 0.8,
            "repetition_penalty": 1.2,
            "frequency_penalty": -0.5,
            "max_new_tokens": 17,
            "stop": ["\n", "###"],
            "seed": 3,
            "truncate": 9,
            "ignore_eos": True,
        },
        Limits(max_stop_sequences=MAX_STOP),
    )
    assert max_new_tokens == 17
    assert params == SamplingParams(
        do_sample=True,
        temperature=0.7,
        top_k=5,
        top_p=0.8,
        repetition_penalty=1.2,
        frequency_penalty=-0.5,
        seed=3,
        stop=["\n", "###"],
        ignore_eos=True,
        truncate=9,
    )


def test_integers_are_accepted_for_floats():
    assert gen({"temperature": 2}).temperature == 2.0


@pytest.mark.parametrize(
    "parameters",
    [
        {"best_of": 1},
        {"best_of": None},
        {"top_n_tokens": 0},
        {"top_n_tokens": None},
        {"details": True, "decoder_input_details": True, "return_full_text": False, "watermark": False},
        {"frequency_penalty": 2.0},
        {"frequency_penalty": -2.0},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": None, "seed": None, "max_new_tokens": None},
        {"unknown_field": "ignored", "adapter_id": "x"},
    ],
)
def test_accepted_parameters(parameters):
    gen(parameters)


# ---------------------------------------------------------------------------- /generate rules


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"temperature": -1}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.1}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"top_k": -3}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"stop_token_ids": [1, "2"]}, "`stop_token_ids` must be a list of integers"),
        ({"truncate": 0}, "`truncate` must be strictly positive. Given: 0"),
        (
            {"grammar": {"type": "cfg", "value": "a+"}},
            '`grammar` must be {"type": "json", "json_schema" or "regex", "value": ...}',
        ),
        ({"grammar": {"type": "regex", "value": 3}}, "a regex grammar's `value` must be a string"),
        (
            {"grammar": {"type": "json", "value": [1]}},
            "a json grammar's `value` must be a JSON schema (an object)",
        ),
    ],
)
def test_rule_messages(parameters, message):
    assert message_of(gen, parameters) == message


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
def test_streaming_only_messages(parameters, message):
    assert message_of(gen, parameters, stream=True) == message


def test_decoder_input_details_is_fine_without_streaming():
    assert gen({"decoder_input_details": True}).prompt_logprobs


def test_best_of_disabled_by_the_limit():
    message = message_of(gen, {"best_of": 2, "do_sample": True}, max_best_of=1)
    assert message == "`best_of` != 1 is not allowed for this endpoint"


def test_new_sampling_parameters_are_carried_over():
    params = gen(
        {
            "typical_p": 0.5,
            "watermark": True,
            "top_n_tokens": 3,
            "min_tokens": 4,
            "stop_token_ids": [7, 9],
            "best_of": 2,
        }
    )
    assert (params.typical_p, params.watermark, params.top_n_tokens) == (0.5, True, 3)
    assert (params.min_tokens, params.stop_token_ids, params.do_sample) == (4, [7, 9], True)


def test_truncate_upper_bound_is_checked_when_the_limit_is_known():
    assert gen({"truncate": 10}, max_input_tokens=10).truncate == 10
    message = message_of(gen, {"truncate": 11}, max_input_tokens=10)
    assert message == "`truncate` must be strictly positive and less than 10. Given: 11"


def test_rules_are_checked_in_tgi_order():
    assert message_of(gen, {"top_k": 0, "temperature": 0}) == "`temperature` must be strictly positive"
    assert message_of(gen, {"top_k": 0, "top_p": 1.0}) == "`top_p` must be > 0.0 and < 1.0"


@pytest.mark.parametrize(
    ("parameters", "name"),
    [
        ({"temperature": "abc"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": [0.5]}, "top_p"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": "10"}, "max_new_tokens"),
        ({"top_k": 2.0}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"truncate": -4}, "truncate"),
        ({"stop": "###"}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"details": 1}, "details"),
        ({"return_full_text": "true"}, "return_full_text"),
        ({"best_of": "2"}, "best_of"),
    ],
)
def test_type_errors_name_the_field(parameters, name):
    assert f"`{name}`" in message_of(gen, parameters)


def test_parameters_must_be_an_object():
    assert message_of(gen, ["temperature"]) == "`parameters` must be an object"


def test_huge_seed_is_refused():
    assert "`seed`" in message_of(gen, {"do_sample": True, "seed": 2**64})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "`inputs` must be a string"),
        ({"inputs": 3}, "`inputs` must be a string"),
        ({"inputs": ""}, "`inputs` cannot be empty"),
    ],
)
def test_generate_inputs(body, message):
    assert message_of(generate_inputs, body) == message


def test_generate_inputs_returns_the_prompt():
    assert generate_inputs({"inputs": "Hello"}) == "Hello"


# ---------------------------------------------------------------------------- chat


def test_chat_temperature_zero_is_greedy():
    params = chat(temperature=0, seed=5)
    assert not params.do_sample and params.seed is None and params.temperature == 1.0


def test_chat_without_temperature_samples_like_tgi():
    params = chat()
    assert params.do_sample and params.seed is not None and params.temperature == 1.0


def test_chat_temperature_samples_with_it():
    params = chat(temperature=0.3, seed=11)
    assert (params.do_sample, params.temperature, params.seed) == (True, 0.3, 11)


def test_chat_max_tokens_and_alias():
    assert chat_asked().max_new_tokens is None
    assert chat_asked(max_tokens=7).max_new_tokens == 7
    assert chat_asked(max_completion_tokens=8).max_new_tokens == 8
    assert chat_asked(max_tokens=7, max_completion_tokens=8).max_new_tokens == 7


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, 1.0),
        ({"presence_penalty": 0.0}, 1.0),  # TGI would make this 2.0; we ignore a zero
        ({"presence_penalty": 0.5}, 2.5),
        ({"repetition_penalty": 1.1}, 1.1),
        ({"repetition_penalty": 1.1, "presence_penalty": 0.5}, 1.1),
    ],
)
def test_chat_repetition_penalty(body, expected):
    assert chat(**body).repetition_penalty == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"presence_penalty": -2.0}, "`repetition_penalty` must be strictly positive"),
        ({"temperature": -0.5}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"max_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["1", "2", "3", "4", "5"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"logit_bias": {"12": 101}}, "`logit_bias` values must be >= -100 and <= 100. Given: 101"),
        ({"logit_bias": {"x": 1}}, "`logit_bias` must map token ids to numbers. Given: 'x': 1"),
        (
            {"logit_bias": {"9" * 23: 1}},
            "`logit_bias` must map token ids to numbers. Given: '9999999999999999999: 1",
        ),
        (
            {"response_format": {"type": "xml"}},
            "`response_format.type` must be one of text, json_object, json_schema (or TGI's json, regex)",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "`response_format.json_schema` must be an object with a `schema`",
        ),
        (
            {"response_format": {"type": "json_schema", "value": {"name": "x"}}},
            'a json_schema grammar\'s `value` must be {"name": ..., "schema": {...}}',
        ),
        (
            {"response_format": {"type": "regex"}},
            '`response_format` must be {"type": "json", "json_schema" or "regex", "value": ...}',
        ),
    ],
)
def test_chat_rule_messages(body, message):
    assert message_of(chat, **body) == message


@pytest.mark.parametrize(
    "body",
    [
        {"n": 1},
        {"n": None},
        {"logprobs": True, "top_logprobs": 3},
        {"response_format": {"type": "text"}},
        {"tools": [], "tool_choice": "auto"},
        {"stream": True, "stream_options": {"include_usage": True}, "model": "tgi", "user": "u"},
    ],
)
def test_chat_accepted_fields(body):
    chat(**body)


def test_chat_stop_accepts_a_string_and_ignore_eos():
    params = chat(stop="###", ignore_eos=True, frequency_penalty=0.5, top_p=0.9)
    assert (params.stop, params.ignore_eos, params.frequency_penalty, params.top_p) == (
        ["###"],
        True,
        0.5,
        0.9,
    )


def test_chat_logprobs_must_be_a_boolean():
    assert "`logprobs`" in message_of(chat, logprobs=3)


def test_chat_tools_and_response_format():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chat(tools=tools).grammar is None  # the route passes the tools' grammar (tgi_zmq.tools)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert chat(response_format={"type": "json_object", "value": schema}).grammar == Grammar(
        "json", json.dumps(schema)
    )  # TGI's (and huggingface_hub's) form


def test_chat_messages_are_normalised():
    body = {
        "messages": [
            {"role": "system", "content": "be brief", "name": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "0"}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "0", "name": None},
        ]
    }
    assert chat_messages(body) == [
        {"role": "system", "content": "be brief", "name": "rules"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": '[{"id":"0"}]'},
        {"role": "tool", "content": "sunny", "tool_call_id": "0"},
    ]


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (None, "`messages`"),
        ([], "`messages`"),
        ("hi", "`messages`"),
        ([{"content": "hi"}], "`messages[0]`"),
        (["hi"], "`messages[0]`"),
        ([{"role": "user"}], "`messages[0].content`"),
        ([{"role": "user", "content": 5}], "`messages[0].content`"),
        ([{"role": "user", "content": [{"type": "text"}]}], "`messages[0].content`"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image modality"),
        ([{"role": "tool", "content": "x", "tool_call_id": 0}], "`messages[0].tool_call_id`"),
    ],
)
def test_bad_chat_messages(messages, fragment):
    assert fragment in message_of(chat_messages, {"messages": messages})


# ---------------------------------------------------------------------------- completions


def test_completion_params_follow_the_chat_rules():
    params, max_new_tokens = completion_params(
        {"prompt": "x", "temperature": 0, "max_tokens": 3}, max_stop_sequences=MAX_STOP
    )
    assert (params.do_sample, max_new_tokens) == (False, 3)


def test_completion_suffix_is_refused():
    with pytest.raises(RequestError) as info:
        completion_params({"prompt": "x", "suffix": "y"}, max_stop_sequences=MAX_STOP)
    exc = info.value
    assert (exc.status, exc.error_type) == (422, "suffix not supported")
    assert exc.error == "Suffix is not supported and can be achieved by preprocessing the prompt."


@pytest.mark.parametrize(("prompt", "expected"), [("a", ["a"]), (["a", "b"], ["a", "b"])])
def test_completion_prompts(prompt, expected):
    assert completion_prompts({"prompt": prompt}, max_client_batch_size=4) == expected


def test_completion_batch_size_exceeded():
    with pytest.raises(RequestError) as info:
        completion_prompts({"prompt": ["a"] * 5}, max_client_batch_size=4)
    exc = info.value
    assert (exc.status, exc.error_type) == (422, "batch size exceeded")
    assert exc.error == "Number of prompts exceeds the maximum allowed batch size of 4"


@pytest.mark.parametrize("prompt", [None, [], [1, 2], 5, ["a", None]])
def test_bad_completion_prompts(prompt):
    assert "`prompt`" in message_of(completion_prompts, {"prompt": prompt}, max_client_batch_size=4)


def test_empty_completion_prompt():
    assert message_of(completion_prompts, {"prompt": ["a", ""]}, max_client_batch_size=4) == (
        "`inputs` cannot be empty"
    )


# ---------------------------------------------------------------------------- lengths


def lengths(input_tokens: int, max_new_tokens: int | None = None, truncate: int | None = None) -> int:
    return check_lengths(
        input_tokens, max_new_tokens, truncate=truncate, max_input_tokens=10, max_total_tokens=20
    )


def test_max_new_tokens_defaults_to_the_rest_of_the_context():
    assert lengths(4) == 16


def test_explicit_max_new_tokens_is_kept():
    assert lengths(4, 16) == 16


def test_total_tokens_message():
    message = message_of(lengths, 5, 16)
    assert message == (
        "`inputs` tokens + `max_new_tokens` must be <= 20. Given: 5 `inputs` tokens and 16 `max_new_tokens`"
    )


def test_input_length_message():
    message = message_of(lengths, 11, 2)
    assert message == "`inputs` must have less than 10 tokens. Given: 11"


def test_total_is_checked_before_input_length():
    message = message_of(lengths, 12, 10)
    assert message.startswith("`inputs` tokens + `max_new_tokens` must be <= 20")


def test_prompt_longer_than_the_context_without_max_new_tokens():
    message = message_of(lengths, 25)
    assert message == (
        "`inputs` tokens + `max_new_tokens` must be <= 20. Given: 25 `inputs` tokens and 0 `max_new_tokens`"
    )


def test_prompt_filling_the_context_is_an_input_length_error():
    assert message_of(lengths, 20) == "`inputs` must have less than 10 tokens. Given: 20"


@pytest.mark.parametrize("truncate", [0, 11])
def test_truncate_bounds(truncate):
    message = message_of(lengths, 5, truncate=truncate)
    assert message == f"`truncate` must be strictly positive and less than 10. Given: {truncate}"


def test_truncate_at_the_limit_is_fine():
    assert lengths(10, 1, truncate=10) == 1


def test_grammars_from_tgi_and_openai_shapes():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tgi = generate_params({"grammar": {"type": "json", "value": schema}}).sampling
    assert tgi.grammar == Grammar("json", json.dumps(schema))
    as_text = {"grammar": {"type": "json", "value": json.dumps(schema)}}
    assert generate_params(as_text).sampling.grammar == tgi.grammar
    regex = {"grammar": {"type": "regex", "value": "[0-9]+"}}
    assert generate_params(regex).sampling.grammar == Grammar("regex", "[0-9]+")
    tgi_named = {"type": "json_schema", "value": {"name": "x", "schema": schema}}  # serde's tag + content
    for form in (tgi_named, {"type": "json_object", "value": schema}):
        assert generate_params({"grammar": form}).sampling.grammar == tgi.grammar

    def chat_grammar(fmt):
        body = {"messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
        return chat_params(body, max_stop_sequences=4).sampling.grammar

    assert chat_grammar({"type": "text"}) is None
    assert chat_grammar({"type": "json_object"}) == Grammar("json", '{"type": "object"}')
    named = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert chat_grammar(named) == tgi.grammar
    assert chat_grammar({"type": "json", "value": schema}) == tgi.grammar
    assert (
        chat_grammar(tgi_named) == chat_grammar({**tgi_named, "json_schema": {"schema": {}}}) == tgi.grammar
    )
    completion = {"prompt": "hi", "response_format": named}
    assert completion_params(completion, max_stop_sequences=4).sampling.grammar == tgi.grammar
