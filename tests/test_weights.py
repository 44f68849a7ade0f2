"""Safetensors checkpoints in one or several files: same tokens, missing and unexpected tensors by name."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import hf_greedy, run_engine
from tgi_zmq.checkpoint.base import MissingTensorError
from tgi_zmq.checkpoint.safetensors import INDEX_FILE, SafetensorsWeights
from tgi_zmq.layers import WeightSource
from tgi_zmq.messages import SamplingParams
from tgi_zmq.models import load_model

PROMPT = [5, 17, 300, 42, 7, 99]
MISSING = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def single(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, single: Path) -> Path:
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    LlamaForCausalLM.from_pretrained(single).save_pretrained(folder, max_shard_size="100KB")
    return folder


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def file_of(folder: Path, name: str) -> Path:
    """The safetensors file that holds tensor ``name``."""
    return SafetensorsWeights(folder, torch.float32, torch.device("cpu")).files[name]


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, {"format": "pt"})


def test_sharded_checkpoint_gives_transformers_tokens(sharded: Path) -> None:
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and (sharded / INDEX_FILE).is_file()
    weights = SafetensorsWeights(sharded, torch.float32, torch.device("cpu"))
    assert len(set(weights.files.values())) == len(files) and isinstance(weights, WeightSource)
    expected = hf_greedy(sharded, PROMPT, 10)
    assert run_engine(sharded, [PROMPT], [SamplingParams()], 10)[0] == [expected]


def test_sharded_and_single_file_give_the_same_tensors(single: Path, sharded: Path) -> None:
    one = SafetensorsWeights(single, torch.float32, torch.device("cpu"))
    many = SafetensorsWeights(sharded, torch.float32, torch.device("cpu"))
    assert sorted(one.files) == sorted(many.files)
    for name in one.files:
        assert torch.equal(one.get(name), many.get(name)), name
    assert one.unused() == many.unused() == []


def test_tensors_are_read_on_demand_and_cast(sharded: Path) -> None:
    weights = SafetensorsWeights(sharded, torch.bfloat16, torch.device("cpu"))
    assert weights.has(MISSING) and not weights.has("nope")
    assert weights.used == set()
    assert weights.get(MISSING).dtype == torch.bfloat16
    assert weights.get(MISSING, dtype=torch.float32).dtype == torch.float32  # a layer's own choice
    assert weights.used == {MISSING}
    assert MISSING not in weights.unused()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_missing_tensor_is_named(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = copy(request.getfixturevalue(layout), tmp_path)
    rewrite(file_of(folder, MISSING), lambda tensors: tensors.pop(MISSING))
    if layout == "sharded":
        index = json.loads((folder / INDEX_FILE).read_text())
        del index["weight_map"][MISSING]
        (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MissingTensorError) as info:
        load_model(folder, "float32", "cpu")
    assert str(info.value) == (
        f"checkpoint {folder} has no tensor {MISSING!r} "
        "(the checkpoint does not match this architecture or is incomplete)"
    )
    assert isinstance(info.value, KeyError) and info.value.name == MISSING


def test_index_naming_a_missing_file_is_an_error(sharded: Path, tmp_path: Path) -> None:
    folder = copy(sharded, tmp_path)
    shard = file_of(folder, MISSING)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        SafetensorsWeights(folder, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_unexpected_tensor_is_warned_by_name(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy(request.getfixturevalue(layout), tmp_path)
    extra = "model.layers.0.mlp.extra_proj.weight"
    path = file_of(folder, MISSING)
    rewrite(path, lambda tensors: tensors.update({extra: torch.ones(3, 4)}))
    if layout == "sharded":
        index = json.loads((folder / INDEX_FILE).read_text())
        index["weight_map"][extra] = path.name
        (folder / INDEX_FILE).write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="tgi_zmq.models"):
        load_model(folder, "float32", "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(f": {extra}")


def test_folder_without_safetensors_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file"):
        SafetensorsWeights(tmp_path, torch.float32, torch.device("cpu"))
