"""Incremental detokenization equals a full decode; stop sequences; the per-step batch processor."""

import time

import pytest

from tgi_zmq import messages as m
from tgi_zmq.messages import SamplingParams
from tgi_zmq.policy import Produced, Request
from tgi_zmq.textstream import (
    PROMPT_TAIL,
    BatchDetokenizer,
    DecodeState,
    IncrementalDetokenizer,
    request_info,
    token_output,
)


def unexpected(rid: str, exc: Exception) -> None:
    """The ``fail`` of tests where no request may fail."""
    raise AssertionError(f"{rid} failed") from exc


TEXTS = [
    "Hello world, this is a test.",
    "Émilie a mangé 3 crêpes à Noël 🎄🎅 — voilà!",
    "中文字符和日本語のテキスト",
    "  leading spaces\n\nand\ttabs  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    detok = IncrementalDetokenizer(tokenizer)
    prompt = tokenizer("Say:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    state = DecodeState.start(prompt, [])
    pieces = [detok.add(state, i).text for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_skipped_in_text_but_named(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    state = DecodeState.start([], [])
    ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pieces = [detok.add(state, i) for i in ids]
    assert "".join(p.text for p in pieces) == "Paris."
    assert pieces[-1].special and pieces[-1].token_text == tokenizer.eos_token and pieces[-1].text == ""


def test_stop_sequence_cuts_after_the_match(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    state = DecodeState.start([], ["world"])
    ids = tokenizer("Hello world and more", add_special_tokens=False)["input_ids"]
    text, stopped_at = "", None
    for n, i in enumerate(ids):
        piece = detok.add(state, i)
        text += piece.text
        if piece.stopped:
            stopped_at = n
            break
    assert text == "Hello world" and stopped_at is not None


def test_stop_sequence_split_over_tokens():
    state = DecodeState(ids=[], prefix_offset=0, read_offset=0, stop=["abc"], text="xa")
    assert IncrementalDetokenizer._apply_stop(state, "bcd") == ("bc", True)
    assert IncrementalDetokenizer._apply_stop(state, "bd") == ("bd", False)


def test_batch_detokenizer_streams_deltas_and_drops_late_tokens(tokenizer):
    batch = BatchDetokenizer(tokenizer)
    ids = tokenizer(" one two three", add_special_tokens=False)["input_ids"]
    info = m.DetokRequestInfo("r", [], 4, ["two"])
    out, stopped = batch.process(m.BatchTokenOutput([info], ["r"], [ids[0]], [-0.5], [None]), unexpected)
    assert out.deltas[0].text == " one" and out.deltas[0].prompt_tokens == 4
    out, stopped = batch.process(m.BatchTokenOutput([], ["r"], [ids[1]], [-0.5], [None]), unexpected)
    assert stopped == ["r"] and out.deltas[0].finish_reason == "stop_sequence"
    out, _ = batch.process(m.BatchTokenOutput([], ["r"], [ids[2]], [-0.5], [None]), unexpected)
    assert out.deltas == []  # the scheduler may still send a token or two: ignored


def test_only_the_prompts_tail_is_sent_unless_its_logprobs_are_asked(tokenizer):
    """The scheduler sends the last ``PROMPT_TAIL`` prompt ids (the first token's context), which decode
    as the whole prompt would; the whole prompt only for ``prompt_logprobs``, none for seq2seq."""
    prompt = tokenizer("A long prompt, " * 20)["input_ids"]
    (token,) = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    req = Request("r", [*prompt, token], SamplingParams(), 5, prompt_len=len(prompt))
    produced = Produced(req, token, -0.5, [], [], first=True)
    out = token_output([produced], time.time())
    (info,) = out.new_requests
    assert info.prompt_ids == prompt[-PROMPT_TAIL:] and info.prompt_tokens == len(prompt)
    assert token_output([produced._replace(first=False)], time.time()).new_requests == []
    batch = BatchDetokenizer(tokenizer)
    text, _ = batch.process(m.decode(m.encode(out)), unexpected)
    assert batch.states["r"].ids == prompt[-PROMPT_TAIL:] + [token]
    assert text.deltas[0].text == " yes" and text.deltas[0].prompt_tokens == len(prompt)

    scored = Request("s", prompt, SamplingParams(prompt_logprobs=True), 5)
    assert request_info(scored, time.time()).prompt_ids == prompt
    seq2seq = Request("t", [0], SamplingParams(), 5, encoder_ids=prompt)
    info = request_info(seq2seq, time.time())
    assert info.prompt_ids == [] and info.prompt_tokens == len(prompt)


def test_a_replayed_request_decodes_on_as_if_never_interrupted(tokenizer):
    """A replay's first delta continues the text (spacing, stop sequences) of the tokens it had."""
    ids = tokenizer(" the cat sat on the mat and then it sat", add_special_tokens=False)["input_ids"]
    whole = BatchDetokenizer(tokenizer)
    first = m.DetokRequestInfo("r", [1], 4, ["sat on"])
    texts = [
        whole.process(m.BatchTokenOutput([first] if i == 0 else [], ["r"], [t], [0.0], [None]), unexpected)[0]
        for i, t in enumerate(ids)
    ]
    replay = BatchDetokenizer(tokenizer)
    info = m.DetokRequestInfo("r~1", [1], 4, ["sat on"], ids[:2])
    out, stopped = replay.process(m.BatchTokenOutput([info], ["r~1"], [ids[2]], [0.0], [None]), unexpected)
    assert out.deltas[0].text == texts[2].deltas[0].text and out.deltas[0].generated_tokens == 3
    out, stopped = replay.process(m.BatchTokenOutput([], ["r~1"], [ids[3]], [0.0], [None]), unexpected)
    assert stopped == ["r~1"] and out.deltas[0].text == texts[3].deltas[0].text


def test_the_last_delta_carries_the_stage_times(tokenizer):
    """The scheduler's stages come with the first tokens; the last delta closes ``decode`` (from the
    scheduler's first-token time) and adds the detokenizer's own time; earlier deltas carry none."""
    ids = tokenizer(" one two three", add_special_tokens=False)["input_ids"]
    batch = BatchDetokenizer(tokenizer)
    stages = m.StageTimes(tokenize=0.001, queue=0.02, prefill=0.3, decode=0.0, detokenize=0.0)
    info = m.DetokRequestInfo("r", [1], 4, [], stages=stages, first_token_time=time.time() - 2.0)
    out, _ = batch.process(m.BatchTokenOutput([info], ["r"], [ids[0]], [0.0], [None]), unexpected)
    assert out.deltas[0].stages is None
    out, _ = batch.process(m.BatchTokenOutput([], ["r"], [ids[1]], [0.0], ["length"]), unexpected)
    last = out.deltas[0].stages
    assert (last.tokenize, last.queue, last.prefill) == (0.001, 0.02, 0.3)
    assert 2.0 <= last.decode < 10.0
    assert 0.0 < last.detokenize < 1.0
    untimed = m.DetokRequestInfo("u", [1], 4, [])  # without stages (as other tests make them): none sent
    out, _ = batch.process(m.BatchTokenOutput([untimed], ["u"], [ids[0]], [0.0], ["eos_token"]), unexpected)
    assert out.deltas[0].stages is None


def test_a_request_whose_tokens_raise_fails_alone(tokenizer):
    """One request's share of a step that raises (here a token id no tokenizer can decode) fails that
    request: the others get their text, and its later tokens are dropped."""
    ids = tokenizer(" one two", add_special_tokens=False)["input_ids"]
    batch = BatchDetokenizer(tokenizer)
    infos = [m.DetokRequestInfo(rid, [1], 4, ["two"]) for rid in ("good", "bad", "replayed")]
    infos[2].output_ids = [-5]  # its replayed tokens raise before its first token
    failed: dict[str, Exception] = {}
    step = m.BatchTokenOutput(infos, ["good", "bad", "replayed"], [ids[0], -5, ids[0]], [0.0] * 3, [None] * 3)
    out, stopped = batch.process(step, failed.__setitem__)
    assert [d.rid for d in out.deltas] == ["good"] and out.deltas[0].text == " one"
    assert sorted(failed) == ["bad", "replayed"] and isinstance(failed["bad"], OverflowError)
    assert sorted(batch.states) == ["good"]
    step = m.BatchTokenOutput([], ["bad", "good", "replayed"], [ids[1]] * 3, [0.0] * 3, [None] * 3)
    out, stopped = batch.process(step, unexpected)
    assert [d.rid for d in out.deltas] == ["good"] and stopped == ["good"]
