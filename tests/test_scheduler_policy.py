"""The page allocator (block manager, prefix cache) and the scheduling policy over it (hypothesis)."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_zmq.block_manager import NULL_BLOCK, BlockManager
from tgi_zmq.kv_events import BlockRemoved, external_hash
from tgi_zmq.messages import Grammar, SamplingParams
from tgi_zmq.policy import MAX_SCORED_ROWS, Request, RequestStatus, SchedulePolicy
from tgi_zmq.step import build_step


def test_grow_and_release():
    bm = BlockManager(4, 16)
    table: list[int] = []
    assert bm.grow(table, 17) and len(table) == 2
    assert bm.grow(table, 32) and len(table) == 2
    assert not bm.grow(table, 16 * 5)  # only 2 blocks left: nothing taken
    assert len(table) == 2 and bm.num_free == 2
    bm.release(table)
    assert table == [] and bm.num_free == 4


def check_invariants(sched: SchedulePolicy) -> None:
    bm = sched.block_manager
    held = {r.rid: r.blocks[r.freed_blocks :] for r in sched.running + list(sched.waiting)}
    holders = Counter(b for blocks in held.values() for b in blocks)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == holders[block], f"block {block}: refcount != holders"
        null = bm.window is not None and block == NULL_BLOCK
        assert (block in bm.free_ids) == (holders[block] == 0 and not null), f"block {block} free and held"
    for req in sched.running:
        assert len(set(held[req.rid])) == len(held[req.rid]), "a request holds a block twice"
        assert req.blocks[: req.freed_blocks] == [NULL_BLOCK] * req.freed_blocks
        assert req.freed_blocks <= bm.behind_window(req.num_computed), "a page its next step reads was freed"
    assert bm.num_cached_free == sum(1 for b in bm.free_ids if bm.block_key[b] is not None)
    for req in sched.waiting:
        assert req.blocks == [] and req.num_computed == 0
    for req in sched.running:
        assert len(req.blocks) >= bm.blocks_for(req.num_computed)
    rows = [req.row.index for req in sched.running]
    assert sorted(rows + sched.free_rows) == list(range(sched.max_running)), "a state row shared or lost"
    assert all(req.status is RequestStatus.RUNNING for req in sched.running)
    waiting = {RequestStatus.WAITING, RequestStatus.WAITING_FOR_GRAMMAR, RequestStatus.PREEMPTED}
    assert all(req.row is None and req.status in waiting for req in sched.waiting)


actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(0, 2**31), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("lose workers"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    actions=actions,
    num_blocks=st.integers(3, 24),
    budget=st.integers(1, 48),
    lag=st.booleans(),
    window=st.sampled_from([None, None, 1, 5, 8]),
)
def test_policy_never_double_allocates_or_leaks(actions, num_blocks, budget, lag, window):
    """Random arrivals, lengths, aborts, preemptions and worker losses; with ``lag`` results land one step
    late; with a
    ``window`` pages behind it are freed. Each step goes through a worker's page tables (``WorkerTables``)."""
    bm = BlockManager(num_blocks, 4, window=window)
    sched = SchedulePolicy(bm, budget, 8, eos_token_ids=(0,), max_total_tokens=bm.capacity * 4)
    worker = WorkerTables(window)
    made = []
    pending: list = []  # scheduled steps whose results have not been applied yet

    def step(token: int) -> bool:
        batch = sched.schedule()
        if batch:
            worker.run(batch)
            n = sum(batch.samples())
            pending.append((batch, [(token + i) % 5 for i in range(n)], [0.0] * n))
        applied = bool(pending) and (len(pending) > int(lag) or batch is None)
        if applied:
            sched.update(*pending.pop(0))
        return batch is not None or applied

    for kind, a, b in actions:
        if kind == "add":
            prompt = [1] * min(a, bm.capacity * 4 - b)
            if not prompt:
                continue
            req = Request(f"r{len(made)}", prompt, SamplingParams(), b)
            made.append(req)
            sched.add(req)
        elif kind == "abort" and made:
            req = made[a % len(made)]
            if not req.finished:
                sched.finish(req, "aborted")
        elif kind == "step":
            step(a)
        elif kind == "lose workers":  # their KV cache and page tables are gone
            sched.forget_cache()
            worker.tables.clear()
        check_invariants(sched)
    while sched.has_work() or pending:  # everything finishes: every block comes back
        assert step(1), "deadlock: work left but nothing schedulable"
        check_invariants(sched)
    assert bm.num_free == bm.capacity
    assert all(r.finish_reason and r.status is RequestStatus.FINISHED and r.row is None for r in made)
    assert all(t >= 0 for r in made for t in r.token_ids)


