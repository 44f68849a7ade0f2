"""Model architectures, chosen from config.json's ``model_type``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tgi_zmq.checkpoint.gguf import GGUFWeights
from tgi_zmq.checkpoint.gguf_file import is_gguf_folder
from tgi_zmq.checkpoint.safetensors import SafetensorsWeights
from tgi_zmq.dtypes import to_torch
from tgi_zmq.layers import WeightSource
from tgi_zmq.models.base import LaunchRules, ModelConfig, PagedModel
from tgi_zmq.models.bloom import BloomConfig, BloomModel
from tgi_zmq.models.gemma import GemmaConfig, GemmaModel
from tgi_zmq.models.llama import LlamaConfig, LlamaModel
from tgi_zmq.models.moe import MoeConfig, MoeModel
from tgi_zmq.models.t5 import T5Config, T5Model
from tgi_zmq.parallel import Shard
from tgi_zmq.quant import KV_CACHE_DTYPES

log = logging.getLogger(__name__)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaModel),
    "mistral": (LlamaConfig, LlamaModel),
    "qwen2": (LlamaConfig, LlamaModel),
    "qwen3": (LlamaConfig, LlamaModel),
    "phi3": (LlamaConfig, LlamaModel),
    "starcoder2": (LlamaConfig, LlamaModel),
    "mixtral": (MoeConfig, MoeModel),
    "qwen3_moe": (MoeConfig, MoeModel),
    "t5": (T5Config, T5Model),
    "bloom": (BloomConfig, BloomModel),
    "gemma": (GemmaConfig, GemmaModel),
    "gemma2": (GemmaConfig, GemmaModel),
    "gemma3_text": (GemmaConfig, GemmaModel),
}


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def architecture(hf: dict) -> tuple[type[ModelConfig], type[PagedModel]]:
    """The config and model classes for config.json's ``model_type``; a clear error if unsupported."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        names = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model_type {model_type!r} (config.json) is not supported; supported: {names}")
    return ARCHITECTURES[model_type]


def launch_rules(folder: str | Path, hf: dict) -> LaunchRules:
    """The model-specific rules the launcher applies before any process loads the model."""
    config_cls, _ = architecture(hf)
    return LaunchRules(
        context=config_cls.context_length(hf),
        kv_window=config_cls.kv_window(hf),
        decoder_start_token_id=config_cls.decoder_start(hf),
        eos_token_ids=eos_token_ids(folder, hf),
    )


def eos_token_ids(folder: str | Path, hf: dict) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (each an int or a list)."""
    ids: list[int] = []
    sources = [hf]
    gen = Path(folder) / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        for eos in value if isinstance(value, list) else [value]:
            if isinstance(eos, int) and eos not in ids:
                ids.append(eos)
    return tuple(ids)


def load_model(
    folder: str | Path,
    dtype: str,
    device: str,
    shard: Shard | None = None,
    quantize: str | None = None,
    kv_cache_dtype: str | None = None,
):
    """Build the model of ``folder`` with weights cast to ``dtype`` (this rank's slice of them),
    its linears quantized as ``quantize`` (a ``--quantize`` value, "gguf", or None) says."""
    hf = read_config(folder)
    config_cls, model_cls = architecture(hf)
    weights = open_weights(folder, to_torch(dtype), torch.device(device), quantize)
    shard = shard or Shard()
    model = model_cls(config_cls.from_hf(hf), weights, to_torch(dtype), torch.device(device), shard)
    if kv_cache_dtype:
        model.kv_dtype = to_torch(KV_CACHE_DTYPES[kv_cache_dtype])
    unused = [n for n in weights.unused() if not n.endswith("rotary_emb.inv_freq")]
    if unused:
        log.warning("checkpoint tensors not used by the model: %s", ", ".join(unused[:20]))
    return model


def open_weights(
    folder: str | Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None
) -> WeightSource:
    """The checkpoint's reader: a GGUF file's (a ``prepare_gguf_folder`` folder), else the safetensors',
    its linears served as ``quantize`` says (a GGUF or GPTQ/AWQ checkpoint: in its own blocks)."""
    gguf = is_gguf_folder(Path(folder))
    return GGUFWeights(gguf, dtype, device) if gguf else SafetensorsWeights(folder, dtype, device, quantize)


def weight_bytes(model, seen: set[int] | None = None) -> int:
    """Bytes of the distinct weight tensors reachable from ``model`` (rotary ``*_table`` buffers excluded)."""
    seen = set() if seen is None else seen
    if isinstance(model, torch.Tensor):
        if model.data_ptr() in seen:
            return 0
        seen.add(model.data_ptr())
        return model.numel() * model.element_size()
    if isinstance(model, list | tuple):
        return sum(weight_bytes(x, seen) for x in model)
    if hasattr(model, "__dict__"):
        return sum(weight_bytes(v, seen) for k, v in vars(model).items() if not k.endswith("_table"))
    return 0
