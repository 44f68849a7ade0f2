"""KV-cache pages: which fixed-size blocks of the worker's cache each request holds, and the prefix cache.

Pure Python so the scheduler policy can be tested without a model. The worker only ever
sees block ids (through the step's block tables and slot mapping).

Prefix caching (block hashing, as nano-vllm and vLLM do): once a block is full and its KV
computed, it is registered under a hash of (hash of the previous block, its tokens). A new
request reuses the longest run of registered blocks that starts its token sequence. Blocks
are reference counted; a block nobody holds goes to the free list but keeps its hash, so it
can be revived until it is handed out again (least recently freed first: LRU eviction).
Only full blocks are shared, and a request always computes at least its last token, so the
block a request writes into is never shared.

Sliding windows (a model whose every layer has one: Mistral, StarCoder2): a page whose positions are
all behind the window of the request's next query is read by no later step, so it goes back to the
pool (vLLM's ``SlidingWindowManager``), keeping its prefix-cache entry like any released page. Its
entry in the request's table becomes ``NULL_BLOCK``, a page no request holds or writes (its K/V stay
zero): the attention paths that gather whole tables (padded decode groups, a chunk after a cached
prefix) read it masked, never another request's page. The freed entries are always the table's first
ones. Prefix matching still takes a whole chain from the first block (vLLM needs only the window's
last blocks): a request whose early blocks were freed and then evicted computes them again.

With ``record_events`` it also records what the prefix cache gains and loses (``tgi_zmq.kv_events``),
for the scheduler to publish.
"""

from __future__ import annotations

from collections import OrderedDict

from tgi_zmq.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, external_hash

NULL_BLOCK = 0  # with a window: the page freed table entries point at, never handed out


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints: the pages that ``a`` tokens need, say."""
    return -(-a // b)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
        window: int | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        if window is not None and (window <= 0 or num_blocks < 2):
            raise ValueError("a window must be positive, and leave a page beside the null page")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window  # every layer's (the largest): pages behind it are freed
        self.capacity = num_blocks - 1 if window else num_blocks  # pages requests can hold
        self.events: list[KVEvent] | None = [] if record_events else None  # since the last take_events
        self.clear()

    def clear(self) -> None:
        """Forget every block: the workers' KV cache was lost (a restart). Recorded as
        ``AllBlocksCleared``, also at the start: a new scheduler's cache is empty."""
        first = NULL_BLOCK + 1 if self.window else 0
        # in LRU order
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, self.num_blocks))
        self.ref_counts = [0] * self.num_blocks
        self.block_key: list[tuple[int, tuple[int, ...]] | None] = [None] * self.num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.num_cached_free = 0  # free blocks that still hold a registered prefix
        if self.events is not None:
            self.events.append(AllBlocksCleared())

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call (none without ``record_events``)."""
        if self.events is None:
            return []
        events, self.events = self.events, []
        return events

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        """Blocks held by requests or kept by the prefix cache."""
        return self.capacity - self.num_free + self.num_cached_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return ceil_div(num_tokens, self.block_size)

    # ------------------------------------------------------------------ allocation

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend ``table`` in place so it holds ``num_tokens`` tokens; False if pages ran out."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > len(self.free_ids):
            return False
        for _ in range(missing):
            block, _ = self.free_ids.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        """Drop a request's reference to its blocks and empty the table.

        Tail blocks are freed first so they are also evicted first: a prefix outlives its tails.
        """
        for block in reversed(table):
            if self.window and block == NULL_BLOCK:
                continue  # an entry freed behind the window
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids[block] = None
                self.num_cached_free += self.block_key[block] is not None
        table.clear()

    def behind_window(self, position: int) -> int:
        """How many leading pages no query at ``position`` or later reads: all their positions are
        ``window`` or more before it (a query at p sees p - window < j <= p). 0 without a window."""
        if not self.window:
            return 0
        return max(0, (position + 1 - self.window) // self.block_size)

    def free_leading(self, table: list[int], freed: int, count: int) -> int:
        """Release ``table``'s pages from index ``freed`` (the leading ones freed already) to ``count``,
        and point their entries at ``NULL_BLOCK``; returns the leading pages freed now."""
        if count <= freed:
            return freed
        self.release(table[freed:count])
        table[freed:count] = [NULL_BLOCK] * (count - freed)
        return count

    # ------------------------------------------------------------------ prefix cache

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Take references on the cached blocks that hold the first tokens of ``token_ids``.

        At most ``max_tokens`` tokens are matched (whole blocks only). Returns the block ids
        and the hash of the last one (the parent of the request's next full block).
        """
        if not self.enable_prefix_caching:
            return [], 0
        blocks: list[int] = []
        parent = 0
        size = self.block_size
        for start in range(0, max_tokens - size + 1, size):
            key = (parent, tuple(token_ids[start : start + size]))
            block = self.cached.get(hash(key))
            if block is None or self.block_key[block] != key:
                break
            blocks.append(block)
            parent = hash(key)
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_ids[block]
                self.num_cached_free -= 1  # revived: matched blocks are registered
            self.ref_counts[block] += 1
        return blocks, parent

    def register(
        self, table: list[int], token_ids: list[int], num_computed: int, hashed: int, parent: int
    ) -> tuple[int, int]:
        """Register a request's newly full, computed blocks so later requests can reuse them.

        ``hashed`` blocks of ``table`` are already done and ``parent`` is the hash of the last
        one; returns the new ``(hashed, parent)``, so each block is hashed once.
        """
        if not self.enable_prefix_caching:
            return hashed, parent
        size = self.block_size
        stored: BlockStored | None = None  # the event of the run of blocks registered just now
        for i in range(hashed, num_computed // size):
            key = (parent, tuple(token_ids[i * size : (i + 1) * size]))
            digest = hash(key)
            block = table[i]
            if self.block_key[block] is None and digest not in self.cached:
                self.block_key[block] = key
                self.cached[digest] = block
                if self.events is not None:
                    stored = self._record_stored(stored, digest, key)
            else:
                stored = None  # another block holds it: a run after it names it as its parent
            parent = digest
        return max(hashed, num_computed // size), parent

    def _record_stored(self, run: BlockStored | None, digest: int, key: tuple) -> BlockStored:
        parent, tokens = key
        if run is None:
            run = BlockStored([], external_hash(parent) if parent else None, [])
            self.events.append(run)
        run.block_hashes.append(external_hash(digest))
        run.token_ids.extend(tokens)
        return run

    def _forget(self, block: int) -> None:
        """A cached block is handed out again: evict its entry."""
        key = self.block_key[block]
        if key is not None:
            self.num_cached_free -= 1  # only free blocks are handed out
            digest = hash(key)
            if self.cached.get(digest) == block:
                del self.cached[digest]
                if self.events is not None:
                    self._record_removed(external_hash(digest))
            self.block_key[block] = None

    def _record_removed(self, digest: int) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(digest)
        else:
            self.events.append(BlockRemoved([digest]))