class WorkerTables:
    """The workers' page tables, as each step's page updates leave them; checks that every key a step's
    queries read (their window) is in a page their request holds, and that a freed entry is the null page."""

    def __init__(self, window: int | None):
        self.window = window
        self.tables: dict[int, dict[int, int]] = {}  # state row -> page index -> page id

    def run(self, batch) -> None:
        step = build_step(batch, 4)
        for row, index, page in step.inputs.new_pages.tolist():
            self.tables.setdefault(row, {})[index] = page
        for req, start, n in zip(batch.requests, batch.starts, batch.num_new, strict=True):
            table = self.tables[req.row.index]
            first = max(0, start + 1 - self.window) if self.window else 0  # the first query's first key
            for index in range(first // 4, (start + n - 1) // 4 + 1):
                assert index >= req.freed_blocks and table[index] == req.blocks[index], "a key not held"
            assert all(table.get(i, NULL_BLOCK) == NULL_BLOCK for i in range(req.freed_blocks))


def test_preemption_takes_the_newest_and_requeues_it_first():
    sched = SchedulePolicy(BlockManager(4, 4), 64, 8, eos_token_ids=(), max_total_tokens=16)
    old, new = Request("old", [1] * 8, SamplingParams(), 8), Request("new", [2] * 7, SamplingParams(), 8)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert batch.requests == [old, new]
    sched.update(batch, [1, 1], [0.0, 0.0])  # old: 9 tokens (needs a 3rd block), new: 8
    batch = sched.schedule()
    assert batch.requests == [old] and sched.waiting[0] is new and new.num_computed == 0
    assert sched.num_preemptions == 1


def test_chunked_prefill_respects_the_step_budget():
    sched = SchedulePolicy(BlockManager(64, 4), 10, 8, eos_token_ids=(), max_total_tokens=256)
    long = Request("long", list(range(25)), SamplingParams(), 4)
    sched.add(long)
    chunks = []
    while not long.output_ids:
        batch = sched.schedule()
        chunks.append(batch.num_new[0])
        sched.update(batch, [7] * sum(batch.samples()), [0.0] * sum(batch.samples()))
    assert chunks == [10, 10, 5]


def test_a_prompt_beside_decodes_runs_in_chunks_sized_by_the_measured_step_costs():
    """Decode-only steps take 50 ms and a prompt token 2 ms: the first chunk beside the decodes gets
    1.5 * 50 / 2 = 37 tokens (its step ~2.5 decode steps); each mixed step's time then corrects the
    size; alone, a prompt gets the whole budget, and so does a burst of arrivals."""
    sched = SchedulePolicy(BlockManager(64, 4), 100, 8, (), 256)
    sched.add(Request("a", [1, 2, 3], SamplingParams(), 50))
    first = sched.schedule()
    sched.costs.observe(first, 0.006)  # 3 prompt tokens, nothing decoding: 2 ms a token
    sched.update(first, [5], [0.0])
    for _ in range(3):
        decode = sched.schedule()
        assert decode.num_new == [1]
        sched.costs.observe(decode, 0.05)
        sched.update(decode, [5], [0.0])
    sched.add(Request("b", list(range(1, 200)), SamplingParams(), 5))
    mixed = sched.schedule()
    assert mixed.num_new == [1, 37]
    sched.costs.observe(mixed, 0.25)  # twice the 125 ms target: the next chunk is half
    sched.update(mixed, [5], [0.0])
    assert sched.schedule().num_new == [1, 18]
    sched.costs.observe(mixed, 0.0625)  # half the target: twice as many
    assert sched.costs.mixed_chunk(100) == 36
    sched.add(Request("c", list(range(1, 50)), SamplingParams(), 5))
    sched.add(Request("d", list(range(1, 50)), SamplingParams(), 5))
    burst = sched.schedule()  # 2 waiting for 1 decoding (b's chunk aside): the whole budget
    assert burst.num_new[0] == 1 and sum(burst.num_new) == 1 + 100  # a's decode, then 100 prompt tokens


def test_requests_waiting_for_their_grammars_make_no_burst():
    """Only requests that can run count toward the waiting-served ratio: two waiting for their grammars
    and one ready, beside one decode, leave the ready prompt its measured chunk, not the whole budget."""
    sched = SchedulePolicy(BlockManager(64, 4), 100, 8, (), 256)
    sched.add(Request("a", [1, 2, 3], SamplingParams(), 50))
    first = sched.schedule()
    sched.costs.observe(first, 0.006)  # 2 ms a prompt token
    sched.update(first, [5], [0.0])
    decode = sched.schedule()
    sched.costs.observe(decode, 0.05)
    sched.update(decode, [5], [0.0])
    for rid in ("g1", "g2"):
        sched.add(Request(rid, [1, 2, 3], SamplingParams(grammar=Grammar("regex", "ab")), 5))
    sched.add(Request("b", list(range(1, 200)), SamplingParams(), 5))
    assert sched.schedule().num_new == [1, 37]


def test_finish_reasons():
    sched = SchedulePolicy(BlockManager(64, 4), 64, 8, eos_token_ids=(2,), max_total_tokens=12)
    eos = Request("eos", [5, 5], SamplingParams(), 10)
    ignore = Request("ignore", [5, 5], SamplingParams(ignore_eos=True), 2)
    ctx = Request("ctx", [5] * 10, SamplingParams(ignore_eos=True), 10)  # hits max_total_tokens
    for r in (eos, ignore, ctx):
        sched.add(r)
    while sched.has_work():
        batch = sched.schedule()
        n = sum(batch.samples())
        sched.update(batch, [2] * n, [0.0] * n)
    assert (eos.finish_reason, ignore.finish_reason, ctx.finish_reason) == ("eos_token", "length", "length")
    assert ignore.output_ids == [2, 2] and ctx.num_tokens == 12


def test_prefix_blocks_are_shared_then_evicted_lru():
    bm = BlockManager(6, 4)
    prompt = list(range(10))  # two full blocks + 2 tokens
    first: list[int] = []
    assert bm.grow(first, 10)
    prefix_blocks = first[:2]
    hashed, parent = bm.register(first, prompt, 10, 0, 0)
    assert hashed == 2
    hit, parent2 = bm.match_prefix(prompt + [99], 10)
    assert hit == prefix_blocks and parent2 == parent
    assert bm.ref_counts[prefix_blocks[0]] == 2
    bm.release(hit)
    bm.release(first)
    assert bm.num_free == 6 and bm.num_cached_free == 2 and bm.num_used == 2
    again, _ = bm.match_prefix(prompt, 9)  # revived from the free list
    assert again == prefix_blocks and bm.num_free == 4
    bm.release(again)
    other: list[int] = []
    assert bm.grow(other, 6 * 4)  # takes every block: the cached ones are evicted
    bm.release(other)
    assert bm.match_prefix(prompt, 10)[0] == [] and bm.num_cached_free == 0


def test_match_never_covers_the_last_token_and_checks_tokens():
    bm = BlockManager(8, 4)
    table: list[int] = []
    bm.grow(table, 8)
    bm.register(table, list(range(8)), 8, 0, 0)
    assert len(bm.match_prefix(list(range(8)), 7)[0]) == 1  # at most 7 tokens: one full block
    assert bm.match_prefix([0, 1, 2, 5, 4, 5, 6, 7], 8)[0] == []


def test_scheduler_reuses_a_shared_prefix():
    sched = SchedulePolicy(BlockManager(32, 4), 64, 8, eos_token_ids=(), max_total_tokens=64)
    system = list(range(100, 112))
    a = Request("a", system + [1, 2], SamplingParams(), 1)
    sched.add(a)
    batch = sched.schedule()
    sched.update(batch, [7], [0.0])
    b = Request("b", system + [3], SamplingParams(), 1)
    sched.add(b)
    batch = sched.schedule()
    assert batch.requests == [b] and batch.starts == [12] and batch.num_new == [1]
    assert sched.prefix_hit_tokens == 12
    assert sched.prefix_query_tokens == 14 + 13  # every prompt token looked up (vLLM's queries)


def test_no_prefix_lookup_is_counted_without_prefix_caching():
    sched = SchedulePolicy(BlockManager(32, 4, enable_prefix_caching=False), 64, 8, (), 64)
    for rid in "ab":
        sched.add(Request(rid, list(range(100, 113)), SamplingParams(), 1))
    sched.schedule()
    assert sched.prefix_query_tokens == sched.prefix_hit_tokens == 0


def test_forget_cache_drops_every_page_and_the_prefix_cache():
    """A worker restart empties its KV cache: nothing cached may be matched again, every request
    recomputes from its tokens (oldest first), and results of steps in flight are dropped."""
    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(0,), max_total_tokens=64)
    old = Request("old", list(range(1, 10)), SamplingParams(), 5)
    sched.add(old)
    sched.update(sched.schedule(), [7], [0.0])  # prompt computed, 2 full blocks registered
    new = Request("new", list(range(1, 10)), SamplingParams(), 5)
    sched.add(new)
    in_flight = sched.schedule()  # old decodes, new reuses old's cached prefix
    assert sched.prefix_hit_tokens == 8 and len(sched.block_manager.cached) == 2

    assert sched.forget_cache() == [old, new]
    assert list(sched.waiting) == [old, new] and sched.running == []
    assert sched.block_manager.num_free == 16 and sched.block_manager.cached == {}
    for req in (old, new):
        assert req.blocks == [] and req.num_computed == 0 and req.faults == 1
        assert all(t >= 0 for t in req.token_ids)  # placeholders of the void step are gone
    assert old.token_ids == [*range(1, 10), 7]
    assert sched.update(in_flight, [8, 9], [0.0, 0.0]) == []  # the void step's tokens are dropped
    batch = sched.schedule()  # new waits for old to compute their common prompt again
    assert batch.requests == [old] and batch.starts == [0] and sched.prefix_hit_tokens == 8  # no stale hit
    check_invariants(sched)


