"""The wire codec: round trips, versioning, validation on receipt, and the naming rule."""

import re
import typing

import msgpack
import pytest

from tgi_zmq import messages as m


def roundtrip(msg):
    return m.decode(m.encode(msg))


def test_every_message_round_trips():
    params = m.SamplingParams(
        do_sample=True,
        temperature=0.7,
        top_k=5,
        seed=2**64 - 1,
        stop=["\n"],
        logit_bias=[m.TokenBias(5, -100.0)],
        stop_token_ids=[2],
        top_n_tokens=3,
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    first, last = m.StageTimes(0.001, 0.2, 0.05, 0, 0), m.StageTimes(0.001, 0.2, 0.05, 1.5, 0.01)
    samples = [
        m.GenerateRequest("a", None, [{"role": "user", "content": "hi"}], params, None, 1.5),
        m.GenerateRequest("a~1", "hi", None, params, 8, 1.5, prompt_ids=[1, 2], output_ids=[7, 8]),
        m.GenerateRequest("c", None, [{"role": "user", "content": "hi"}], params, 4, 1.5, tools=tools),
        m.TokenizeTextRequest("t", "hi there"),
        m.ChatTokenizeRequest("t", [{"role": "user", "content": "hi"}], tools, "use them"),
        m.ChatTokenizeResult("t", "<user>hi", [m.TokenSpan(1, "<user>", 0, 6)]),
        m.TokenizeResult("t", [m.TokenSpan(1, "hi", 0, 2), m.TokenSpan(2, " there", 2, 8)]),
        m.ScheduleRequest("a", [1, 2, 3], params, 10, 2.0),
        m.ScheduleRequest("a~1", [1, 2, 3], params, 10, 2.0, [9]),
        m.ScheduleRequest("b", [1, 2, 3], params, 10, 2.0, tokenize_seconds=0.001),
        m.PromptIdsOutput("a", [1, 2, 3]),
        m.FrontendStarted("boot"),
        m.AbortRequest("a"),
        m.StopRequest("a"),
        m.BatchTokenOutput([m.DetokRequestInfo("a", [1], 3, [])], ["a"], [5], [-0.25], ["length"]),
        m.BatchTextOutput([m.RequestDelta("a", [5], ["x"], [-0.1], [False], "x", None, 1, 3)]),
        m.BatchTokenOutput(
            [m.DetokRequestInfo("a", [1], 3, [], stages=first, first_token_time=5.5)],
            ["a"],
            [5],
            [-0.25],
            [None],
        ),
        m.BatchTextOutput(
            [m.RequestDelta("a", [5], ["x"], [-0.1], [False], "x", "length", 1, 3, stages=last)]
        ),
        m.ProfileRequest("start", "/tmp/traces"),
        m.ProfileRequest("stop", "/tmp/traces"),
        m.BatchTokenOutput(
            [m.DetokRequestInfo("a", [1, 2], 2, [], prompt_logprobs=[None, -1.5])],
            ["a"],
            [5],
            [-0.25],
            [None],
            top_ids=[[5, 6]],
            top_logprobs=[[-0.25, -2.0]],
        ),
        m.BatchTextOutput(
            [
                m.RequestDelta(
                    "a",
                    [5],
                    ["x"],
                    [-0.1],
                    [False],
                    "x",
                    None,
                    1,
                    3,
                    top_tokens=[m.TokenList([5, 6], ["x", "y"], [-0.1, -3.0], [False, False])],
                    prompt=m.TokenList([1, 2], ["<s>", "hi"], [None, -1.5], [True, False]),
                )
            ]
        ),
        m.SchedulerStats(
            1, 2, 3, 4, 5, 6, 7, 8, 9, [0.5], [m.ForwardTiming("prefill", 0.25, 0.1, 0.3, 2)], 10, 0.5, 99
        ),
        m.StepRequest(3, "sched", "buf", [m.TensorRef("input_ids", "int64", [4], 0)], None),
        m.StepRequest(
            4, "sched", "buf", [], None, [m.GrammarStart("r", 2, m.Grammar("regex", "[0-9]+"), [7])]
        ),
        m.GrammarDropRequest([3, 1], ["r"]),
        m.GrammarRequest("a", m.Grammar("json", '{"type": "object"}')),
        m.GrammarResult("a", "boot", ""),
        m.GrammarResult("b", "boot", "unclosed group"),
        m.StepResult(
            3, "sched", "cuda-buf", [], [0, b"\x01handle", 1024, 0, b"ref", 0, b"ev", True], 0.01, 0.002
        ),
        m.WorkerReady(0, "boot", 123, 64),
        m.WorkerFailure(3, "sched", "boot", "RuntimeError: x"),
        m.WorkerBooting(0, "boot", 123),
        m.ErrorOutput("a", "bad", "validation", 422),
        m.Heartbeat("worker-0", "boot", 12, True),
        m.NodeJoinRequest(1, "join-1-abcd"),
        m.NodeJoinResult('{"num_shard": 2}'),
        m.RestartRanksRequest(-1),
    ]
    for msg in samples:
        assert roundtrip(msg) == msg
    sent_alone = {type(msg) for msg in samples}
    assert sent_alone | PARTS == set(m._REGISTRY.values())  # every type has a sample


def test_int_is_accepted_where_a_float_is_expected():
    raw = msgpack.packb([m.PROTOCOL_VERSION, m.ErrorOutput.TAG, "r", "x", "t", 422])
    assert m.decode(raw).status == 422
    frame = m.encode(m.BatchTokenOutput([], ["a"], [1], [0], [None]))
    assert m.decode(frame).logprobs == [0.0]


PARAMS = m._to_wire(m.SamplingParams())


def stats_frame(forward: list) -> bytes:
    return msgpack.packb([m.PROTOCOL_VERSION, m.SchedulerStats.TAG, 0, 0, 0, 0, 0, 0, 0, 0, [], forward])


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1garbage",
        msgpack.packb({"not": "an array"}),
        msgpack.packb([m.PROTOCOL_VERSION + 1, m.AbortRequest.TAG, "r"]),  # other protocol version
        msgpack.packb([m.PROTOCOL_VERSION, 999, "r"]),  # unknown tag
        msgpack.packb([m.PROTOCOL_VERSION, m.AbortRequest.TAG]),  # missing field
        msgpack.packb([m.PROTOCOL_VERSION, m.AbortRequest.TAG, 5]),  # wrong type
        msgpack.packb([m.PROTOCOL_VERSION, m.Heartbeat.TAG, "p", "b", True, True]),  # bool is not an int
        msgpack.packb([m.PROTOCOL_VERSION, m.ScheduleRequest.TAG, "r", [1, "x"], [1], 3, 0.0]),
        stats_frame([["decode", 0.5]]),  # a part is a tagged array, not a bare list
        stats_frame([[m.ForwardTiming.TAG, "decode", True]]),  # bool is not a float
        stats_frame([[m.TensorRef.TAG, "x", "int64", [1], 0]]),  # another part
        msgpack.packb([m.PROTOCOL_VERSION, m.TokenizeResult.TAG, "t", [[m.TokenSpan.TAG, 1, "hi", 0]]]),
        msgpack.packb(
            [m.PROTOCOL_VERSION, m.GenerateRequest.TAG, "r", None, [{"role": 1}], PARAMS, None, 0.0, None, []]
        ),
    ],
)
def test_malformed_frames_raise_protocol_error(frame):
    with pytest.raises(m.ProtocolError):
        m.decode(frame)


