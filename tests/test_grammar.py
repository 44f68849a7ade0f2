"""The grammar engine (llguidance) on the default model's tokenizer: refusals with the engine's reason,
and masks that only ever let a grammar's language through."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tgi_zmq.convert import default_model_dir
from tgi_zmq.grammar import GrammarEngine, GrammarError, unpack
from tgi_zmq.messages import Grammar

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the default model is not converted (./scripts/setup does it)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return GrammarEngine(tokenizer), tokenizer


def test_refusals_carry_the_engines_reason(engine):
    grammars, _ = engine
    with pytest.raises(GrammarError, match="unclosed group"):
        grammars.check(Grammar("regex", "a(b"))
    with pytest.raises(GrammarError, match="nonsense"):
        grammars.check(Grammar("json", json.dumps({"type": "nonsense"})))
    grammars.check(Grammar("json", json.dumps(SCHEMA)))


def constrained_text(engine, grammar: Grammar, seed: int) -> str:
    """Random logits, masked by the grammar, argmax'd token by token until the grammar ends."""
    grammars, tokenizer = engine
    matcher = grammars.matcher(grammar)
    rng = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(80):
        bitmask = torch.full((1, matcher.mask_words), -1, dtype=torch.int32)
        matcher.fill(bitmask, 0)
        allowed = unpack(bitmask, 49152)[0]
        token = int(torch.randn(49152, generator=rng).masked_fill(~allowed, float("-inf")).argmax())
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        matcher.consume(token)
        if matcher.done:
            break
    return tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(4))
def test_masks_let_only_the_grammars_language_through(engine, seed):
    assert re.fullmatch(
        r"[0-9]{3}-[a-z]{2}", constrained_text(engine, Grammar("regex", "[0-9]{3}-[a-z]{2}"), seed)
    )
    value = json.loads(constrained_text(engine, Grammar("json", json.dumps(SCHEMA)), seed))
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)


def test_unpack_reads_32_tokens_a_word():
    bitmask = torch.tensor([[0b101, -1], [0, -(1 << 31)]], dtype=torch.int32)  # bit 31: the sign
    allowed = unpack(bitmask, 70)
    assert allowed.shape == (2, 70)
    assert allowed[0, :3].tolist() == [True, False, True] and allowed[0, 32:64].all()
    assert not allowed[0, 64:].any()  # past the mask: refused
    assert allowed[1].nonzero().flatten().tolist() == [63]