def test_copies_of_a_prompt_compute_it_once():
    """``n`` / ``best_of`` copies: the first computes the prompt, the others wait until its pages are
    in the prefix cache (the overlap's lag included), then take them."""
    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(), max_total_tokens=32)
    copies = [Request(f"c{i}", list(range(1, 13)), SamplingParams(), 4) for i in range(3)]
    other = Request("other", [7] * 12, SamplingParams(), 4)
    for req in [*copies, other]:
        sched.add(req)
    first = sched.schedule()
    assert first.requests == [copies[0]]  # the queue waits behind the copies, in order
    assert sched.schedule().requests == [copies[0]]  # overlap: the first step's pages not registered yet
    sched.update(first, [5], [0.0])
    batch = sched.schedule()
    assert batch.requests[1:] == [copies[1], copies[2], other]
    assert batch.starts[1:] == [8, 8, 0] and sched.prefix_hit_tokens == 16


def test_a_replayed_request_continues_its_output_and_its_sample_index():

    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(0,), max_total_tokens=64)
    req = Request("r~1", [5, 6, 7, 8, 9, 10], SamplingParams(), 4, prompt_len=3, resumed=3)
    sched.add(req)
    batch = sched.schedule()
    assert batch.num_new == [6] and req.output_ids[:3] == [8, 9, 10]
    assert build_step(batch, 4).sampling.sample_index.tolist() == [3]  # its 4th token: the seeds go on
    (produced,) = sched.update(batch, [11], [0.0])
    assert produced[1] == 11 and req.finish_reason == "length"


