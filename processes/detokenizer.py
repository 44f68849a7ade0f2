"""Detokenizer process: token ids -> incremental text, stop sequences, deltas to the frontend.

scheduler --BatchTokenOutput/AbortRequest/FrontendStarted--> [detokenizer] --BatchTextOutput--> frontend
                                                           --StopRequest--> scheduler
"""

from __future__ import annotations

import zmq

from tgi_zmq import messages as m
from tgi_zmq.config import ServerConfig
from tgi_zmq.detokenizer import BatchDetokenizer
from tgi_zmq.runtime import exit_on_sigterm, pull, push, setup_logging, start_heartbeat

log = setup_logging("detokenizer")


def main() -> None:
    exit_on_sigterm()
    config = ServerConfig.load()
    loaded = False
    start_heartbeat(config, "detokenizer", lambda: loaded)
    from transformers import AutoTokenizer

    detok = BatchDetokenizer(AutoTokenizer.from_pretrained(config.model_id))
    ctx = zmq.Context.instance()
    inbox = pull(ctx, config.endpoint("detokenizer"))
    to_frontend = push(ctx, config.endpoint("frontend"))
    to_scheduler = push(ctx, config.endpoint("scheduler"))
    loaded = True
    log.info("ready")
    while True:
        try:
            msg = m.decode(inbox.recv(), (m.BatchTokenOutput, m.AbortRequest, m.FrontendStarted))
        except m.ProtocolError as exc:
            log.error("dropped a bad frame: %s", exc)
            continue
        if isinstance(msg, m.AbortRequest):
            detok.forget(msg.rid)
            continue
        if isinstance(msg, m.FrontendStarted):
            detok.forget_all()
            continue
        text_out, stopped = detok.process(msg)
        for rid in stopped:
            to_scheduler.send(m.encode(m.StopRequest(rid)))
        if text_out.deltas:
            to_frontend.send(m.encode(text_out))


if __name__ == "__main__":
    main()
