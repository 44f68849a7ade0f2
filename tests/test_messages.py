"""The wire codec: round trips, versioning and validation on receipt."""

import msgpack
import pytest

from tgi_zmq import messages as m


def roundtrip(msg):
    return m.decode(m.encode(msg))


def test_every_message_round_trips():
    params = m.SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=2**64 - 1, stop=["\n"])
    samples = [
        m.GenerateRequest("a", None, [{"role": "user", "content": "hi"}], params, 1.5),
        m.GenerateRequest("a~1", "hi", None, params, 1.5, prompt_ids=[1, 2], output_ids=[7, 8]),
        m.TokenizedRequest("a", [1, 2, 3], params, 10, 2.0),
        m.TokenizedRequest("a~1", [1, 2, 3], params, 10, 2.0, [9]),
        m.PromptIds("a", [1, 2, 3]),
        m.FrontendStarted("boot"),
        m.BatchTokenOutput([m.DetokRequestInfo("a", [1], 3, [], None)], ["a"], [5], [-0.25], ["length"]),
        m.BatchTextOutput([m.RequestDelta("a", [5], ["x"], [-0.1], [False], "x", None, 1, 3, 7)]),
        m.ForwardStep(3, "sched", "buf", [m.TensorRef("input_ids", "int64", [4], 0)], None),
        m.StepResult(3, "sched", "cuda-buf", [], [0, b"\x01handle", 1024, 0, b"ref", 0, b"ev", True], 0.01),
        m.WorkerReady(0, "boot", 123, 64),
        m.WorkerFailure(3, "sched", "boot", "RuntimeError: x"),
        m.ErrorOutput("a", "bad", "validation", 422),
        m.Heartbeat("worker-0", "boot", 12, True),
    ]
    for msg in samples:
        assert roundtrip(msg) == msg


def test_int_is_accepted_where_a_float_is_expected():
    raw = msgpack.packb([m.PROTOCOL_VERSION, m.ErrorOutput.TAG, "r", "x", "t", 422])
    assert m.decode(raw).status == 422
    frame = m.encode(m.BatchTokenOutput([], ["a"], [1], [0], [None]))
    assert m.decode(frame).logprobs == [0.0]


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
        msgpack.packb([m.PROTOCOL_VERSION, m.TokenizedRequest.TAG, "r", [1, "x"], [1], 3, 0.0]),
    ],
)
def test_malformed_frames_raise_protocol_error(frame):
    with pytest.raises(m.ProtocolError):
        m.decode(frame)


def test_expected_type_is_enforced():
    with pytest.raises(m.ProtocolError, match="unexpected message"):
        m.decode(m.encode(m.AbortRequest("r")), m.TokenizeRequest)


def test_tags_are_unique():
    with pytest.raises(TypeError, match="used twice"):

        @m.message(tag=m.AbortRequest.TAG)
        class Clash:
            x: int