def test_a_request_waiting_for_its_grammar_is_passed_over_until_it_is_compiled():
    """vLLM's WAITING_FOR_FSM: the queue behind it goes on; once compiled it runs; after the workers are
    lost it waits for its grammar again, and is announced again."""
    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(), max_total_tokens=64)
    constrained = Request("g", [1, 2, 3], SamplingParams(grammar=Grammar("regex", "ab")), 4)
    plain = Request("p", [4, 5], SamplingParams(), 4)
    sched.add(constrained)
    sched.add(plain)
    assert constrained.status is RequestStatus.WAITING_FOR_GRAMMAR and plain.status is RequestStatus.WAITING
    assert sched.take_grammars() == [constrained] and sched.take_grammars() == []
    batch = sched.schedule()
    assert batch.requests == [plain] and list(sched.waiting) == [constrained]
    sched.grammar_compiled(constrained)
    sched.update(batch, [7], [0.0])
    batch = sched.schedule()
    assert batch.requests == [plain, constrained] and constrained.status is RequestStatus.RUNNING
    sched.forget_cache()
    assert constrained.status is RequestStatus.WAITING_FOR_GRAMMAR and plain.status is RequestStatus.PREEMPTED
    assert sched.take_grammars() == [constrained]
    assert sched.schedule().requests == [plain]


