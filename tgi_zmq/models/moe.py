"""Mixtures of experts over the Llama family: Mixtral and Qwen3-MoE.

The attention and the layer loop are Llama's (Qwen3-MoE's q/k norms included); a sparse layer's MLP is
``SparseMoe``: a router picks each token's top k experts, and each expert is a gated MLP of its own.

How the experts run (on the CPU): the (token, expert) pairs are sorted by expert, each expert with tokens
runs its gate|up and down matmuls over its contiguous run of rows, and the weighted rows are added back
to their tokens (``index_add_``): a loop over the experts that have tokens, never over tokens. Measured
against torch 2.13's ``torch._grouped_mm`` over stacked expert weights (``scripts/moebench --grouped-mm``:
hidden 512, expert intermediate 1024, 8 experts, top 2, one thread, AMD EPYC Zen 4), the loop through
``dense_linear`` is as fast at 1 token, 1.4-2.4x faster at 16-64 (our gemv reads each weight once for all
of an expert's rows) and 1.2x slower at 256 (a prefill chunk). Decode steps are most of a CPU's serving
time, so the experts stay per-expert linears, each made by its ``LinearMethod``: ``--quantize``, GPTQ and
GGUF experts work as any linear does (a grouped matmul would need one stacked dense tensor per projection).

Tensor parallelism splits each expert's intermediate units over the ranks, as the dense MLP is split
(gate|up by rows, down by columns), with one all-reduce after the weighted sum of the experts. Expert
parallelism (whole experts per rank) would need the tokens dispatched to the rank of their expert, and a
rank would idle whenever routing skews (one token's two experts on one rank at a decode step of 1); the
split by units keeps every rank's share of each step's work even and costs the dense MLP's single
all-reduce. The router is small and replicated: every rank routes alike from the all-reduced stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tgi_zmq.layers import Linear, MergedColumnParallelLinear, UnquantizedLinear, WeightSource, silu_and_mul
from tgi_zmq.models.llama import LlamaConfig, LlamaModel
from tgi_zmq.parallel import Shard

# model_type -> (the sparse block's checkpoint name in a layer, each expert's gate, up and down)
CHECKPOINT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    num_experts: int
    experts_per_token: int  # top k
    expert_intermediate_size: int
    norm_topk_prob: bool  # the top k probabilities renormalised to sum to 1 (Mixtral always)
    sparse_layers: frozenset[int]  # the layers whose MLP is the mixture (Qwen3-MoE may keep dense ones)
    block: str
    projections: tuple[str, str, str]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> MoeConfig:
        base = LlamaConfig.from_hf(cfg)
        llama = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaConfig)}
        block, projections = CHECKPOINT_NAMES[cfg["model_type"]]
        layers = range(cfg["num_hidden_layers"])
        if cfg["model_type"] == "mixtral":
            experts, width, norm = cfg["num_local_experts"], cfg["intermediate_size"], True
            sparse = list(layers)
        else:  # Qwen3-MoE: its sparse layers as transformers' Qwen3MoeDecoderLayer picks them
            experts, width = cfg["num_experts"], cfg["moe_intermediate_size"]
            norm = cfg.get("norm_topk_prob", False)
            dense, step = set(cfg.get("mlp_only_layers") or ()), cfg.get("decoder_sparse_step", 1)
            sparse = [i for i in layers if i not in dense and experts > 0 and (i + 1) % step == 0]
        return cls(
            **llama,
            num_experts=experts,
            experts_per_token=cfg["num_experts_per_tok"],
            expert_intermediate_size=width,
            norm_topk_prob=norm,
            sparse_layers=frozenset(sparse),
            block=block,
            projections=projections,
        )


class MoeModel(LlamaModel):
    """Llama whose sparse layers' MLP is a ``SparseMoe`` (the extension's layer loop has dense MLPs
    only, so these run the Python layers)."""

    cfg: MoeConfig

    def _load_mlp(self, w: WeightSource, i: int) -> dict[str, Any]:
        if i not in self.cfg.sparse_layers:
            return super()._load_mlp(w, i)
        return dict(moe=SparseMoe(w, f"model.layers.{i}.{self.cfg.block}.", self.shard, self.cfg))


@dataclasses.dataclass
class Expert:
    gate_up: MergedColumnParallelLinear  # this rank's units of gate and of up
    down: Linear  # the matching input columns, not all-reduced (``SparseMoe`` sums the experts first)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))


class SparseMoe:
    """Router, then each token's top k experts weighted, as transformers' ``MixtralSparseMoeBlock``
    and ``Qwen3MoeSparseMoeBlock`` compute them (the same ops in the same dtypes)."""

    def __init__(self, w: WeightSource, prefix: str, shard: Shard, cfg: MoeConfig):
        # Unquantized whatever --quantize says (as vLLM's): a rounded router picks other experts.
        self.router = Linear(w, [(prefix + "gate", None)], method=UnquantizedLinear())
        gate, up, down = cfg.projections
        units = cfg.expert_intermediate_size
        cols = shard.rows(shard.split(units), 1)
        self.experts = [
            Expert(
                MergedColumnParallelLinear(w, [f"{prefix}experts.{e}.{n}" for n in (gate, up)], shard, units),
                Linear(w, [(f"{prefix}experts.{e}.{down}", None)], cols),
            )
            for e in range(cfg.num_experts)
        ]
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.shard = shard

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (normed) -> the experts' weighted sum [T, hidden], all-reduced over the ranks."""
        weights, experts = self.route(x)
        mix = self._by_expert if x.device.type == "cpu" else self._every_expert
        return self.shard.all_reduce(mix(x, weights, experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top k experts [T, k] and their weights in x's dtype: the softmax over every expert
        in float32, its top k, renormalised when the model says so."""
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def _by_expert(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The (token, expert) pairs sorted by expert (tokens in order within each), one matmul pair per
        expert over its run of rows, the weighted rows added to their tokens in expert order (as
        transformers' loop adds them). Reads the run lengths on the host: the CPU path."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // self.top_k
        runs = torch.bincount(flat, minlength=len(self.experts)).tolist()
        rows = x[tokens]
        out, start = [], 0
        for expert, n in zip(self.experts, runs, strict=True):
            if n:
                out.append(expert(rows[start : start + n]))
                start += n
        weighted = torch.cat(out) * weights.flatten()[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, weighted)

    def _every_expert(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert over every token, weighted 0 where not chosen: no host synchronisation (GPU, the
        meta device), at num_experts / k times the FLOPs; the same sums in the same order as
        ``_by_expert`` (adding an exact 0 changes nothing)."""
        dense = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)
        dense.scatter_(1, experts, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out += expert(x) * dense[:, e : e + 1]
        return out
