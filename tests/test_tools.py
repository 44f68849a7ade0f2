"""Tool calling's pure logic (tgi_zmq.tools): tool choice, the grammar, the prompt, reading the output
whole and streamed."""

from __future__ import annotations

import copy
import json

import pytest

from tgi_zmq import tools as t
from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.messages import Grammar
from tgi_zmq.validation import chat_params

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "arguments": {"type": "object"}}}
CALL = '{"function":{"_name":"get_weather","location":"Paris","days":3}}'
NO_TOOL = '{"function":{"_name":"no_tool","content":"Hello \\"you\\" \\u00e9t\\u00e9 \\ud83d\\ude00!"}}'


def names(body) -> list[str]:
    return [tool["function"]["name"] for tool in t.chat_tools({"tools": [WEATHER, TIME], **body}).tools]


# ---------------------------------------------------------------------------- tool choice


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({}, ["get_weather", "get_time", "no_tool"]),
        ({"tool_choice": None}, ["get_weather", "get_time", "no_tool"]),
        ({"tool_choice": "auto"}, ["get_weather", "get_time", "no_tool"]),
        ({"tool_choice": "required"}, ["get_weather", "get_time"]),
        ({"tool_choice": "get_time"}, ["get_time"]),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, ["get_weather"]),
    ],
)
def test_tool_choice_picks_the_tools(choice, expected):
    assert names(choice) == expected


def test_no_tools_in_effect():
    assert t.chat_tools({}) is None
    assert t.chat_tools({"tools": [], "tool_choice": "required"}) is None
    assert t.chat_tools({"tools": [WEATHER], "tool_choice": "none"}) is None


def test_an_unknown_tool_is_tgis_tool_error():
    with pytest.raises(RequestError) as info:
        t.chat_tools({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    exc = info.value
    assert (exc.error, exc.error_type, exc.status) == (
        "Tool error: Tool with name nope not found",
        "tool_error",
        422,
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"tools": {"a": 1}}, "`tools`"),
        ({"tools": ["x"]}, "`tools[0]`"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "`tools[0]`"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "`tools[0].function.name`"),
        ({"tools": [{"function": {"name": "f", "parameters": []}}]}, "`tools[0].function.parameters`"),
        (
            {"tools": [{"function": {"name": "f", "parameters": {"required": "a"}}}]},
            "`tools[0].function.parameters`",
        ),
        ({"tools": [{"function": {"name": "f", "description": 3}}]}, "`tools[0].function.description`"),
        ({"tools": [WEATHER], "tool_choice": 3}, "`tool_choice`"),
        ({"tools": [WEATHER], "tool_prompt": 3}, "`tool_prompt`"),
    ],
)
def test_bad_tools_are_422s(body, fragment):
    with pytest.raises(ValidationError) as info:
        t.chat_tools(body)
    assert fragment in str(info.value)


def test_tools_are_normalised_and_the_prompt_defaults_to_tgis():
    chosen = t.chat_tools({"tools": [TIME], "tool_choice": "required"})
    assert chosen.tools == [
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    ]
    assert chosen.tool_prompt == t.DEFAULT_TOOL_PROMPT
    assert chosen.tool_prompt.endswith("its value}.Do not use variables.")
    assert t.chat_tools({"tools": [TIME], "tool_prompt": "Use them."}).tool_prompt == "Use them."


# ---------------------------------------------------------------------------- grammar


def test_the_grammar_has_tgis_shape():
    schema = json.loads(t.chat_tools({"tools": [WEATHER], "tool_choice": "required"}).grammar.value)
    assert schema["properties"] == {"function": {"anyOf": [{"$ref": "#/$functions/get_weather"}]}}
    assert schema["required"] == ["function"]
    assert schema["$functions"]["get_weather"] == {
        "type": "object",
        "properties": {
            "_name": {"type": "string", "const": "get_weather"},
            "location": {"type": "string"},
            "days": {"type": "integer"},
        },
        "required": ["location", "_name"],
        "additionalProperties": False,
        "description": "The weather in a city",
    }


def test_tools_own_definitions_are_lifted_to_the_root():
    tool = copy.deepcopy(WEATHER)
    tool["function"]["parameters"]["$defs"] = {"unit": {"enum": ["C", "F"]}}
    tool["function"]["parameters"]["properties"]["unit"] = {"$ref": "#/$defs/unit"}
    schema = json.loads(t.tool_grammar([tool]).value)
    assert schema["$defs"] == {"unit": {"enum": ["C", "F"]}}