def test_a_request_whose_grammar_is_done_finishes():
    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(), max_total_tokens=64)
    req = Request("g", [1, 2, 3], SamplingParams(grammar=Grammar("regex", "ab")), 10)
    sched.add(req)
    sched.grammar_compiled(req)
    batch = sched.schedule()
    (produced,) = sched.update(batch, [7], [0.0], grammar_done=[False])
    assert produced.first and not req.finished
    batch = sched.schedule()
    (produced,) = sched.update(batch, [8], [0.0], grammar_done=[True])
    assert not produced.first and req.finish_reason == "eos_token" and req.output_ids == [7, 8]


def test_the_rows_and_grammars_of_ended_requests_are_dropped_on_the_workers():

    sched = SchedulePolicy(BlockManager(16, 4), 64, 8, eos_token_ids=(), max_total_tokens=64)
    grammar = SamplingParams(grammar=Grammar("regex", "ab"))
    reqs = [Request("g", [1, 2], grammar, 1), Request("p", [3, 4], SamplingParams(), 1)]
    for req in reqs:
        sched.add(req)
        sched.grammar_compiled(req)
    first = sched.schedule()
    rows = [req.row.index for req in reqs]
    assert [s.row for s in build_step(first, 4).grammars] == [rows[0]]
    assert sched.take_grammar_drops() == ([], [])
    sched.update(first, [5, 6], [0.0, 0.0])  # both finish (one token each): only g had a matcher
    assert sched.has_grammar_drops()
    assert sched.take_grammar_drops() == ([rows[0]], ["g"])  # its row's matcher, its compile
    assert sched.take_grammar_drops() == ([], []) and not sched.has_grammar_drops()


def test_prompt_scoring_requests_share_the_steps_scored_rows():
    """Requests that score their prompt (``prompt_logprobs``) share ``MAX_SCORED_ROWS`` scored tokens a
    step, so a step never makes [4096, vocab] logits; each prompt is still scored whole, position by
    position (its last position predicts the first output token: not scored)."""
    sched = SchedulePolicy(BlockManager(4096, 16), 4096, 8, eos_token_ids=(), max_total_tokens=4096)
    scoring = SamplingParams(prompt_logprobs=True)
    lengths = [700, 300, 1200, 40]
    reqs = [Request(f"s{i}", [1 + i] * n, scoring, 1) for i, n in enumerate(lengths)]
    plain = Request("plain", [9] * 900, SamplingParams(), 1)
    for req in [*reqs, plain]:
        sched.add(req)
    scored: dict[str, list[int]] = {req.rid: [] for req in reqs}
    while sched.has_work():
        batch = sched.schedule()
        rows = batch.scored_prompt()
        assert sum(count for _, _, count in rows) <= MAX_SCORED_ROWS
        for i, position, count in rows:
            scored[batch.requests[i].rid] += range(position, position + count)
        values = [-float(p) for i, position, count in rows for p in range(position, position + count)]
        sched.update(batch, [5] * batch.num_samples, [0.0] * batch.num_samples, prompt_logprobs=values)
    for req, n in zip(reqs, lengths, strict=True):
        assert scored[req.rid] == list(range(n - 1))
        assert req.prompt_logprobs == [None] + [-float(p) for p in range(n - 1)]
    assert plain.output_ids == [5]


# ---------------------------------------------------------------------------------- sliding windows


def decode(sched: SchedulePolicy, token: int = 7):
    """One step: schedule it, build it (the workers get its pages), apply it (its samples are ``token``)."""
    batch = sched.schedule()
    build_step(batch, 4)
    sched.update(batch, [token] * batch.num_samples, [0.0] * batch.num_samples)
    return batch


def held(bm: BlockManager) -> int:
    """Pages requests hold (the prefix cache's free ones aside)."""
    return bm.capacity - bm.num_free


