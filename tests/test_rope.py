"""RoPE scaling (``tgi_zmq.rope``) against transformers: the cos/sin tables against the models' rotary
embeddings at positions past the original context, then tiny models token for token on sequences that
go past it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_greedy, longrope, run_engine, tiny_model
from tgi_zmq.messages import SamplingParams
from tgi_zmq.rope import RopeConfig

HEAD_DIM = 16
ORIGINAL = 64  # the original context of the scaled configs below
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
}


def llama_config(rope_scaling: dict | None, max_positions: int = 4 * ORIGINAL, **extra):
    import transformers as tf

    return tf.LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rope_theta=500.0,  # small: the low frequencies turn within the positions tested
        rope_scaling=rope_scaling,
        **extra,
    )


def theirs(config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin [length, head_dim] for one sequence of ``length`` positions."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    rotary = Phi3RotaryEmbedding(config)  # Llama's and Phi-3's are the same module
    x = torch.zeros(1, length, HEAD_DIM)
    cos, sin = rotary(x, torch.arange(length)[None])
    return cos[0], sin[0]


def ours(config) -> tuple[torch.Tensor, torch.Tensor]:
    return RopeConfig.from_hf(config.to_dict(), HEAD_DIM).tables(torch.float32, "cpu")


@pytest.mark.parametrize("name", [None, *SCALINGS])
def test_static_scalings_match_transformers_past_the_original_context(name):
    config = llama_config(SCALINGS.get(name))
    length = 4 * ORIGINAL
    cos, sin = ours(config)
    ref_cos, ref_sin = theirs(config, length)
    assert cos.shape[0] >= length
    torch.testing.assert_close(cos[:length], ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:length], ref_sin, rtol=0, atol=1e-6)
    if name and name.startswith("yarn"):
        assert not torch.allclose(ref_cos.abs().amax(), torch.tensor(1.0))  # its attention factor


@pytest.mark.parametrize("long", [False, True])
def test_longrope_matches_phi3_with_the_factors_of_its_context(long):
    """Short factors where the model's context is the original one; long ones (and the attention
    factor) where it is longer, at every position of a sequence past the original context."""
    import transformers as tf

    context = 4 * ORIGINAL if long else ORIGINAL
    config = tf.Phi3Config(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        max_position_embeddings=context,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling=longrope(HEAD_DIM // 2),
    )
    cos, sin = ours(config)
    ref_cos, ref_sin = theirs(config, context)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    assert (ref_cos.abs().amax() > 1.0) == long  # the attention factor > 1 with the long factors


def test_dynamic_ntk_gives_each_position_the_base_of_its_own_length():
    """Position p rotates as transformers rotates the last token of a p + 1 long sequence, and every
    position up to max_position_embeddings as the unscaled RoPE."""
    config = llama_config({"rope_type": "dynamic", "factor": 2.0}, max_positions=ORIGINAL)
    cos, sin = ours(config)
    assert cos.shape[0] == 2 * ORIGINAL  # the context served: M * factor
    ref_cos, ref_sin = theirs(config, ORIGINAL)
    torch.testing.assert_close(cos[:ORIGINAL], ref_cos, rtol=0, atol=1e-6)
    for length in (ORIGINAL + 1, ORIGINAL + 17, 2 * ORIGINAL):
        ref_cos, ref_sin = theirs(config, length)
        torch.testing.assert_close(cos[length - 1], ref_cos[-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[length - 1], ref_sin[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("old_name", ["su", "yarn"])
def test_phi3_configs_name_longrope_by_its_old_names(old_name):
    scaling = {**longrope(HEAD_DIM // 2), "type": old_name}
    hf = {"model_type": "phi3", "max_position_embeddings": 128, "rope_scaling": scaling}
    assert RopeConfig.from_hf(hf, HEAD_DIM).kind == "longrope"


def test_context_lengths():
    def context(scaling, max_positions=1000):
        return RopeConfig.from_hf(llama_config(scaling, max_positions).to_dict(), HEAD_DIM).context_length()

    assert context(None) == 1000
    assert context({"rope_type": "linear", "factor": 4.0}) == 4000
    assert context({"rope_type": "dynamic", "factor": 2.0}) == 2000
    assert context(SCALINGS["yarn"]) == 1000  # already past 4 * 64
    assert context({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 500}) == 2000
    assert context(SCALINGS["llama3"]) == 1000


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "supported: default, linear, dynamic"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ],
)
def test_an_unsupported_rope_is_a_clear_error(hf, message):
    with pytest.raises(ValueError, match=message):
        RopeConfig.from_hf({"max_position_embeddings": 128, **hf}, HEAD_DIM)


# ------------------------------------------------------------------- tiny models past the original context

# (arch, overrides, prompt length): LongRoPE and YaRN with a prompt longer than the original context;
# dynamic NTK from a prompt inside it, generating past it (see tgi_zmq.rope on the rule it follows).
CASES = {
    "phi3-longrope": (
        "phi3",
        dict(
            max_position_embeddings=4 * ORIGINAL,
            original_max_position_embeddings=ORIGINAL,
            rope_scaling=longrope(8),
        ),
        100,
    ),
    "llama-yarn": ("llama", dict(rope_scaling=SCALINGS["yarn"], max_position_embeddings=4 * ORIGINAL), 100),
    "llama-dynamic": (
        "llama",
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=ORIGINAL),
        ORIGINAL - 10,
    ),
}


# Larger weights and a small base: attention that depends on the rotations (with transformers' small
# initial weights a tiny model's tokens hardly change when the tables do; these change every token).
SENSITIVE = dict(initializer_range=0.2, rope_theta=100.0)


@pytest.mark.parametrize("case", CASES)
def test_tokens_past_the_original_context_match_transformers(case, tmp_path):
    arch, overrides, prompt_len = CASES[case]
    folder = tiny_model(arch, tmp_path, **overrides, **SENSITIVE)
    gen = torch.Generator().manual_seed(8)
    ps = [torch.randint(3, 512, (prompt_len,), generator=gen).tolist() for _ in range(2)]
    expected = [hf_greedy(folder, p, 30) for p in ps]
    params = [SamplingParams()] * len(ps)
    alone = [run_engine(folder, [p], params[:1], 30, num_blocks=128)[0][0] for p in ps]
    chunked, _ = run_engine(folder, ps, params, 30, num_blocks=128, max_step_tokens=24)
    assert alone == chunked == expected