def test_expected_type_is_enforced():
    with pytest.raises(m.ProtocolError, match="unexpected message"):
        m.decode(m.encode(m.AbortRequest("r")), m.TokenizeTextRequest)


def test_tags_are_unique():
    with pytest.raises(TypeError, match="used twice"):

        @m.message(tag=m.AbortRequest.TAG)
        class Clash:
            x: int


# ---------------------------------------------------------------------------- the naming rule

NOTICE = re.compile(r"(Frontend|Tokenizer|Scheduler|Detokenizer|Worker)[A-Z]\w*|Heartbeat")


def role(cls: type) -> str:
    """The role a type's name gives it (see the rule at the top of ``tgi_zmq.messages``)."""
    name = cls.__name__
    if name.endswith("Request"):
        return "command"
    if name.endswith("Result"):
        return "result"
    if name.endswith("Output"):
        return "output"
    if NOTICE.fullmatch(name):
        return "notice"
    return "part"


def nested_in(hint) -> set[type]:
    """The message types a field's type hint contains (through lists, maps and unions)."""
    if hasattr(hint, "TAG"):
        return {hint}
    return {t for arg in typing.get_args(hint) for t in nested_in(arg)}


PARTS = {t for cls in m._REGISTRY.values() for _, hint in cls._FIELDS for t in nested_in(hint)}


@pytest.mark.parametrize("cls", sorted(m._REGISTRY.values(), key=lambda cls: cls.__name__), ids=str)
def test_every_message_is_named_by_the_rule(cls):
    """A part is exactly a type nested in another message; anything sent alone has a role suffix."""
    assert (role(cls) == "part") == (cls in PARTS), f"{cls.__name__} is named as a {role(cls)}"
    if cls.__name__.startswith("Batch"):
        assert role(cls) == "output", cls.__name__
        assert all(typing.get_origin(hint) is list for _, hint in cls._FIELDS), "Batch… fields are lists"


def test_the_rule_knows_every_role():
    roles = {role(cls) for cls in m._REGISTRY.values()}
    assert roles == {"command", "result", "output", "notice", "part"}
