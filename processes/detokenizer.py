"""Detokenizer process: the socket loop around ``tgi_zmq.textstream`` (incremental text, stops).

scheduler --BatchTokenOutput/AbortRequest/FrontendStarted--> [detokenizer] --BatchTextOutput--> frontend
                                                           --StopRequest--> scheduler
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from tgi_zmq import cpus
from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
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
from tgi_zmq.textstream import BatchDetokenizer

log = setup_logging("detokenizer")


class DetokenizerProcess:
    """The sockets and a ``{message type: handler}`` table."""

    def __init__(self, config: ServerConfig, tokenizer: Any) -> None:
        self.detok = BatchDetokenizer(tokenizer)
        ctx = zmq.Context.instance()
        self.inbox = pull(ctx, config.endpoint("detokenizer"))
        self.to_frontend = push(ctx, config.endpoint("frontend"))
        self.to_scheduler = push(ctx, config.endpoint("scheduler"))
        self.fail = failure_reporter(self.to_frontend, "detokenizer", log)
        self.handlers: dict[type, Callable[[Any], None]] = {
            m.BatchTokenOutput: self.tokens,
            m.AbortRequest: lambda msg: self.detok.forget(msg.rid),
            m.FrontendStarted: lambda msg: self.detok.forget_all(),
        }

    def run(self) -> None:
        serve(self.inbox, self.handlers, log, self.fail)

    def tokens(self, out: m.BatchTokenOutput) -> None:
        text_out, stopped = self.detok.process(out, self.fail)  # a request that raises fails alone
        for rid in stopped:
            self.to_scheduler.send(m.encode(m.StopRequest(rid)))
        if text_out.deltas:
            self.to_frontend.send(m.encode(text_out))
        if log.isEnabledFor(logging.DEBUG):
            log_requests(out, text_out)


def log_requests(out: m.BatchTokenOutput, text_out: m.BatchTextOutput) -> None:
    """DEBUG: the first tokens and the end of each request (``scripts/timeline --request``)."""
    for info in out.new_requests:
        log.debug("rid=%s detokenizing: first token", info.rid)
    for delta in text_out.deltas:
        if delta.finish_reason is not None:
            spent = delta.stages.detokenize * 1e3 if delta.stages else 0.0
            log.debug(
                "rid=%s detokenized: %s after %d tokens, %.2f ms detokenizing",
                delta.rid,
                delta.finish_reason,
                delta.generated_tokens,
                spent,
            )


def main() -> None:
    exit_on_sigterm()
    die_with_supervisord()
    config = ServerConfig.load()
    cpus.apply("detokenizer", config.local_ranks)
    loaded = False
    start_heartbeat(config, "detokenizer", lambda: loaded)
    from transformers import AutoTokenizer

    process = DetokenizerProcess(config, AutoTokenizer.from_pretrained(config.model_id))
    loaded = True
    freeze_heap()
    log.info("ready")
    process.run()


if __name__ == "__main__":
    main()
