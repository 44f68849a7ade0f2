"""Rotary position embeddings from config.json: the inverse frequencies of each RoPE scaling (as
transformers' ``ROPE_INIT_FUNCTIONS`` computes them) and the cos/sin tables the models index by position.

Types of ``rope_scaling``: default, linear, dynamic (NTK), llama3, yarn, and longrope (Phi-3's: a Phi-3
config's "su" or "yarn" means it, as transformers' Phi3Config reads them). YaRN and LongRoPE multiply
cos and sin by an attention factor, as transformers does.

The tables are fixed when the model loads, so a position's rotation never depends on the batch or on a
request's length: keys rotated once are reused by prefix caching, chunked prefill and decode alike. Two
types depend on the sequence length in transformers (``dynamic_rope_update``: the longest position of
the whole batch) and follow a fixed rule here instead (vLLM's way: the scaled tables fixed at launch):

- dynamic: transformers rescales the base to the current length L once L exceeds max_position_embeddings
  M. Here position p takes the base of length max(p + 1, M), the one transformers gives a token decoded
  at p, so a request whose prompt fits in M matches transformers' generation at every length, past M
  too. A prompt longer than M that transformers takes at once gets the base of its whole length at every
  position; that case differs. The context served is M * factor (vLLM's).
- longrope: transformers takes the long factors while the sequence exceeds
  original_max_position_embeddings, the short ones below. Here the long factors whenever the model's
  context (max_position_embeddings) exceeds it, else the short ones: a request longer than the original
  context from its prompt on matches transformers, processed at once or decoded; a shorter request on a
  long-context model gets the long factors (vLLM does the same, and warns).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_PHI3_ALIASES = {"su": "longrope", "yarn": "longrope"}  # transformers' Phi3Config._rope_scaling_adjustment


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float
    scaling: dict[str, Any]  # config.json's ``rope_scaling`` ({} for none)
    max_position_embeddings: int
    original_max_position_embeddings: int | None  # config.json's top-level key (Phi-3), LongRoPE's switch

    @classmethod
    def from_hf(cls, hf: dict[str, Any], head_dim: int) -> RopeConfig:
        """From config.json; ValueError for a RoPE this module does not compute."""
        scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        kind = scaling.get("rope_type", scaling.get("type"))
        if hf.get("model_type") == "phi3" and kind in _PHI3_ALIASES:
            scaling["rope_type"] = _PHI3_ALIASES[kind]
        theta = hf.get("rope_theta") or scaling.get("rope_theta") or 10000.0
        partial = hf.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")
        rope = cls(
            head_dim=head_dim,
            theta=float(theta),
            scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            original_max_position_embeddings=hf.get("original_max_position_embeddings"),
        )
        if rope.kind not in SUPPORTED:
            names = ", ".join(SUPPORTED)
            raise ValueError(f"rope scaling {rope.kind!r} (config.json) is not supported; supported: {names}")
        return rope

    @property
    def kind(self) -> str:
        return self.scaling.get("rope_type", self.scaling.get("type")) or "default"

    def context_length(self) -> int:
        """The longest sequence served: M, or vLLM's M * factor where the scaling stretches positions
        past M (YaRN's from its own original context)."""
        m = self.max_position_embeddings
        if self.kind in ("linear", "dynamic"):
            return int(m * self.scaling["factor"])
        if self.kind == "yarn":
            original = self.scaling.get("original_max_position_embeddings") or m
            return max(m, int(original * self.scaling["factor"]))
        return m

    def default_inv_freq(self, theta: float | torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled inverse frequencies of base ``theta`` (the config's if None)."""
        d = self.head_dim
        base = self.theta if theta is None else theta
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """The inverse frequencies [head_dim / 2] and the attention factor on cos and sin (all but
        dynamic, whose frequencies change with the position: see ``tables``)."""
        kind, s = self.kind, self.scaling
        if kind == "linear":
            return self.default_inv_freq() / s["factor"], 1.0
        if kind == "llama3":
            return _llama3(self.default_inv_freq(), s), 1.0
        if kind == "yarn":
            return _yarn(self, s)
        if kind == "longrope":
            return _longrope(self, s)
        return self.default_inv_freq(), 1.0

    def tables(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [context_length, head_dim] (rotate-half layout) in ``dtype`` on ``device``."""
        positions = torch.arange(self.context_length(), dtype=torch.float32)
        if self.kind == "dynamic":
            freqs, factor = positions[:, None] * _dynamic_inv_freq(self, positions), 1.0
        else:
            inv_freq, factor = self.inv_freq()
            freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * factor, emb.sin() * factor
        return cos.to(dtype).to(device), sin.to(dtype).to(device)


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _dynamic_inv_freq(rope: RopeConfig, positions: torch.Tensor) -> torch.Tensor:
    """[positions, head_dim / 2]: position p's frequencies at the NTK base of length max(p + 1, M)."""
    m, factor, d = rope.max_position_embeddings, rope.scaling["factor"], rope.head_dim
    lengths = torch.clamp(positions.long() + 1, min=m)
    bases = rope.theta * ((factor * lengths / m) - (factor - 1)) ** (d / (d - 2))  # transformers' float32
    bases = torch.where(lengths > m, bases, rope.theta)  # up to M: the config's base itself
    return rope.default_inv_freq(bases[:, None])


def _yarn(rope: RopeConfig, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between."""
    d, base, factor = rope.head_dim, rope.theta, s["factor"]
    original = s.get("original_max_position_embeddings") or rope.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (d * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def _longrope(rope: RopeConfig, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-frequency factors, the long ones where the context exceeds the original one."""
    original = rope.original_max_position_embeddings
    factor = s.get("factor") or 1.0
    if original:  # Phi-3: the factor is the context's stretch
        factor = rope.max_position_embeddings / original
    else:
        original = rope.max_position_embeddings
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = rope.max_position_embeddings > original
    ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    d = rope.head_dim
    return 1.0 / (ext * rope.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), attention
