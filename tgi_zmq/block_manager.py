"""KV-cache pages: which fixed-size blocks of the worker's cache each request holds.

Pure Python so the scheduler policy can be tested without a model. The worker only ever
sees block ids (through the step's block tables and slot mapping).
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend ``table`` in place so it holds ``num_tokens`` tokens; False if pages ran out."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > len(self.free_ids):
            return False
        for _ in range(missing):
            block = self.free_ids.popleft()
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        """Drop a request's reference to its blocks (tail first) and empty the table."""
        for block in reversed(table):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
        table.clear()
