"""Paged KV cache and attention over it.

The cache of a layer is ``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V.
A step writes its new K/V by slot (``block * block_size + offset``), then attends:
- decodes (one query token per request): on CPU all together in one call of our C++ kernel
  (``csrc/paged_attention.cpp``), which reads each request's pages in place through its block table;
  elsewhere (and for position-biased models, or without the extension) in padded batches of similar
  context length over pages gathered with ``index_select`` (whole blocks: ~8x faster than token by token);
- prefill chunks one request at a time with SDPA: a prompt with nothing cached yet uses the K/V it
  just computed with ``is_causal``; a chunk that continues a cached prefix reads its pages.
``AttentionMetadata`` holds the index tensors, built once per step and shared by all layers.
Models with position-dependent scores (ALiBi, T5's relative buckets) add their bias to it
once per step (``add_position_bias``); cross-attention (T5) uses a non-causal metadata over
the encoder's pages (``causal=False``).
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tgi_zmq import native
from tgi_zmq.block_manager import ceil_div

PositionBias = Callable[[torch.Tensor], torch.Tensor]
"""Maps relative positions ``key - query`` [..., q, k] to float32 score biases [..., heads, q, k]."""


@dataclasses.dataclass
class PrefillSeq:
    lo: int  # first query row in the step's flat tokens
    hi: int
    cached: int  # tokens already in the cache before this chunk
    blocks: torch.Tensor | None  # its block table, when cached > 0
    mask: torch.Tensor | None  # [chunk, keys] bool, or float [heads, chunk, keys]; None: causal
    num_keys: int  # keys it reads: the chunk's own (nothing cached), else its pages' (padded)


@dataclasses.dataclass
class DecodeGroup:
    """Decoding requests of similar context length, attended in one padded batch."""

    rows: torch.Tensor  # [Bd] their query rows in the step
    blocks: torch.Tensor  # [Bd * max_blocks] block ids, padded with block 0
    bias: torch.Tensor  # [Bd, 1 or heads, 1, max_len] float32: -inf for padding (+ position bias)
    max_len: int
    query_pos: torch.Tensor  # [Bd] the query's position (its context length - 1)


@dataclasses.dataclass
class Decodes:
    """Every decoding request of a step (host lists: padded groups are made from them on demand)."""

    which: list[int]  # their indices among the step's requests
    qs: list[int]  # the step's query starts
    ctx: list[int]  # every request's context length
    tables: torch.Tensor  # [B, max_pages] int64: the step's block tables
    block_size: int

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query rows, block tables [Bd, pages the longest needs] and lengths, for the in-place kernel."""
        device = self.tables.device
        lens = [self.ctx[b] for b in self.which]
        pages = ceil_div(max(lens), self.block_size)
        which = torch.tensor(self.which, dtype=torch.int64, device=device)
        rows = torch.tensor([self.qs[b] for b in self.which], dtype=torch.int64, device=device)
        return (
            rows,
            self.tables[which, :pages].contiguous(),
            torch.tensor(lens, dtype=torch.int64, device=device),
        )

    def groups(self) -> list[DecodeGroup]:
        return [
            _decode_group(g, self.qs, self.ctx, self.tables, self.block_size)
            for g in _by_length(self.which, self.ctx)
        ]


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    prefills: list[PrefillSeq]
    in_order: bool  # the decodes are every row of the step, in order
    # decodes: in place (rows, tables, lens for the kernel), or else padded groups over gathered pages
    in_place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    decode_groups: list[DecodeGroup] = dataclasses.field(default_factory=list)
    decodes: Decodes | None = None

    @classmethod
    def for_pages(
        cls,
        qs: list[int],
        ctx: list[int],
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor | None,
        block_size: int,
        causal: bool = True,
        invariant: bool = False,
    ) -> AttentionMetadata:
        """Index tensors for queries ``qs`` (request b's are ``qs[b]:qs[b+1]``) over pages holding
        ``ctx[b]`` keys each, made on the device of ``block_tables`` from host integers only.

        Non-causal (cross-attention): every query sees all its request's keys, which are
        all in the pages already. ``invariant`` (CPU, causal, the extension loaded): every query
        row, prompt tokens too, is one row of the in-place kernel, whose arithmetic for a row depends
        on its own keys alone (batch invariance; a prompt's token gives what decoding it gives).
        """
        tables = block_tables.long()
        if invariant:
            return cls._every_row_in_place(qs, ctx, tables, slot_mapping)
        which, prefills = [], []
        for b in range(len(ctx)):
            n = qs[b + 1] - qs[b]
            if n == 1 and (ctx[b] > 1 or not causal):
                which.append(b)
            else:
                prefills.append(_prefill_seq(qs[b], qs[b + 1], ctx[b], tables[b], block_size, causal))
        meta = cls(slot_mapping, prefills, not prefills and which == list(range(len(ctx))))
        if which:
            meta.decodes = Decodes(which, qs, ctx, tables, block_size)
            if tables.device.type == "cpu" and native.extension() is not None:
                meta.in_place = meta.decodes.kernel_args()
            else:
                meta.decode_groups = meta.decodes.groups()
        return meta

    @classmethod
    def _every_row_in_place(
        cls, qs: list[int], ctx: list[int], tables: torch.Tensor, slot_mapping: torch.Tensor | None
    ) -> AttentionMetadata:
        """Query row t of request b attends the keys up to its own position: its context length is
        ``ctx[b] - (rows of b) + (t's index among them) + 1``; its block table is b's."""
        device = tables.device
        counts = torch.tensor([qs[b + 1] - qs[b] for b in range(len(ctx))], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(ctx)), counts)
        index = torch.arange(qs[-1]) - torch.tensor(qs[:-1], dtype=torch.int64)[owner]
        lens = torch.tensor(ctx, dtype=torch.int64)[owner] - counts[owner] + index + 1
        meta = cls(slot_mapping, [], True)
        rows = torch.arange(qs[-1], device=device)
        meta.in_place = (rows, tables[owner.to(device)].contiguous(), lens.to(device))
        return meta

    def add_position_bias(self, bias: PositionBias) -> None:
        """Fold a position-dependent score bias into the masks (once per step, for all layers); the
        decodes are then attended in padded groups (the kernel takes no bias)."""
        if self.in_place is not None:
            self.in_place, self.decode_groups = None, self.decodes.groups()
        for g in self.decode_groups:
            keys = torch.arange(g.max_len, device=g.bias.device)
            rel = keys.view(1, 1, -1) - g.query_pos.view(-1, 1, 1)  # [Bd, 1, L]
            g.bias = g.bias + bias(rel)  # [Bd, heads, 1, L]
        for seq in self.prefills:
            ctx = seq.cached + seq.hi - seq.lo
            mask = seq.mask if seq.mask is not None else _causal(seq, self.slot_mapping.device)
            keys = torch.arange(seq.num_keys, device=mask.device)
            rel = keys.view(1, -1) - torch.arange(seq.cached, ctx, device=mask.device).view(-1, 1)
            seq.mask = bias(rel).masked_fill(~mask, float("-inf"))