def test_pages_behind_the_window_go_back_to_the_pool_and_the_workers_tables():
    """A window of 8, pages of 4: after a step, the pages whose positions are all 8 or more before the
    next query go back (registered in the prefix cache first); the next step points the workers' entries
    at the null page; a request longer than the pool runs on about window / page size pages."""
    bm = BlockManager(16, 4, window=8)
    sched = SchedulePolicy(bm, 64, 8, eos_token_ids=(), max_total_tokens=256)
    req = Request("r", list(range(1, 31)), SamplingParams(), 60)  # 30 + 60 tokens: more than 15 pages hold
    sched.add(req)
    first = decode(sched)
    assert first.num_new == [30] and held(bm) == 8 - 5 and bm.num_cached_free == 5
    assert req.freed_blocks == 5 and req.blocks[:5] == [NULL_BLOCK] * 5  # positions 0-19: 30 - 19 > 8
    second = sched.schedule()  # its first decode, at position 30: it sees 23-30
    assert build_step(second, 4).inputs.new_pages.tolist() == [
        [req.row.index, i, NULL_BLOCK] for i in range(5)
    ]
    sched.update(second, [7], [0.0])
    while not req.finished:
        decode(sched)
        assert held(bm) <= 3  # the 8 positions its next query sees span 3 pages at most
    assert req.num_tokens == 90 and bm.num_free == bm.capacity


def test_a_prefix_longer_than_the_window_is_reused_until_its_first_blocks_are_evicted():
    """Pages freed behind the window stay in the prefix cache: a request with the same 20-token prefix
    takes all 5 blocks (and frees the first 3 again at once); once the first blocks are evicted, a chain
    with a hole is not reused (the whole chain from the first block is required)."""
    bm = BlockManager(12, 4, window=8, record_events=True)
    sched = SchedulePolicy(bm, 64, 8, eos_token_ids=(), max_total_tokens=44)
    system = list(range(100, 120))
    a = Request("a", system + [1, 2], SamplingParams(), 6)
    sched.add(a)
    decode(sched)
    assert a.freed_blocks == 3 and bm.num_cached_free == 3  # freed, still cached
    b = Request("b", system + [3], SamplingParams(), 6)
    sched.add(b)
    batch = decode(sched)
    assert batch.requests == [a, b] and batch.starts[1] == 20 and sched.prefix_hit_tokens == 20
    assert b.freed_blocks == 3  # revived, then freed again before its first step: it sees 13-20
    while sched.has_work():
        decode(sched)
    bm.take_events()
    sched.add(Request("c", list(range(300, 340)), SamplingParams(), 1))  # takes every page: evicts
    decode(sched)
    (removed,) = [e for e in bm.take_events() if isinstance(e, BlockRemoved)]
    assert external_hash(hash((0, tuple(system[:4])))) in removed.block_hashes  # the chain's first block
    assert bm.cached.get(hash((hash((0, tuple(system[:4]))), tuple(system[4:8])))) is None
    d = Request("d", system + [4], SamplingParams(), 1)
    sched.add(d)
    assert decode(sched).starts == [0] and sched.prefix_hit_tokens == 20  # no hit past the hole
    assert bm.num_free == bm.capacity


@pytest.mark.parametrize("caching", [True, False])
def test_a_page_behind_the_window_is_freed_once_registered(caching):
    """Under the overlap a prompt's second chunk is built before its first one's result: the first
    result frees the pages behind the window of the next query (30: it sees 23-30) that are registered
    in the prefix cache; page 4 (16-19) waits for its own chunk's result. Without the cache it goes at
    once (a later step may hand it to another request: the workers run steps in order)."""
    bm = BlockManager(16, 4, enable_prefix_caching=caching, window=8)
    sched = SchedulePolicy(bm, 16, 8, eos_token_ids=(), max_total_tokens=64)
    req = Request("r", list(range(1, 31)), SamplingParams(), 4)
    sched.add(req)
    first, second = sched.schedule(), sched.schedule()
    assert (first.num_new, second.num_new) == ([16], [14])
    sched.update(first, [], [])
    assert req.freed_blocks == (4 if caching else 5)
    sched.update(second, [7], [0.0])
    assert req.freed_blocks == 5 and held(bm) == 8 - 5 and bm.num_cached_free == (5 if caching else 0)
