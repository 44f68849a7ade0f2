"""Sampling: greedy, warpers, penalties, processors, top tokens and per-request seeds; each against
transformers' logits processor of the same name where it has one."""

import torch

from tgi_zmq.sampler import (
    Draw,
    LogitBias,
    SamplingMetadata,
    VocabMask,
    Watermark,
    apply_penalties,
    mix_seed,
    sample,
    warp,
)


def metadata(
    rows: int, history: list[list[int]] | None = None, vocab: int = 4, **overrides
) -> SamplingMetadata:
    """Greedy rows without penalties, unless ``overrides`` say otherwise; ``history`` gives each
    row's token history (the worker keeps it as counts)."""
    counts = lens = None
    if history is not None:
        counts = torch.stack(
            [torch.bincount(torch.tensor(h, dtype=torch.int64), minlength=vocab) for h in history]
        )
        counts, lens = counts.float(), torch.tensor([float(len(h)) for h in history])
    fields = dict(
        repetition_penalty=torch.ones(rows),
        frequency_penalty=torch.zeros(rows),
        counts=counts,
        history_lens=lens,
        draws=[],
    )
    return SamplingMetadata(**{**fields, **overrides})


def test_greedy_is_argmax_with_its_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    out = sample(logits, metadata(2))
    assert out.ids.tolist() == [1, 0]
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    assert out.top_ids.shape == (2, 0)


def test_top_tokens_are_the_most_likely_with_their_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]])
    out = sample(logits, metadata(2, top_n=2))
    assert out.top_ids.tolist() == [[1, 3], [0, 3]]
    assert torch.allclose(out.top_logprobs, torch.log_softmax(logits, -1).gather(1, out.top_ids))
    assert torch.equal(out.top_logprobs[:, 0], out.logprobs)  # greedy: the first is the chosen one


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = [0, 1, 1]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([history]), logits.clone())
    ours = apply_penalties(logits, metadata(1, [history], repetition_penalty=torch.tensor([1.5])))
    assert torch.equal(ours, expected)


def test_frequency_penalty_scales_with_counts():
    ours = apply_penalties(
        torch.zeros(1, 4), metadata(1, [[3, 3, 1, 0]], frequency_penalty=torch.tensor([1.0]))
    )
    assert ours.tolist() == [[-0.25, -0.25, 0.0, -0.5]]


def test_rows_without_penalties_are_untouched_by_other_rows_counts():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    meta = metadata(
        2,
        [[0, 1], [2, 2]],
        repetition_penalty=torch.tensor([2.0, 1.0]),
        frequency_penalty=torch.tensor([0.0, 0.0]),
    )
    ours = apply_penalties(logits, meta)
    assert ours[1].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert ours[0].tolist() == [1.0, -2.0, 0.5, 3.0]


def test_logits_processors_run_before_the_choice():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    allowed = torch.tensor([[True, False, True], [True, True, True]])  # row 1 unconstrained
    out = sample(logits, metadata(2), [VocabMask(allowed)])
    assert out.ids.tolist() == [2, 0]
    assert torch.isfinite(out.logprobs).all()
    bias = LogitBias(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([10.0, -float("inf")]))
    assert sample(logits, metadata(2), [bias]).ids.tolist() == [1, 1]
    assert logits.tolist() == [[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]]  # the caller's logits are not changed


def test_a_mask_holds_for_sampled_rows_too():
    logits = torch.zeros(1, 50)
    allowed = torch.zeros(1, 50, dtype=torch.bool)
    allowed[0, [7, 31]] = True
    draws = [Draw(0, 1.0, 0, 1.0, 1.0, seed, 0) for seed in range(40)]
    picks = {sample(logits, metadata(1, draws=[d]), [VocabMask(allowed)]).ids.item() for d in draws}
    assert picks == {7, 31}


def test_top_k_and_top_p_filter():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(warp(logits, 1.0, 2, 1.0)).tolist() == [False, False, True, True]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isinf(warp(probs, 1.0, 0, 0.7)).tolist() == [False, False, True, True]
    assert not torch.isinf(warp(probs, 1.0, 0, 0.01)[0])  # the top token always survives


def test_logit_bias_matches_transformers_sequence_bias():
    from transformers import SequenceBiasLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    processor = SequenceBiasLogitsProcessor({(7,): 3.5, (11,): -2.0})
    expected = processor(torch.tensor([[1, 2]]), logits.clone())
    ours = logits.clone()
    LogitBias(torch.tensor([0, 0]), torch.tensor([7, 11]), torch.tensor([3.5, -2.0]))(ours)
    assert torch.equal(ours, expected)


