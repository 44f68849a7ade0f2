"""KV-cache events in vLLM's wire format, for the routers that track which replica holds which prefix
(llm-d's precise prefix routing, Dynamo's relay, vLLM's router): ``--kv-events-endpoint``.

The block manager records what its prefix cache gains and loses; after each scheduler turn the
records go out as one batch. On the wire, as ``vllm/distributed/kv_events.py`` (vLLM 0.32) sends it:

- PUB, multipart ``(topic, sequence, batch)``: the sequence counts batches from 0 as an unsigned
  8-byte big-endian integer, per scheduler lifetime (a restarted scheduler starts again at 0 with an
  ``AllBlocksCleared``: its cache is empty);
- the batch is msgpack ``[ts, events]`` (vLLM's ``EventBatch`` is array-like, its unset
  ``data_parallel_rank`` left off); each event a map tagged by ``"type"``: ``BlockStored``
  (``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``,
  ``lora_name``), ``BlockRemoved`` (``block_hashes``, ``medium``), ``AllBlocksCleared``;
- hashes are unsigned 64-bit ints (vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); ``medium``
  is ``"GPU"``, the name vLLM's block pool gives its one pool on every device, ours on the CPU too;
- ROUTER replay: a request ``(identity, "", start sequence as 8 bytes)`` gets every kept batch from
  there as ``(identity, "", sequence, batch)``, then ``(identity, "", -1 as 8 signed bytes, "")``.

As in vLLM, an endpoint with ``*``, ``::``, ``ipc://`` or ``inproc://`` is bound, any other
connected to (a collector that binds, as llm-d's); the replay endpoint is always bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque

import msgpack
import zmq

log = logging.getLogger("tgi_zmq.kv_events")

MEDIUM = "GPU"
HASH_MASK = (1 << 64) - 1
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
REPLAY_BATCHES = 10_000  # batches kept for late subscribers (vLLM's buffer_steps)
SEND_HWM = 100_000


def external_hash(digest: int) -> int:
    """A block's prefix-cache hash (a Python hash, signed) as vLLM publishes it: unsigned 64 bits."""
    return digest & HASH_MASK


@dataclasses.dataclass(slots=True)
class BlockStored:
    """Blocks that joined the prefix cache, each the child of the one before it."""

    block_hashes: list[int]
    parent_block_hash: int | None  # None: the first block starts a sequence
    token_ids: list[int]  # every block's tokens, in order


@dataclasses.dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]


@dataclasses.dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(ts: float, events: list[KVEvent], block_size: int) -> bytes:
    """One ``KVEventBatch`` in vLLM's msgpack layout."""
    return msgpack.packb([ts, [_event_fields(event, block_size) for event in events]])


def _event_fields(event: KVEvent, block_size: int) -> dict:
    if isinstance(event, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": block_size,
            "lora_id": None,
            "medium": MEDIUM,
            "lora_name": None,
        }
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": MEDIUM}
    return {"type": "AllBlocksCleared"}


def binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard or local address is bound, a host is connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class Publisher:
    """The PUB socket, the replay ROUTER and the kept batches; a thread sends and serves replays so
    the scheduler's turn only encodes its batch. Sockets are made here, so a bad or taken address
    fails the scheduler's start, and are handed to the thread."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, topic: str, block_size: int) -> None:
        ctx = zmq.Context.instance()
        self.block_size = block_size
        self.topic = topic.encode()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, SEND_HWM)
        if binds(endpoint):
            self.pub.bind(endpoint)
        else:
            self.pub.connect(endpoint)
        self.replay = None
        if replay_endpoint:
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.bind(replay_endpoint)
        feed = f"inproc://kv-events-{id(self)}"
        self.feed = ctx.socket(zmq.PAIR)
        self.feed.bind(feed)
        self.kept: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BATCHES)
        self.sequence = itertools.count()
        threading.Thread(target=self._serve, args=(feed,), name="kv-events", daemon=True).start()
        log.info("KV events: publishing on %s (replay: %s)", endpoint, replay_endpoint or "off")

    def publish(self, events: list[KVEvent]) -> None:
        """Send one turn's events as a batch (called by the scheduler's loop)."""
        if events:
            self.feed.send(encode_batch(time.time(), events, self.block_size))

    def _serve(self, feed_address: str) -> None:
        feed = zmq.Context.instance().socket(zmq.PAIR)
        feed.connect(feed_address)
        poller = zmq.Poller()
        poller.register(feed, zmq.POLLIN)
        if self.replay is not None:
            poller.register(self.replay, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll():
                if sock is feed:
                    self._send(feed.recv())
                else:
                    self._answer_replay(self.replay.recv_multipart())

    def _send(self, batch: bytes) -> None:
        sequence = next(self.sequence)
        self.pub.send_multipart([self.topic, sequence.to_bytes(8, "big"), batch])
        self.kept.append((sequence, batch))

    def _answer_replay(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("KV events: dropped a malformed replay request (%d frames)", len(frames))
            return
        identity, start = frames[0], int.from_bytes(frames[2], "big")
        for sequence, batch in list(self.kept):
            if sequence >= start:
                self.replay.send_multipart([identity, b"", sequence.to_bytes(8, "big"), batch])
        self.replay.send_multipart([identity, b"", END_OF_REPLAY, b""])
