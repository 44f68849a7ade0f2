"""A subscriber's index of a publisher's cached blocks, written from vLLM's documented KV-event format
(``vllm/distributed/kv_events.py``, ``examples/.../kv_events_subscriber.py``), not from our encoder:
a message is ``(topic, sequence as u64 big-endian, msgpack [ts, events, dp_rank?])``; an event is a map
tagged by ``type``; a ``BlockStored`` chains its blocks, the first to ``parent_block_hash``."""

from __future__ import annotations

import msgpack
import zmq

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class BlockIndex:
    """Block hash -> (parent hash or None, the block's tokens), as the events left it."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, list[int]]] = {}
        self.last_sequence = -1
        self.cleared = 0  # AllBlocksCleared seen
        self.removed = 0  # blocks removed

    def apply(self, sequence: int, payload: bytes) -> None:
        assert sequence == self.last_sequence + 1, f"batch {sequence} after {self.last_sequence}"
        self.last_sequence = sequence
        ts, events = msgpack.unpackb(payload)[:2]
        assert isinstance(ts, float)
        for event in events:
            getattr(self, "_" + event["type"])(event)

    def _BlockStored(self, event: dict) -> None:  # noqa: N802 (vLLM's tag)
        size, tokens = event["block_size"], event["token_ids"]
        assert len(tokens) == size * len(event["block_hashes"])
        assert event["lora_id"] is None and event["lora_name"] is None and event["medium"] == "GPU"
        parent = event["parent_block_hash"]
        assert parent is None or parent in self.blocks, "a stored block's parent is not cached"
        for i, block_hash in enumerate(event["block_hashes"]):
            assert 0 <= block_hash < 2**64 and block_hash not in self.blocks
            self.blocks[block_hash] = (parent, tokens[i * size : (i + 1) * size])
            parent = block_hash

    def _BlockRemoved(self, event: dict) -> None:  # noqa: N802
        for block_hash in event["block_hashes"]:
            del self.blocks[block_hash]  # a KeyError: removed what was never stored
            self.removed += 1

    def _AllBlocksCleared(self, event: dict) -> None:  # noqa: N802
        self.blocks.clear()
        self.cleared += 1

    def prompts(self) -> set[tuple[int, ...]]:
        """Each cached block's whole token sequence, from the first block down its parents."""
        out = set()
        for block_hash in self.blocks:
            tokens: list[int] = []
            while block_hash is not None:
                parent, own = self.blocks[block_hash]
                tokens[:0] = own
                block_hash = parent
            out.add(tuple(tokens))
        return out


def replay(endpoint: str, start: int, timeout_ms: int = 5000) -> list[tuple[int, bytes]]:
    """Ask a replay ROUTER for every batch from ``start``: a DEALER (a REQ takes one message of the
    several the ROUTER sends), so the empty delimiter frame is ours to send and to strip."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, timeout_ms)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        batches = []
        while True:
            empty, sequence, payload = dealer.recv_multipart()
            assert empty == b""
            if sequence == END_OF_REPLAY:
                assert payload == b""
                return batches
            batches.append((int.from_bytes(sequence, "big"), payload))
    finally:
        dealer.close()