def test_typical_p_matches_transformers():
    from transformers import TypicalLogitsWarper

    torch.manual_seed(0)
    for mass in (0.2, 0.5, 0.9, 0.99):
        logits = torch.randn(1, 300) * 3
        expected = TypicalLogitsWarper(mass)(torch.tensor([[0]]), logits.clone())[0]
        assert torch.equal(torch.isinf(warp(logits[0], 1.0, 0, 1.0, mass)), torch.isinf(expected)), mass


def test_watermark_matches_transformers():
    from transformers import WatermarkLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 64)
    history = torch.tensor([[3, 9], [5, 42]])
    processor = WatermarkLogitsProcessor(64, "cpu", greenlist_ratio=0.5, bias=2.0)
    expected = processor(history, logits.clone())
    ours = logits.clone()
    Watermark(gamma=0.5, delta=2.0).apply(ours, [(0, 9), (1, 42)])
    assert torch.equal(ours, expected)


def test_min_tokens_ban_matches_transformers():
    from transformers import MinNewTokensLengthLogitsProcessor

    logits = torch.randn(1, 10)
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3, eos_token_id=4)
    expected = processor(torch.tensor([[1, 2, 6]]), logits.clone())  # one new token: still banned
    ours = logits.clone()
    LogitBias(torch.tensor([0]), torch.tensor([4]), torch.tensor([-float("inf")]))(ours)
    assert torch.equal(ours, expected)


def sampled(logits, seed, index, rows=1):
    draws = [Draw(row, 1.0, 0, 1.0, 1.0, seed, index) for row in range(rows)]
    return sample(logits, metadata(rows, draws=draws)).ids.tolist()


def test_seeded_sampling_depends_only_on_seed_and_position():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)
    draws = [sampled(logits, 7, i)[0] for i in range(20)]
    assert draws == [sampled(logits, 7, i)[0] for i in range(20)]
    assert len(set(draws)) > 5  # really random over positions
    batch = sampled(logits.repeat(3, 1), 7, 4, rows=3)
    assert batch == [draws[4]] * 3  # the batch around a row does not change its draw
    assert [sampled(logits, 8, i)[0] for i in range(20)] != draws


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    counts = torch.bincount(torch.tensor([sampled(logits, 1, i)[0] for i in range(3000)]), minlength=3)
    expected = torch.softmax(logits[0], -1) * 3000
    assert torch.allclose(counts.float(), expected, rtol=0.15)


def test_mix_seed_is_63_bit_and_spread():
    values = {mix_seed(s, i) for s in range(30) for i in range(30)}
    assert len(values) == 900 and all(0 <= v < 2**63 for v in values)
    assert mix_seed(-1, 0) >= 0


def test_rows_sampled_alone_get_what_they_get_in_the_batch():
    """``select``: the worker samples each row alone when the batch raises; a row alone must get the
    token, logprobs and top tokens it gets in the batch (draws, penalties, watermark, bias, mask)."""
    torch.manual_seed(0)
    vocab = 32
    logits = torch.randn(4, vocab)
    meta = metadata(
        4,
        history=[[1, 2], [3], [4, 4], []],
        vocab=vocab,
        repetition_penalty=torch.tensor([1.3, 1.0, 1.2, 1.0]),
        frequency_penalty=torch.tensor([0.0, 0.5, 0.0, 0.0]),
        draws=[Draw(1, 0.8, 5, 0.9, 1.0, 11, 0), Draw(3, 1.2, 0, 1.0, 1.0, 12, 3)],
        top_n=3,
        watermarked=[(2, 7)],
    )
    allowed = torch.rand(4, vocab) > 0.3
    bias = LogitBias(torch.tensor([0, 2, 2]), torch.tensor([5, 6, 40]), torch.tensor([3.0, -1.0, 2.0]))
    whole = sample(logits, meta, [VocabMask(allowed), bias])
    assert bias.unknown_rows(4, vocab).tolist() == [False, False, True, False]  # token 40 is not one
    for row in range(4):
        processors = [VocabMask(allowed).select([row]), bias.select([row])]
        alone = sample(logits[[row]], meta.select([row]), processors)
        assert alone.ids.tolist() == whole.ids[[row]].tolist()
        assert torch.equal(alone.logprobs, whole.logprobs[[row]])
        assert torch.equal(alone.top_ids, whole.top_ids[[row]])
    two = bias.select([2, 0])
    assert (two.rows.tolist(), two.ids.tolist()) == ([1, 0, 0], [5, 6, 40])  # rows renumbered, order kept
