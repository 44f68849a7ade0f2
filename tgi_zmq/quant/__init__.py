"""Quantization: TGI's ``--quantize`` names, what each device can run, and the linear method of each.

Where a quantized weight comes from is the checkpoint reader's business (``tgi_zmq.checkpoint``: a float
checkpoint quantized at load, GPTQ/AWQ tensors or GGUF blocks repacked); how it is stored and multiplied
is one of the two formats of ``formats`` and the kernels of ``kernels``. The models never see the
difference: each linear layer takes the method its reader picks for it (``linear.QuantScheme``).
"""

from __future__ import annotations

from typing import NamedTuple

KV_CACHE_DTYPES = {"fp8_e5m2": "float8_e5m2", "fp8_e4m3fn": "float8_e4m3fn"}  # TGI's name: torch's


class Mode(NamedTuple):
    """A ``--quantize`` value: how linears are stored (``int8``, ``nf4``... or ``checkpoint``: as the
    checkpoint has them), where it runs, and what it is."""

    storage: str
    devices: tuple[str, ...]
    about: str


QUANTIZE: dict[str, Mode] = {
    "bitsandbytes": Mode("int8", ("cpu", "cuda"), "8-bit weights, one scale per output row (LLM.int8)"),
    "eetq": Mode("int8", ("cpu", "cuda"), "8-bit weights, one scale per output row"),
    "bitsandbytes-nf4": Mode("nf4", ("cpu", "cuda"), "4-bit NormalFloat weights, a scale per 64 inputs"),
    "bitsandbytes-fp4": Mode("fp4", ("cpu", "cuda"), "4-bit float weights, a scale per 64 inputs"),
    "gptq": Mode("checkpoint", ("cpu", "cuda"), "a GPTQ checkpoint's 4-bit weights, repacked at load"),
    "awq": Mode("checkpoint", ("cpu", "cuda"), "an AWQ checkpoint's 4-bit weights, repacked at load"),
    "fp8": Mode("fp8", ("cuda",), "8-bit float weights (float8_e4m3fn), a scale per output row"),
}


def runnable(device: str, capability: tuple[int, int] | None = None) -> list[str]:
    """The ``--quantize`` values ``device`` can run (fp8 needs a CUDA GPU of compute capability 8.9+)."""
    names = [name for name, mode in QUANTIZE.items() if device in mode.devices]
    if device == "cuda" and (capability or (0, 0)) < (8, 9):
        names.remove("fp8")
    return names


def check_quantize(name: str, device: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse a value this device cannot run, naming the ones it can."""
    can = runnable(device, capability)
    if name not in QUANTIZE:
        raise ValueError(f"--quantize {name}: unknown; this {device} can run: {', '.join(can)}")
    if name not in can:
        why = (
            "needs a CUDA GPU of compute capability 8.9 or more"
            if name == "fp8"
            else f"does not run on {device}"
        )
        raise ValueError(f"--quantize {name} {why}; this {device} can run: {', '.join(can)}")


def check_kv_cache_dtype(name: str, device: str) -> None:
    """8-bit float KV entries on CUDA. A CPU has no vector path to widen them (torch converts one
    element at a time: 12 ns each, about 270 ms a step at 2,000 tokens of SmolLM2 context), so it
    would trade the memory for a far slower decode: refused."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name}: choose {', '.join(KV_CACHE_DTYPES)} (or leave it out)")
    if device != "cuda":
        raise ValueError(
            f"--kv-cache-dtype {name} needs a CUDA GPU: this {device} has no fast 8-bit float conversion "
            "(leave it out to keep the cache in the model's dtype)"
        )