def accepts(engine, grammar: Grammar, text: str, tokenizer) -> bool:
    matcher = engine.matcher(grammar)._matcher
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_llguidance_resolves_the_functions_refs(tokenizer):
    from tgi_zmq.grammar import GrammarEngine

    engine = GrammarEngine(tokenizer)
    grammar = t.chat_tools({"tools": [WEATHER, TIME]}).grammar
    engine.compile(grammar).template()  # compiles: raises GrammarError otherwise
    assert accepts(engine, grammar, CALL, tokenizer)
    assert accepts(engine, grammar, '{"function":{"_name":"get_time"}}', tokenizer)
    assert accepts(engine, grammar, '{"function":{"_name":"no_tool","content":"hi"}}', tokenizer)
    assert not accepts(engine, grammar, '{"function":{"_name":"get_weather"}}', tokenizer)  # location
    assert not accepts(engine, grammar, '{"function":{"_name":"other"}}', tokenizer)
    assert not accepts(engine, grammar, "{}", tokenizer)


def test_response_format_and_tools_are_mutually_exclusive():
    grammar = t.chat_tools({"tools": [WEATHER]}).grammar
    body = {"messages": [], "response_format": {"type": "json_object"}}
    with pytest.raises(RequestError) as info:
        chat_params(body, max_stop_sequences=4, tool_grammar=grammar)
    exc = info.value
    assert (exc.error, exc.error_type, exc.status) == (
        "Tool error: Grammar and tools are mutually exclusive",
        "tool_error",
        422,
    )
    assert chat_params({"response_format": {"type": "text"}}, max_stop_sequences=4, tool_grammar=grammar)
    params = chat_params({}, max_stop_sequences=4, tool_grammar=grammar).sampling
    assert params.grammar == grammar


# ---------------------------------------------------------------------------- prompt


def test_tgis_tool_prompt_ends_the_last_message():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "Weather?"}]
    tools = [WEATHER]
    shown = t.with_tool_prompt(chat, tools, "Pick one.", in_template=False)
    tools_json = json.dumps(tools, separators=(",", ":"))
    assert shown == [chat[0], {"role": "user", "content": f"Weather?\n---\n{tools_json}\nPick one."}]
    assert t.with_tool_prompt(chat, tools, None, in_template=True)[-1]["content"] == (
        f"Weather?\n---\n{t.DEFAULT_TOOL_PROMPT}"
    )
    assert chat[-1]["content"] == "Weather?"  # the caller's list is left alone


def test_render_chat_gives_the_tools_to_a_template_that_uses_them(tokenizer):
    from tgi_zmq.prompts import render_chat

    chat = [{"role": "user", "content": "Weather?"}]
    text = render_chat(tokenizer, chat, [WEATHER], "Pick one.")  # SmolLM2's template has no tools
    assert '"name":"get_weather"' in text and "Weather?\n---\n" in text
    assert text.endswith("Pick one.<|im_end|>\n<|im_start|>assistant\n")
    with_tools = copy.copy(tokenizer)
    with_tools.chat_template = (
        "{% for tool in tools or [] %}[{{ tool.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    )
    assert (
        render_chat(with_tools, chat, [WEATHER], "Pick one.") == "[get_weather]user:Weather?\n---\nPick one.;"
    )
    assert render_chat(with_tools, chat) == "user:Weather?;"


def test_a_tool_reply_goes_through_the_template(tokenizer):
    from tgi_zmq.prompts import render_chat

    chat = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": '[{"id":"0"}]'},
        {"role": "tool", "content": "sunny", "tool_call_id": "0"},
    ]
    assert "<|im_start|>tool\nsunny<|im_end|>" in render_chat(tokenizer, chat)


# ---------------------------------------------------------------------------- output


