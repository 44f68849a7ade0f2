"""Tokenizer process: chat template, tokenization and length validation.

frontend --GenerateRequest/TokenizeRequest/AbortRequest/FrontendStarted--> [tokenizer]
[tokenizer] --TokenizedRequest/AbortRequest/FrontendStarted--> scheduler
[tokenizer] --PromptIds/ErrorOutput/TokenizeResult--> frontend

A replayed request (after a fault) comes with its prompt ids: it is not tokenized again.
"""

from __future__ import annotations

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.runtime import exit_on_sigterm, pull, push, setup_logging, start_heartbeat
from tgi_zmq.validation import ValidationError, check_lengths

log = setup_logging("tokenizer")


class TemplateError(Exception):
    pass


def prompt_ids(tokenizer, req: m.GenerateRequest) -> list[int]:
    """Token ids of a request: raw prompts get the tokenizer's special tokens, chats the template."""
    if req.chat is None:
        if not req.prompt:
            raise ValidationError("`inputs` cannot be empty")
        return tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
    if not tokenizer.chat_template:
        raise TemplateError("Template error: template not found")
    try:
        text = tokenizer.apply_chat_template(req.chat, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises many types, including the template's raise_exception
        raise TemplateError(f"Template error: {exc}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValidationError("`inputs` cannot be empty")
    return ids


def tokenize(tokenizer, config: ServerConfig, req: m.GenerateRequest) -> m.TokenizedRequest:
    if req.prompt_ids is not None:  # a replay: tokenized (and truncated) the first time
        ids = req.prompt_ids
    else:
        ids = prompt_ids(tokenizer, req)
        if req.params.truncate is not None and 0 < req.params.truncate < len(ids):
            ids = ids[-req.params.truncate :]
    max_new = check_lengths(
        len(ids),
        req.params,
        max_input_tokens=config.max_input_tokens,
        max_total_tokens=config.max_total_tokens,
    )
    return m.TokenizedRequest(req.rid, ids, req.params, max_new, req.arrival_time, req.output_ids)


def token_rows(tokenizer, prompt: str) -> list[list]:
    """The /tokenize answer: [id, text, start, stop] per token, offsets into the input."""
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    return [
        [tid, prompt[start:stop], start, stop]
        for tid, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def main() -> None:
    exit_on_sigterm()
    config = ServerConfig.load()
    loaded = False
    start_heartbeat(config, "tokenizer", lambda: loaded)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_id)
    ctx = zmq.Context.instance()
    inbox = pull(ctx, config.endpoint("tokenizer"))
    to_scheduler = push(ctx, config.endpoint("scheduler"))
    to_frontend = push(ctx, config.endpoint("frontend"))
    loaded = True
    log.info("ready (model %s)", config.model_id)
    while True:
        try:
            msg = m.decode(
                inbox.recv(), (m.GenerateRequest, m.TokenizeRequest, m.AbortRequest, m.FrontendStarted)
            )
        except m.ProtocolError as exc:
            log.error("dropped a bad frame: %s", exc)
            continue
        if isinstance(msg, m.AbortRequest | m.FrontendStarted):
            to_scheduler.send(m.encode(msg))
        elif isinstance(msg, m.TokenizeRequest):
            to_frontend.send(m.encode(m.TokenizeResult(msg.rid, token_rows(tokenizer, msg.prompt))))
        else:
            handle_generate(tokenizer, config, msg, to_scheduler, to_frontend)


def handle_generate(tokenizer, config, req: m.GenerateRequest, to_scheduler, to_frontend) -> None:
    try:
        tokenized = tokenize(tokenizer, config, req)
    except ValidationError as exc:
        log.info("rid=%s rejected: %s", req.rid, exc)
        error = m.ErrorOutput(req.rid, f"Input validation error: {exc}", "validation", 422)
        to_frontend.send(m.encode(error))
        return
    except TemplateError as exc:
        log.info("rid=%s rejected: %s", req.rid, exc)
        to_frontend.send(m.encode(m.ErrorOutput(req.rid, str(exc), "template_error", 422)))
        return
    if req.prompt_ids is None:
        to_frontend.send(m.encode(m.PromptIds(req.rid, tokenized.input_ids)))
    log.info(
        "rid=%s tokenized: %d input tokens, max_new_tokens %d%s",
        req.rid,
        len(tokenized.input_ids),
        tokenized.max_new_tokens,
        f", replayed after {len(req.output_ids)} output tokens" if req.prompt_ids is not None else "",
    )
    to_scheduler.send(m.encode(tokenized))


if __name__ == "__main__":
    main()
