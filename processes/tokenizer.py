"""Tokenizer process: the socket loop around ``tgi_zmq.prompts`` (templates, ids, length checks).

frontend --GenerateRequest/TokenizeTextRequest/ChatTokenizeRequest/AbortRequest/FrontendStarted
          /ProfileRequest--> [tokenizer]
[tokenizer] --ScheduleRequest/AbortRequest/FrontendStarted/ProfileRequest--> scheduler
[tokenizer] --PromptIdsOutput/ErrorOutput/TokenizeResult/ChatTokenizeResult--> frontend
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from tgi_zmq import cpus
from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.errors import RequestError, ValidationError
from tgi_zmq.prompts import render_chat, token_spans, tokenize
from tgi_zmq.runtime import (
    die_with_supervisord,
    exit_on_sigterm,
    failure_reporter,
    freeze_heap,
    pull,
    push,
    serve,
    setup_logging,
    start_heartbeat,
)

log = setup_logging("tokenizer")


class TokenizerProcess:
    """The sockets and a ``{message type: handler}`` table."""

    def __init__(self, config: ServerConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        ctx = zmq.Context.instance()
        self.inbox = pull(ctx, config.endpoint("tokenizer"))
        self.to_scheduler = push(ctx, config.endpoint("scheduler"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.handlers: dict[type, Callable[[Any], None]] = {
            m.GenerateRequest: self.generate,
            m.TokenizeTextRequest: self.tokenize_text,
            m.ChatTokenizeRequest: self.chat_tokenize,
            m.AbortRequest: self.pass_on,  # on the same pipe as its request: it cannot overtake it
            m.FrontendStarted: self.pass_on,
            m.ProfileRequest: self.pass_on,
        }

    def run(self) -> None:
        serve(self.inbox, self.handlers, log, failure_reporter(self.to_frontend, "tokenizer", log))

    def pass_on(self, msg: m.AbortRequest | m.FrontendStarted | m.ProfileRequest) -> None:
        self.to_scheduler.send(m.encode(msg))

    def tokenize_text(self, req: m.TokenizeTextRequest) -> None:
        result = m.TokenizeResult(req.rid, token_spans(self.tokenizer, req.prompt))
        self.to_frontend.send(m.encode(result))

    def chat_tokenize(self, req: m.ChatTokenizeRequest) -> None:
        """The /chat_tokenize route: the rendered template and its tokens (as a chat's prompt is)."""
        try:
            text = render_chat(self.tokenizer, req.chat, req.tools, req.tool_prompt)
        except RequestError as exc:
            self.to_frontend.send(m.encode(exc.output(req.rid)))
            return
        spans = token_spans(self.tokenizer, text, add_special_tokens=False)
        self.to_frontend.send(m.encode(m.ChatTokenizeResult(req.rid, text, spans)))

    def generate(self, req: m.GenerateRequest) -> None:
        started = time.perf_counter()
        try:
            if req.params.grammar is not None and self.config.disable_grammar_support:
                # the others are compiled once, by the worker that samples: one it refuses is a 422 then
                raise ValidationError("grammar is not supported")
            scheduled = tokenize(
                self.tokenizer,
                req,
                max_input_tokens=self.config.max_input_tokens,
                max_total_tokens=self.config.max_total_tokens,
                vocab_size=self.config.vocab_size,
            )
        except RequestError as exc:
            log.info("rid=%s rejected: %s", req.rid, exc)
            self.to_frontend.send(m.encode(exc.output(req.rid)))
            return
        scheduled.tokenize_seconds = time.perf_counter() - started
        replay = req.prompt_ids is not None
        if not replay:  # the frontend keeps the ids, to replay the request after a fault
            self.to_frontend.send(m.encode(m.PromptIdsOutput(req.rid, scheduled.input_ids)))
        log.info(
            "rid=%s tokenized in %.2f ms: %d input tokens, max_new_tokens %d%s",
            req.rid,
            scheduled.tokenize_seconds * 1e3,
            len(scheduled.input_ids),
            scheduled.max_new_tokens,
            f", replayed after {len(req.output_ids)} output tokens" if replay else "",
        )
        self.to_scheduler.send(m.encode(scheduled))


def main() -> None:
    exit_on_sigterm()
    die_with_supervisord()
    config = ServerConfig.load()
    cpus.apply("tokenizer", config.local_ranks)
    loaded = False
    start_heartbeat(config, "tokenizer", lambda: loaded)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_id)
    if config.chat_template:  # --chat-template replaces the model's own
        tokenizer.chat_template = config.chat_template
    process = TokenizerProcess(config, tokenizer)
    loaded = True
    freeze_heap()
    log.info("ready (model %s)", config.model_id)
    process.run()


if __name__ == "__main__":
    main()
