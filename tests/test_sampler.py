"""Sampling: greedy, warpers, penalties and per-request seeds."""

import torch

from tgi_zmq.sampler import apply_penalties, mix_seed, sample, warp


def step_params(rows: int, **overrides) -> dict[str, torch.Tensor]:
    s = {
        "greedy": torch.ones(rows, dtype=torch.bool),
        "temperature": torch.ones(rows),
        "top_k": torch.zeros(rows, dtype=torch.int64),
        "top_p": torch.ones(rows),
        "repetition_penalty": torch.ones(rows),
        "frequency_penalty": torch.zeros(rows),
        "seeds": torch.zeros(rows, dtype=torch.int64),
        "sample_index": torch.zeros(rows, dtype=torch.int64),
        "penalty_ids": torch.zeros(0, dtype=torch.int64),
        "penalty_start": torch.zeros(rows + 1, dtype=torch.int64),
    }
    s.update(overrides)
    return s


def test_greedy_is_argmax_with_its_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    ids, logprobs = sample(logits, step_params(2))
    assert ids.tolist() == [1, 0]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([0, 1, 1])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history.view(1, -1), logits.clone())
    s = step_params(
        1, repetition_penalty=torch.tensor([1.5]), penalty_ids=history, penalty_start=torch.tensor([0, 3])
    )
    apply_penalties(logits, s)
    assert torch.allclose(logits, expected)


def test_frequency_penalty_scales_with_counts():
    logits = torch.zeros(1, 4)
    s = step_params(
        1,
        frequency_penalty=torch.tensor([1.0]),
        penalty_ids=torch.tensor([3, 3, 1, 0]),
        penalty_start=torch.tensor([0, 4]),
    )
    apply_penalties(logits, s)
    assert logits.tolist() == [[-0.25, -0.25, 0.0, -0.5]]


def test_top_k_and_top_p_filter():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(warp(logits, 1.0, 2, 1.0)).tolist() == [False, False, True, True]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isinf(warp(probs, 1.0, 0, 0.7)).tolist() == [False, False, True, True]
    assert not torch.isinf(warp(probs, 1.0, 0, 0.01)[0])  # the top token always survives


def sampled(logits, seed, index, rows=1):
    s = step_params(
        rows,
        greedy=torch.zeros(rows, dtype=torch.bool),
        seeds=torch.full((rows,), seed),
        sample_index=torch.full((rows,), index),
    )
    return sample(logits, s)[0].tolist()


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