def _causal(seq: PrefillSeq, device: torch.device, window: int = 0) -> torch.Tensor:
    """[chunk, keys] bool: the chunk's query i (position cached + i) sees keys up to its own (and, with
    a ``window``, none ``window`` or more before it)."""
    keys = torch.arange(seq.num_keys, device=device).view(1, -1)
    positions = torch.arange(seq.cached, seq.cached + seq.hi - seq.lo, device=device).view(-1, 1)
    visible = keys <= positions
    return visible & (keys > positions - window) if window else visible


def _prefill_seq(
    lo: int, hi: int, ctx: int, table: torch.Tensor, block_size: int, causal: bool
) -> PrefillSeq:
    num_keys = ceil_div(ctx, block_size) * block_size
    if not causal:  # all keys are in the pages
        mask = (torch.arange(num_keys, device=table.device) < ctx).expand(hi - lo, -1)
        return PrefillSeq(lo, hi, ctx, table[: num_keys // block_size].clone(), mask, num_keys)
    cached = ctx - (hi - lo)
    if cached == 0:
        return PrefillSeq(lo, hi, 0, None, None, ctx)
    return PrefillSeq(lo, hi, cached, table[: num_keys // block_size].clone(), None, num_keys)


def _by_length(decodes: list[int], ctx: list[int]) -> list[list[int]]:
    """Group decodes so that padding to the group's longest context wastes at most about half.

    One long request among short ones would otherwise make every row of the batch attend
    over the long context (3,000 padded keys instead of 300 costs 10x per step).
    """
    if not decodes:
        return []
    order = sorted(decodes, key=lambda b: ctx[b])
    groups = [[order[0]]]
    for b in order[1:]:
        if ctx[b] > 2 * ctx[groups[-1][0]] + 512:
            groups.append([])
        groups[-1].append(b)
    return [sorted(g) for g in groups]


def _decode_group(decodes: list[int], qs: list[int], ctx: list[int], tables: torch.Tensor, block_size: int):
    device = tables.device
    lens = torch.tensor([ctx[b] for b in decodes], device=device)
    num_blocks = ceil_div(max(ctx[b] for b in decodes), block_size)
    # rows of a group share the longest row's page count; a shorter row's extra entries are stale
    # or zero page ids, masked out below
    blocks = tables[decodes, :num_blocks].reshape(-1)
    max_len = num_blocks * block_size
    valid = torch.arange(max_len, device=device).view(1, -1) < lens.view(-1, 1)
    bias = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))
    bias = bias.view(len(decodes), 1, 1, max_len)
    rows = torch.tensor([qs[b] for b in decodes], dtype=torch.int64, device=device)
    return DecodeGroup(rows, blocks, bias, max_len, lens - 1)


class KVCache:
    """Per-layer K and V page tensors, owned by the worker.

    On CPU they live in one anonymous memory map: zero-filled by the kernel and committed
    page by page as blocks are first written, so a large pool costs nothing until used
    (and padding reads of never-written blocks see zeros, never NaN garbage).
    """

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device
    ):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        device = torch.device(device)
        if device.type == "cpu":
            numel = num_blocks * block_size * kv_heads * head_dim
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._map = mmap.mmap(-1, max(1, 2 * num_layers * numel * itemsize))
            flat = torch.frombuffer(self._map, dtype=torch.uint8).view(dtype)
            tensors = [flat[i * numel : (i + 1) * numel].view(shape) for i in range(2 * num_layers)]
        else:
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.k, self.v = tensors[:num_layers], tensors[num_layers:]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


FP8 = (torch.float8_e5m2, torch.float8_e4m3fn)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slots: torch.Tensor) -> None:
    """Write K/V [T, kv_heads, dim] into the cache slots ``block * block_size + offset``
    (cast to the cache's dtype: an 8-bit float cache is copied as bytes, which every device can)."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.dtype in FP8:
            new, cache = new.to(cache.dtype).view(torch.uint8), cache.view(torch.uint8)
        cache.view(-1, *new.shape[1:]).index_copy_(0, slots, new)


def read_pages(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The pages ``blocks`` of a layer's cache, in ``dtype`` (an 8-bit float cache is widened)."""
    if cache.dtype in FP8:
        return cache.view(torch.uint8).index_select(0, blocks).view(cache.dtype).to(dtype)
    return cache.index_select(0, blocks)


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim]
    k: torch.Tensor | None,  # [T, kv_heads, dim]; None: the keys are in the pages already
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Store this step's K/V (if given), then attend. Returns [T, heads, dim].

    ``window``: a sliding-window layer's; the query at position p sees the keys p - window < j <= p
    (transformers' rule). ``softcap``: scores become ``softcap * tanh(score / softcap)`` (Gemma 2)."""
    if k is not None:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    shape = Shape(scale, window or 0, softcap or 0.0)
    if meta.in_place is not None and meta.in_order:
        return _decode_in_place(q, k_cache, v_cache, meta.in_place, shape)
    if meta.in_order and len(meta.decode_groups) == 1:
        return _decode(q, k_cache, v_cache, meta.decode_groups[0], shape)
    out = torch.empty_like(q)
    if meta.in_place is not None:
        rows = meta.in_place[0]
        out[rows] = _decode_in_place(q[rows], k_cache, v_cache, meta.in_place, shape)
    for group in meta.decode_groups:
        out[group.rows] = _decode(q[group.rows], k_cache, v_cache, group, shape)
    for seq in meta.prefills:
        out[seq.lo : seq.hi] = _prefill(q, k, v, k_cache, v_cache, seq, shape)
    return out


class Shape(NamedTuple):
    """How a layer's scores are made: scaled, windowed (0: not), soft-capped (0: not)."""

    scale: float
    window: int
    softcap: float

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if not self.softcap else torch.tanh(scores / self.softcap) * self.softcap


def _decode_in_place(q, k_cache, v_cache, in_place, shape: Shape) -> torch.Tensor:
    """One query token per request over its pages, read where they are (``csrc/paged_attention.cpp``)."""
    _, tables, lens = in_place
    return native.extension().paged_decode(
        q.contiguous(), k_cache, v_cache, tables, lens, shape.scale, native.ISA, shape.window, shape.softcap
    )


def _decode(q, k_cache, v_cache, group: DecodeGroup, shape: Shape) -> torch.Tensor:
    """One query token per request, all requests at once: two small batched matmuls.

    Plain matmul + softmax beats SDPA's CPU kernel here (it is tuned for long queries).
    Query heads are grouped by the KV head they share (GQA) instead of repeating K/V.
    """
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    keys = read_pages(k_cache, group.blocks, q.dtype).view(n, group.max_len, kv_heads, dim)
    values = read_pages(v_cache, group.blocks, q.dtype).view(n, group.max_len, kv_heads, dim)
    keys, values = keys.permute(0, 2, 3, 1), values.transpose(1, 2)
    query = q.view(n, kv_heads, heads // kv_heads, dim)
    bias = group.bias if group.bias.shape[1] == 1 else group.bias.view(n, kv_heads, -1, group.max_len)
    if shape.window:
        first = (group.query_pos + 1 - shape.window).view(-1, 1, 1, 1)
        bias = bias.masked_fill(torch.arange(group.max_len, device=bias.device) < first, float("-inf"))
    scores = shape.cap(torch.matmul(query, keys).float() * shape.scale) + bias
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(n, heads, dim)


def _prefill(q, k, v, k_cache, v_cache, seq: PrefillSeq, shape: Shape) -> torch.Tensor:
    query = q[seq.lo : seq.hi].transpose(0, 1).unsqueeze(0)
    if shape.window >= seq.cached + seq.hi - seq.lo:  # the window holds the whole context: causal alone
        shape = shape._replace(window=0)
    scale = shape.scale
    plain = not shape.window and not shape.softcap
    if seq.cached == 0 and plain:
        keys = k[seq.lo : seq.hi].transpose(0, 1).unsqueeze(0)
        values = v[seq.lo : seq.hi].transpose(0, 1).unsqueeze(0)
        mask = None if seq.mask is None else seq.mask.to(query.dtype)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    elif (
        plain
        and seq.mask is None
        and q.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
    ):
        out = _prefix_then_causal(query, k[seq.lo : seq.hi], v[seq.lo : seq.hi], k_cache, v_cache, seq, scale)
    else:
        if seq.cached == 0:
            keys, values = (t[seq.lo : seq.hi].transpose(0, 1).unsqueeze(0) for t in (k, v))
        else:
            kv_shape = (-1, *k_cache.shape[2:])
            keys, values = (
                read_pages(c, seq.blocks, q.dtype).view(kv_shape).transpose(0, 1).unsqueeze(0)
                for c in (k_cache, v_cache)
            )
        mask = _causal(seq, q.device, shape.window) if seq.mask is None else seq.mask
        out = _attend_masked(query, keys, values, mask, shape)
    return out.squeeze(0).transpose(0, 1)


def _attend_masked(query, keys, values, mask: torch.Tensor, shape: Shape) -> torch.Tensor:
    """[1, heads, n, dim] over keys [1, kv_heads, keys, dim] with a bool or float mask: SDPA, or the
    scores written out where they are soft-capped (SDPA cannot)."""
    if not shape.softcap:
        mask = mask if mask.dtype == torch.bool else mask.to(query.dtype)
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=shape.scale, enable_gqa=True
        )
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = shape.cap(torch.matmul(query, keys.transpose(-1, -2)).float() * shape.scale)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores + mask, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _prefix_then_causal(query, k, v, k_cache, v_cache, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """A chunk after a cached prefix, as two calls of torch's CPU flash kernel merged by their
    log-sum-exps: the whole prefix (no mask), then the chunk's own keys (causal: the kernel skips the
    masked half). One masked call over prefix + chunk computes that half too: a 4,096-token prompt in
    two chunks took 17% longer. For the prefix, the query heads that share a KV head are stacked into
    one longer query (the kernel has no GQA); the chunk's own few keys are repeated per head."""
    _, heads, n, dim = query.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    pages = (
        read_pages(c, seq.blocks, query.dtype).view(-1, kv_heads, dim)[: seq.cached]
        for c in (k_cache, v_cache)
    )
    prefix_k, prefix_v = (t.transpose(0, 1).unsqueeze(0) for t in pages)
    stacked = query.reshape(1, kv_heads, group * n, dim)
    before, lse_before = _flash(stacked, prefix_k, prefix_v, scale=scale)
    own_k, own_v = (t.transpose(0, 1).unsqueeze(0).repeat_interleave(group, 1) for t in (k, v))
    own, lse_own = _flash(query, own_k, own_v, is_causal=True, scale=scale)
    lse_before = lse_before.reshape(1, heads, n, 1)
    top = torch.maximum(lse_before, lse_own.unsqueeze(-1))
    w_before, w_own = (lse_before - top).exp(), (lse_own.unsqueeze(-1) - top).exp()
    merged = (before.reshape(1, heads, n, dim).float() * w_before + own.float() * w_own) / (w_before + w_own)
    return merged.to(query.dtype)
