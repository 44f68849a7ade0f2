"""Tokenization before scheduling (tgi_zmq.prompts): prompts, chat templates, truncation, limits."""

from __future__ import annotations

import copy

import pytest

from tgi_zmq import messages as m
from tgi_zmq.errors import ValidationError
from tgi_zmq.prompts import TemplateError, prompt_ids, token_spans, tokenize

LIMITS = {"max_input_tokens": 10, "max_total_tokens": 20}
CHAT = [{"role": "user", "content": "hi"}]


def request(
    prompt: str | None = "Hello world", chat=None, max_new_tokens=None, **params
) -> m.GenerateRequest:
    return m.GenerateRequest("r", prompt, chat, m.SamplingParams(**params), max_new_tokens, 1.5)


def with_template(tokenizer, template: str | None):
    other = copy.copy(tokenizer)
    other.chat_template = template
    return other


def test_a_prompt_gets_the_special_tokens_and_a_chat_the_template(tokenizer):
    assert prompt_ids(tokenizer, request()) == tokenizer("Hello world")["input_ids"]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant\n")  # the generation prompt is there
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, request(None, chat=CHAT)) == expected


def test_an_empty_prompt_is_refused(tokenizer):
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        prompt_ids(tokenizer, request(""))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "Template error: template not found"),
        ("{{ raise_exception('no system role') }}", "Template error: no system role"),
    ],
)
def test_template_errors_are_tgi_422s(tokenizer, template, message):
    with pytest.raises(TemplateError) as info:
        prompt_ids(with_template(tokenizer, template), request(None, chat=CHAT))
    exc = info.value
    assert (exc.error, exc.error_type, exc.status) == (message, "template_error", 422)


def test_max_new_tokens_is_resolved_once_for_the_scheduler(tokenizer):
    ids = tokenizer("Hello world")["input_ids"]
    scheduled = tokenize(tokenizer, request(), **LIMITS)
    assert scheduled == m.ScheduleRequest("r", ids, m.SamplingParams(), 20 - len(ids), 1.5)
    assert tokenize(tokenizer, request(max_new_tokens=3), **LIMITS).max_new_tokens == 3


def test_truncation_keeps_the_prompts_end(tokenizer):
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 10
    assert tokenize(tokenizer, request(prompt, truncate=4), **LIMITS).input_ids == ids[-4:]
    with pytest.raises(ValidationError, match="`inputs` must have less than 10 tokens"):
        tokenize(tokenizer, request(prompt, max_new_tokens=1), **LIMITS)


def test_a_replay_is_not_tokenized_again():
    replay = m.GenerateRequest("r~1", "ignored", None, m.SamplingParams(), 4, 1.5, [7, 8], [9])
    scheduled = tokenize(None, replay, **LIMITS)
    assert scheduled == m.ScheduleRequest("r~1", [7, 8], m.SamplingParams(), 4, 1.5, [9])


def test_token_spans_cover_the_prompt(tokenizer):
    prompt = "Hello world, again"
    spans = token_spans(tokenizer, prompt)
    assert [s.id for s in spans] == tokenizer(prompt)["input_ids"]
    assert "".join(s.text for s in spans) == prompt
    assert all(prompt[s.start : s.stop] == s.text for s in spans)


def test_token_ids_are_checked_against_the_models_vocabulary_not_the_tokenizers(tokenizer):
    """The logits have ``vocab_size`` columns (config.json), which can differ from ``len(tokenizer)``."""
    padded = len(tokenizer) + 64  # a model whose embeddings are padded past the tokenizer
    beyond_tokenizer = [m.TokenBias(len(tokenizer) + 3, 1.0)]
    assert tokenize(tokenizer, request(logit_bias=beyond_tokenizer), **LIMITS, vocab_size=padded)
    with pytest.raises(ValidationError, match="token id 100 is not in the vocabulary \\(0 to 99\\)"):
        tokenize(tokenizer, request(logit_bias=[m.TokenBias(100, 1.0)]), **LIMITS, vocab_size=100)
    with pytest.raises(ValidationError, match="token id 100 is not"):
        tokenize(tokenizer, request(stop_token_ids=[100]), **LIMITS, vocab_size=100)
