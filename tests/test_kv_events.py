"""KV-cache events: the block manager's records rebuild its prefix cache exactly through vLLM's wire
format, read by tests/kv_event_index.py's decoder; the publisher's sequence, topic and replay."""

from __future__ import annotations

import random
import time

import zmq

from tests.kv_event_index import BlockIndex, replay
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.kv_events import Publisher, encode_batch, external_hash
from tgi_zmq.messages import SamplingParams
from tgi_zmq.policy import Request, SchedulePolicy

BLOCK = 4


def expected(manager: BlockManager) -> dict[int, tuple[int | None, list[int]]]:
    """The manager's cached blocks as a subscriber should hold them."""
    out = {}
    for digest, block in manager.cached.items():
        parent, tokens = manager.block_key[block]
        out[external_hash(digest)] = (external_hash(parent) if parent else None, list(tokens))
    return out


def run_request(manager: BlockManager, tokens: list[int], reuse: bool = True) -> list[int] | None:
    """A request's life up to its last token: reuse its cached prefix, grow, compute, register.
    ``reuse=False``: it started before a twin registered the same prefix, so computed its own."""
    table, _ = manager.match_prefix(tokens, len(tokens) - 1) if reuse else ([], 0)
    hashed = len(table)
    parent = hash(manager.block_key[table[-1]]) if table else 0
    if not manager.grow(table, len(tokens)):
        manager.release(table)
        return None
    manager.register(table, tokens, len(tokens), hashed, parent)
    return table


def test_the_events_rebuild_the_prefix_cache_exactly_through_evictions_and_clears():
    rng = random.Random(5)
    manager = BlockManager(num_blocks=24, block_size=BLOCK, record_events=True)
    index, sequence, held = BlockIndex(), 0, []
    stems = [[rng.randrange(50) for _ in range(3 * BLOCK)] for _ in range(4)]  # shared prefixes
    for turn in range(400):
        action = rng.random()
        if action < 0.6:
            tokens = rng.choice(stems)[: rng.randrange(1, 13)] + [
                rng.randrange(50) for _ in range(rng.randrange(9))
            ]
            twin = rng.random() < 0.2
            if len(tokens) > 1 and (table := run_request(manager, tokens, reuse=not twin)) is not None:
                held.append(table)
        elif action < 0.97 and held:
            manager.release(held.pop(rng.randrange(len(held))))
        elif action >= 0.97:  # the workers restarted: everything goes
            manager.clear()
            held = []
        events = manager.take_events()
        if events:
            index.apply(sequence, encode_batch(time.time(), events, BLOCK))
            sequence += 1
        assert index.blocks == expected(manager), turn
    assert index.cleared >= 2 and index.removed > 20  # the start and restarts; evictions


def test_without_recording_nothing_is_kept():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    run_request(manager, list(range(9)))
    assert manager.events is None and manager.take_events() == []


def test_the_publisher_sends_numbered_batches_under_its_topic_and_replays_them(tmp_path):
    manager = BlockManager(num_blocks=8, block_size=BLOCK, record_events=True)
    live, replays = f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay"
    publisher = Publisher(live, replays, "kv@test", BLOCK)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@test")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(live)
    time.sleep(0.3)  # a SUB that connects late misses what was sent before: replay is for that
    publisher.publish(manager.take_events())  # AllBlocksCleared: a new manager's cache is empty
    for tokens in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9, 9]):
        run_request(manager, tokens)
        publisher.publish(manager.take_events())
    publisher.publish([])  # nothing happened: no batch
    live_index = BlockIndex()
    for _ in range(3):
        topic, sequence, payload = sub.recv_multipart()
        assert topic == b"kv@test" and len(sequence) == 8
        live_index.apply(int.from_bytes(sequence, "big"), payload)
    assert live_index.blocks == expected(manager) and live_index.cleared == 1

    late = BlockIndex()
    for sequence, payload in replay(replays, 0):
        late.apply(sequence, payload)
    assert late.blocks == live_index.blocks and late.last_sequence == 2
    assert [sequence for sequence, _ in replay(replays, 2)] == [2]
    assert replay(replays, 3) == []
    sub.close()


def test_the_events_follow_pages_freed_behind_a_sliding_window():
    """A windowed model's requests free their early pages while they run: those stay cached (no event)
    until evicted (a ``BlockRemoved``), and the events still rebuild the prefix cache exactly."""
    rng = random.Random(7)
    manager = BlockManager(num_blocks=20, block_size=BLOCK, record_events=True, window=6)
    sched = SchedulePolicy(manager, 16, 8, eos_token_ids=(), max_total_tokens=manager.capacity * BLOCK)
    stems = [[rng.randrange(50) for _ in range(5 * BLOCK)] for _ in range(3)]  # shared prefixes
    index, sequence, freed = BlockIndex(), 0, 0
    for turn in range(300):
        if rng.random() < 0.3 and len(sched.waiting) < 3:
            tokens = rng.choice(stems)[: rng.randrange(1, 21)] + [rng.randrange(50) for _ in range(6)]
            sched.add(Request(f"r{turn}", tokens, SamplingParams(), rng.randrange(1, 12)))
        batch = sched.schedule()
        if batch:
            samples = batch.num_samples
            sched.update(batch, [rng.randrange(50) for _ in range(samples)], [0.0] * samples)
        freed += sum(req.freed_blocks for req in sched.running)
        events = manager.take_events()
        if events:
            index.apply(sequence, encode_batch(time.time(), events, BLOCK))
            sequence += 1
        assert index.blocks == expected(manager), turn
    assert freed > 100 and index.removed > 10