def test_a_call_keeps_its_arguments_as_written():
    assert t.assistant_message(CALL) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "0",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location":"Paris","days":3}',
                    "description": None,
                },
            }
        ],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CALL, t.ToolCall("get_weather", '{"location":"Paris","days":3}')),
        ('{"function":{"_name":"get_time"}}', t.ToolCall("get_time", "{}")),
        (' { "function" : { "_name" : "f" , "a" : {"b": [1]} } } ', t.ToolCall("f", '{ "a" : {"b": [1]} }')),
        ('{"function":{"a":1,"_name":"f"}}', t.ToolCall("f", '{"a":1}')),  # _name not first
        ('{"function":{"_name":"get_weather","location":"Par', t.ToolCall("get_weather", '{"location":"Par')),
        (NO_TOOL, 'Hello "you" été 😀!'),
        ('{"function":{"content":"hi","_name":"no_tool"}}', "hi"),
        ('{"function":{"_name":"no_tool","content":"Hello \\"yo', 'Hello "yo'),
        ('{"function":{"_name":"no_tool","content":"a\\u00', "a"),
        ('{"function":{"_name":"no_tool"}', ""),
        ('{"function":{"_name":"no_tool"', '{"function":{"_name":"no_tool"'),  # no separator yet
        ('{"function":{"_na', '{"function":{"_na'),
        ("plain words", "plain words"),
    ],
)
def test_read_output(text, expected):
    assert t.read_output(text) == expected


def stream(text: str, size: int) -> list[dict]:
    """Every delta of ``text`` pushed ``size`` characters at a time (the last piece final)."""
    s, deltas = t.ToolStream("7"), []
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    for i, piece in enumerate(pieces):
        delta = s.push(piece, final=i == len(pieces) - 1)
        if delta is not None:
            deltas.append(delta)
    return deltas


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(
    "text",
    [
        CALL,
        '{"function":{"_name":"get_time"}}',
        ' { "function" : { "_name" : "f" , "a" : {"b": [1]} } } ',
        '{"function":{"a":1,"_name":"f"}}',
        '{"function":{"_name":"get_weather","location":"Paris}} ',  # cut short
    ],
)
def test_streamed_arguments_add_up_to_the_call(text, size):
    deltas = stream(text, size)
    calls = [d["tool_calls"][0] for d in deltas]
    assert all(set(d) == {"role", "tool_calls"} for d in deltas)
    assert [c["function"]["name"] is not None for c in calls] == [True] + [False] * (len(calls) - 1)
    assert all((c["index"], c["id"], c["type"]) == (0, "7", "function") for c in calls)
    call = t.read_output(text)
    assert calls[0]["function"]["name"] == call.name
    assert "".join(c["function"]["arguments"] for c in calls) == call.arguments


def test_a_call_is_announced_as_soon_as_its_name_is_known():
    s = t.ToolStream("0")
    assert s.push('{"function":{"_name":"get_we', final=False) is None
    first = s.push('ather",', final=False)["tool_calls"][0]["function"]
    assert first == {"name": "get_weather", "arguments": "{"}
    assert s.calls_tool
    assert (
        s.push('"location":"Paris"}', final=False)["tool_calls"][0]["function"]["arguments"]
        == '"location":"Paris"'
    )
    assert s.push("}", final=False)["tool_calls"][0]["function"]["arguments"] == "}"
    assert s.push("", final=True)["tool_calls"][0]["function"] == {"name": None, "arguments": ""}


@pytest.mark.parametrize("size", [1, 4, 1000])
@pytest.mark.parametrize("text", [NO_TOOL, '{"function":{"_name":"no_tool","content":"cut \\u00', "plain"])
def test_no_tool_streams_its_content_as_text(text, size):
    deltas = stream(text, size)
    assert all(set(d) == {"role", "content"} for d in deltas)
    assert "".join(d["content"] for d in deltas) == t.read_output(text)


def test_the_final_piece_always_gets_a_delta():
    s = t.ToolStream("0")
    s.push('{"function":{"_name":"no_tool","content":"hi"}}', final=False)
    assert s.push("", final=True) == {"role": "assistant", "content": ""}
    assert not s.calls_tool


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "hi"}], "0"),
        (
            [
                {"role": "assistant", "tool_calls": [{"id": "3"}, {"id": "1"}]},
                {"role": "tool", "tool_call_id": "3", "content": "x"},
            ],
            "4",
        ),
    ],
)
def test_stream_call_ids_follow_the_conversations(messages, expected):
    assert t.stream_call_id(messages) == expected


def test_a_stream_call_id_is_a_uuid_after_other_ids():
    call_id = t.stream_call_id([{"role": "tool", "tool_call_id": "call_abc", "content": "x"}])
    assert len(call_id) == 36 and call_id.count("-") == 4
