"""The C++ extension's dense and attention kernels (``csrc/gemv.cpp``, ``csrc/paged_attention.cpp``)
equal torch on every code path this CPU has: small shapes, seconds in all."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import built_extension, isa_codes
from tgi_zmq import native
from tgi_zmq.attention import AttentionMetadata, paged_attention
from tgi_zmq.layers import dense_linear


@pytest.fixture(scope="module")
def ext():
    return built_extension()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 72, 100])  # AVX-512 (k % 16), AVX2 (k % 8) and one-lane shapes
def test_gemv_equals_linear(ext, dtype, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=g).to(dtype)  # 37 rows: whole 4-row tiles and single rows
    bias = torch.randn(37, generator=g).to(dtype)
    for m in (1, 3, 4, 9):
        x = torch.randn(m, k, generator=g).to(dtype)
        expected = F.linear(x.float(), w.float(), bias.float())
        tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.2}
        for isa in isa_codes(ext):
            y = ext.gemv(x, w, bias, isa)
            assert y.dtype == dtype and y.shape == (m, 37)
            torch.testing.assert_close(y.float(), expected, **tol)
            # a bfloat16 y is written as such: the float32 sums rounded as torch rounds them
            assert torch.equal(y, ext.gemv(x, w, bias, isa, float_out=True).to(dtype))
        torch.testing.assert_close(ext.gemv(x, w, None, 0).float(), expected - bias.float(), **tol)


def reference(q, k_cache, v_cache, tables, lens, scale, window=0, softcap=0.0):
    """Each request's keys gathered from its pages (its last ``window`` only, if given), then
    softmax(q k^T) v per query head (GQA), the scores soft-capped if asked."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, n in enumerate(lens.tolist()):
        first = max(0, n - window) if window else 0
        keys = k_cache[tables[b]].flatten(0, 1)[first:n].float().repeat_interleave(heads // kv_heads, 1)
        values = v_cache[tables[b]].flatten(0, 1)[first:n].float().repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 40, 36])  # AVX-512 (dim % 16), AVX2 (dim % 8), one-lane paths
def test_paged_decode_equals_gathered_attention(ext, dtype, dim):
    g = torch.Generator().manual_seed(dim)
    heads, kv_heads, block = 6, 2, 4
    lens = torch.tensor([1, 5, 130, 700, 33])  # 700: split into parts over the threads
    pages = (lens.max().item() + block - 1) // block
    k_cache = torch.randn(len(lens) * pages + 3, block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)
    tables = torch.randperm(k_cache.shape[0], generator=g)[: len(lens) * pages].view(len(lens), pages)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    expected = reference(q, k_cache, v_cache, tables, lens, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for isa in isa_codes(ext):
        out = ext.paged_decode(q, k_cache, v_cache, tables, lens, dim**-0.5, isa)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [1, 100, 256, 300, 2000])  # 256, 300: parts cut at the window's start
