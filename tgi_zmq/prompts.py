"""Tokenization (pure; the process loop is processes/tokenizer.py), the detokenizer's mirror.

A prompt gets the tokenizer's special tokens, a chat gets the model's template; then the prompt is
truncated as asked, checked against the length limits, and ``max_new_tokens`` is resolved: the
scheduler gets one ``ScheduleRequest`` with the single limit it obeys. A replayed request (after a
fault) comes with its prompt ids and is not tokenized again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.messages import GenerateRequest, ScheduleRequest, TokenSpan
from tgi_zmq.tools import with_tool_prompt
from tgi_zmq.validation import check_lengths

if TYPE_CHECKING:  # transformers is a slow import: the process loads it after its first heartbeat
    from transformers import PreTrainedTokenizerBase


class TemplateError(RequestError):
    """The model has no chat template, or its template raised (TGI's 422 ``template_error``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Template error: {reason}", error_type="template_error", status=422)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, req: GenerateRequest) -> list[int]:
    """Token ids of a request: raw prompts get the tokenizer's special tokens, chats the template."""
    if req.chat is None:
        if not req.prompt:
            raise ValidationError("`inputs` cannot be empty")
        return tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
    text = render_chat(tokenizer, req.chat, req.tools, req.tool_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValidationError("`inputs` cannot be empty")
    return ids


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_prompt: str | None = None,
) -> str:
    """The prompt text of a chat: the model's template, with the generation prompt. ``tools`` go to
    a template that uses them; the tool prompt (and the tools' JSON, for a template that does not)
    ends the last message, as in TGI."""
    if not tokenizer.chat_template:
        raise TemplateError("template not found")
    in_template = "tools" in str(tokenizer.chat_template)
    if tools:
        chat = with_tool_prompt(chat, tools, tool_prompt, in_template=in_template)
    template_tools = tools if tools and in_template else None
    try:
        return tokenizer.apply_chat_template(
            chat, tools=template_tools, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja raises many types, including the template's raise_exception
        raise TemplateError(str(exc)) from None


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    req: GenerateRequest,
    *,
    max_input_tokens: int,
    max_total_tokens: int,
    vocab_size: int | None = None,
) -> ScheduleRequest:
    """The request for the scheduler; raises ``RequestError`` (the client's 422) when refused.
    ``vocab_size`` is the model's (its logits; it can differ from the tokenizer's length), the bound of
    the token ids a client names; None: the tokenizer's length."""
    if req.prompt_ids is not None:  # a replay: tokenized (and truncated) the first time
        ids = req.prompt_ids
    else:
        _check_token_ids(req, vocab_size or len(tokenizer))
        ids = prompt_ids(tokenizer, req)
        truncate = req.params.truncate
        if truncate is not None and 0 < truncate < len(ids):
            ids = ids[-truncate:]
    max_new_tokens = check_lengths(
        len(ids),
        req.max_new_tokens,
        truncate=req.params.truncate,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
    )
    return ScheduleRequest(req.rid, ids, req.params, max_new_tokens, req.arrival_time, req.output_ids)


def _check_token_ids(req: GenerateRequest, vocab_size: int) -> None:
    """Token ids given by the client must name the model's tokens (a wrong one would index past the
    logits)."""
    ids = [b.token for b in req.params.logit_bias] + req.params.stop_token_ids
    wrong = [t for t in ids if not 0 <= t < vocab_size]
    if wrong:
        raise ValidationError(f"token id {wrong[0]} is not in the vocabulary (0 to {vocab_size - 1})")


def token_spans(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, add_special_tokens: bool = True
) -> list[TokenSpan]:
    """The /tokenize answer: each token of ``prompt`` (special tokens included) and its text."""
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [
        TokenSpan(tid, prompt[start:stop], start, stop)
        for tid, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