def test_paged_decode_reads_only_the_window_and_caps_scores(ext, window):
    g = torch.Generator().manual_seed(window)
    heads, kv_heads, block, dim = 4, 1, 16, 64
    lens = torch.tensor([1, 50, 257, 700, 1000])
    pages = (lens.max().item() + block - 1) // block
    k_cache = torch.randn(len(lens) * pages, block, kv_heads, dim, generator=g) * 3
    v_cache = torch.randn(k_cache.shape, generator=g)
    tables = torch.randperm(k_cache.shape[0], generator=g).view(len(lens), pages)
    q = torch.randn(len(lens), heads, dim, generator=g)
    for softcap in (0.0, 2.0):
        expected = reference(q, k_cache, v_cache, tables, lens, 0.125, window, softcap)
        for isa in isa_codes(ext):
            out = ext.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, isa, window, softcap)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_every_attention_path_reads_only_the_window(ext):
    """A windowed, soft-capped layer: the in-place kernel, the padded groups and the prefill paths (a
    fresh prompt, a chunk after its cached prefix) equal the gathered reference row by row."""
    g = torch.Generator().manual_seed(3)
    block, window, softcap = 4, 6, 3.0
    ctx, qs = [20, 9, 30], [0, 1, 10, 14]  # a decode, a 9-token prompt, a 4-token chunk after 26 cached
    tables = torch.arange(3 * 8).view(3, 8)
    k_cache = torch.randn(3 * 8, block, 2, 32, generator=g)
    v_cache = torch.randn(k_cache.shape, generator=g)
    q = torch.randn(qs[-1], 4, 32, generator=g)
    # Row t of request b is the query at position ctx[b] - (its rows) + t: its keys are those up to it.
    rows = [(b, ctx[b] - (qs[b + 1] - qs[b]) + t + 1) for b in range(3) for t in range(qs[b + 1] - qs[b])]
    row_tables = torch.stack([tables[b] for b, _ in rows])
    lens = torch.tensor([n for _, n in rows])
    expected = reference(q, k_cache, v_cache, row_tables, lens, 0.125, window, softcap)
    slots = torch.cat(
        [tables[b][torch.arange(ctx[b]) // block] * block + torch.arange(ctx[b]) % block for b in range(3)]
    )
    ends = [sum(ctx[: b + 1]) for b in range(3)]
    own = torch.cat([slots[ends[b] - (qs[b + 1] - qs[b]) : ends[b]] for b in range(3)])
    k, v = k_cache.view(-1, 2, 32)[own].clone(), v_cache.view(-1, 2, 32)[own].clone()
    meta = AttentionMetadata.for_pages(qs, ctx, tables, own, block)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.125, window, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    meta.in_place, meta.decode_groups = None, meta.decodes.groups()
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.125, window, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_reads_the_pages_in_place_and_equals_the_padded_groups(ext):
    """paged_attention's decodes through the kernel equal its gathered, padded-group path."""
    g = torch.Generator().manual_seed(0)
    block, ctx = 16, [40, 900, 17]
    tables = torch.arange(3 * 60).view(3, 60)
    k_cache = torch.randn(3 * 60, block, 3, 64, generator=g)
    v_cache = torch.randn(k_cache.shape, generator=g)
    q = torch.randn(3, 9, 64, generator=g)
    meta = AttentionMetadata.for_pages([0, 1, 2, 3], ctx, tables, None, block)
    assert meta.in_place is not None and not meta.decode_groups
    out = paged_attention(q, None, None, k_cache, v_cache, meta, 0.125)
    meta.in_place, meta.decode_groups = None, meta.decodes.groups()
    torch.testing.assert_close(out, paged_attention(q, None, None, k_cache, v_cache, meta, 0.125))


def test_refuses_what_it_cannot_read(ext):
    q = torch.randn(1, 4, 64)
    cache = torch.zeros(2, 16, 2, 64)
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([40])
    with pytest.raises(RuntimeError, match="longer than its block table"):
        ext.paged_decode(q, cache, cache, tables, lens, 1.0, 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.paged_decode(q.half(), cache, cache, tables, torch.tensor([4]), 1.0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_after_its_cached_prefix_equals_one_masked_attention(dtype):
    """Prefix (no mask) + own keys (causal), merged by log-sum-exp, equals SDPA over both with the
    causal mask (torch's flash kernel, no extension needed)."""
    from tgi_zmq.attention import PrefillSeq, Shape, _causal, _prefill, _prefix_then_causal

    g = torch.Generator().manual_seed(1)
    block, cached, n = 16, 45, 20
    pages = torch.tensor([7, 2, 9, 4, 5])  # 80 keys: the 45 cached and the chunk's 20, in scattered pages
    k_cache = torch.randn(10, block, 3, 64, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)
    q = torch.randn(n, 9, 64, generator=g).to(dtype)
    slots = torch.tensor([pages[p // block] * block + p % block for p in range(cached, cached + n)])
    k, v = torch.randn(n, 3, 64, generator=g).to(dtype), torch.randn(n, 3, 64, generator=g).to(dtype)
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, 3, 64)[slots] = new
    seq = PrefillSeq(0, n, cached, pages, None, len(pages) * block)
    query = q.transpose(0, 1).unsqueeze(0)
    fast = _prefix_then_causal(query, k, v, k_cache, v_cache, seq, 0.125).squeeze(0).transpose(0, 1)
    masked = PrefillSeq(0, n, cached, pages, _causal(seq, q.device), len(pages) * block)
    expected = _prefill(q, k, v, k_cache, v_cache, masked, Shape(0.125, 0, 0.0))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fast, expected, **tol)


def test_two_builds_in_one_process_are_one_build(ext):
    """cpp_extension.load appends torch's libraries to the flags it is given: our name must not see
    them, or a second build() (tests, then a launch) rebuilds and deletes a service's build."""
    name, so = native.extension_name(), native.library()
    inode = so.stat().st_ino
    assert native.build() is not None and native.build() is not None
    assert native.extension_name() == name and native.library() == so
    assert [d.name for d in native.BUILD_DIR.glob("tgi_zmq_native_*")] == [name]
    assert so.stat().st_ino == inode  # neither rebuilt nor deleted


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """A corrupt .so where the extension is looked for (as a torch upgrade's ABI break or a cut copy)."""
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "_ext_tried", False)
    native.library().parent.mkdir()
    native.library().write_bytes(b"\x7fELF, but cut short")


def test_a_broken_build_is_caught_at_load(broken_build, caplog):
    assert native.extension() is None
    assert "does not load" in caplog.text and "torch fallbacks" in caplog.text
    assert native.describe() == "torch fallback" and native.describe("cuda:0") == "torch cuda"
    x, w = torch.randn(2, 64), torch.randn(8, 64)  # the callers take their torch paths
    torch.testing.assert_close(dense_linear(x, w, None), F.linear(x, w))


def test_a_worker_that_loads_less_than_the_launcher_says_so(broken_build, caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("worker-0")
    assert native.log_kernels(log, "cpu", "native avx512") == "torch fallback"
    assert [r.levelname for r in caplog.records if "kernels:" in r.getMessage()] == ["ERROR"]
    caplog.clear()
    native.log_kernels(log, "cpu", "torch fallback")
    assert [r.levelname for r in caplog.records if "kernels:" in r.getMessage()] == ["INFO"]


@pytest.mark.parametrize("vocab", [49152, 49153, 7])  # whole vectors, a tail, shorter than one vector
def test_greedy_equals_argmax_and_log_softmax(ext, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g) * 8
    logits[1, 0] = logits[1, vocab - 1] = 1e3  # a tie: the first index, as torch's argmax
    logits[2, vocab // 2] = float("-inf")  # a masked token
    exact = logits.double().log_softmax(-1)
    for isa in isa_codes(ext):
        ids, logprobs = ext.greedy(logits, isa)
        assert torch.equal(ids, logits.argmax(-1))
        assert (logprobs.double() - exact.gather(1, ids.view(-1, 1)).view(-1)).abs().max() < 2e-6
    odd = torch.randn(2, vocab, generator=g)
    odd[0, vocab - 1], odd[1] = float("nan"), float("-inf")  # torch's answers: the NaN's index, row 0
    ids, logprobs = ext.greedy(odd, 0)
    assert ids.tolist() == odd.argmax(-1).tolist() and logprobs.isnan().all()


def test_kernels_run_without_the_gil(ext):
    """A long kernel call lets Python threads run (the worker's heartbeat beats through a long step)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=tick)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a core left for the ticking thread
    try:
        thread.start()
        time.sleep(0.01)
        start = time.perf_counter()
        ext.gemv(x, w, None, 0)
        end = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
        stop.set()
        thread.join()
    inside = [start, *(t for t in ticks if start < t < end), end]
    longest_gap = max(b - a for a, b in zip(inside, inside[1:], strict=False))
    assert end - start > 0.02, "the call was too short to tell"
    assert longest_gap < (end - start) / 2, (
        f"no Python ran for {longest_gap:.3f} s of a {end - start:.3f} s call"
    )
