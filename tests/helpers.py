"""Shared test helpers: tiny random models, transformers references and the engine over them."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import queue
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.multiprocessing as mp

from tgi_zmq import models
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.engine import EngineCore
from tgi_zmq.messages import SamplingParams, ScheduleRequest
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.offline import LocalExecutor, run_to_completion
from tgi_zmq.parallel import Shard, init_group
from tgi_zmq.policy import Request, SchedulePolicy

ARCHITECTURES = tuple(models.ARCHITECTURES)  # every model_type served: ``tiny_model`` makes each
SEQ2SEQ = ("t5",)


def tiny_model(arch: str, folder: Path, vocab_size: int = 512, **overrides) -> Path:
    """Save a small random-weight model of ``arch`` (transformers) as safetensors into ``folder``."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **heads)
    # three layers: local, global, local; a window of 8 tokens, far shorter than the tests' contexts
    gemma_like = dict(llama_like, num_hidden_layers=3, head_dim=16, sliding_window=8)
    gemma_like["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(llama_like, tie_word_embeddings=False)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(llama_like, sliding_window=8)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(llama_like, tie_word_embeddings=True)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(llama_like, head_dim=32)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(llama_like, head_dim=16)),
        "gemma2": (
            tf.Gemma2Config,
            tf.Gemma2ForCausalLM,
            dict(
                gemma_like,
                query_pre_attn_scalar=24,
                attn_logit_softcapping=2.0,  # small, so that the cap bends the tiny model's scores
                final_logit_softcapping=5.0,
            ),
        ),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(gemma_like, rope_theta=1e6)),
        # LongRoPE's short factors (its context is the original one: see test_rope.py for the long ones)
        "phi3": (
            tf.Phi3Config,
            tf.Phi3ForCausalLM,
            dict(llama_like, rope_scaling=longrope(8), original_max_position_embeddings=1024),
        ),
        # a window of 8: far shorter than the tests' contexts
        "starcoder2": (tf.Starcoder2Config, tf.Starcoder2ForCausalLM, dict(llama_like, sliding_window=8)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(llama_like, num_local_experts=8)),
        "qwen3_moe": (  # layer 0 dense, layer 1 sparse; the top 2 weights not renormalised
            tf.Qwen3MoeConfig,
            tf.Qwen3MoeForCausalLM,
            dict(llama_like, head_dim=32, num_experts=8, moe_intermediate_size=64, mlp_only_layers=[0]),
        ),
        "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=64, n_layer=2, n_head=4)),
        "t5": (
            tf.T5Config,
            tf.T5ForConditionalGeneration,
            dict(
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=3,  # transformers' cache breaks with more decoder than encoder layers
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=20,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                decoder_start_token_id=0,
            ),
        ),
    }
    config_cls, model_cls, cfg = configs[arch]
    model = model_cls(config_cls(**{**common, **cfg, **overrides})).eval()
    # transformers zeroes biases and Gemma's norms (which scale by 1 + w): random, so that they count
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or (arch.startswith("gemma") and name.endswith("norm.weight")):
                param.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def longrope(pairs: int) -> dict:
    """Phi-3's ``rope_scaling``: a short and a long factor for each of ``pairs`` rotary frequencies."""
    short = [1.0 + 0.25 * i for i in range(pairs)]
    return {"type": "longrope", "short_factor": short, "long_factor": [2 * f + 1 for f in short]}


def copy_smol_tokenizer(folder: Path) -> Path:
    """Put SmolLM2's tokenizer beside a tiny model (vocabulary 49152), so that its prompts are text."""
    from tgi_zmq.convert import ensure_default_model

    smol = ensure_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, folder / name)
    return folder


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (the decoder's output for seq2seq models)."""
    return hf_greedy_batch(folder, [prompt], max_new_tokens, stop_at_eos)[0]


def hf_greedy_batch(
    folder: Path, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = False
) -> list[list[int]]:
    """``hf_greedy`` of each prompt, in one ``generate``: far faster than one call each. The prompts
    have one length, so that no row is padded (a padded row is no longer the prompt alone). Without
    ``stop_at_eos`` EOS is a token like any other (as for an engine given no EOS ids): not stopped at,
    and not banned either (a ban would change the argmax where EOS is the likeliest token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    assert len({len(p) for p in prompts}) == 1, "prompts of one length: no padding"
    seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
    loader = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = loader.from_pretrained(folder, torch_dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if stop_at_eos else set()
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    out = model.generate(
        torch.tensor(prompts),
        max_new_tokens=max_new_tokens,
        min_new_tokens=1 if stop_at_eos else None,
        do_sample=False,
        pad_token_id=0,
    )
    rows = out[:, 1 if seq2seq else len(prompts[0]) :].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def hf_logits(folder: Path, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' float32 logits [len(continuation) + 1 or len(prompt + continuation), vocab]."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(folder)
    with torch.no_grad():
        if config.is_encoder_decoder:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
            decoder = [config.decoder_start_token_id, *continuation]
            out = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder]))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
            out = model(torch.tensor([prompt + continuation]))
    return out.logits[0].float()


class FrequencyPenalty:
    """The reference for ``frequency_penalty`` (transformers has no processor for it): each token's
    logit loses ``penalty * count / len(history)``, the history being the prompt and the tokens
    generated so far."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(input_ids, dtype=scores.dtype)
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, ones)
        return scores - self.penalty * counts / input_ids.shape[1]


def run_engine(
    folder: Path,
    prompts: list[list[int]],
    params: list[SamplingParams],
    max_new_tokens: int,
    num_blocks: int = 64,
    block_size: int = 4,
    max_step_tokens: int = 64,
    prefix_caching: bool = True,
    arrive_every: int = 0,
    overlap: bool = False,
    shard: Shard | None = None,
    device: str = "cpu",
    requests_out: list[Request] | None = None,
    quantize: str | None = None,
    dtype: str = "float32",
    runner: ModelRunner | None = None,
) -> tuple[list[list[int]], SchedulePolicy]:
    """The engine core over a model in this process (``LocalExecutor``), until every request is done.

    With ``arrive_every`` > 0 the requests arrive one by one, that many engine turns apart. With
    ``overlap`` the scheduler lags one step behind the worker, as in the service. ``requests_out``
    receives the finished requests. ``runner``: a model already loaded (with ``num_blocks`` pages of
    ``block_size``), for a second run without a second load; it forgets its last run's requests.
    """
    max_running, max_total = 64, 10_000
    if runner is None:
        runner = ModelRunner(
            str(folder),
            dtype,
            device,
            num_blocks,
            block_size,
            shard,
            max_running,
            max_total,
            quantize=quantize,
        )
    runner.forget_requests()
    hf = models.read_config(folder)
    window = models.architecture(hf)[0].kv_window(hf)  # as the launcher derives it: pages behind it are freed
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching, window=window)
    sched = SchedulePolicy(blocks, max_step_tokens, max_running, (), max_total)
    engine = EngineCore(sched, LocalExecutor(runner), block_size, overlap=overlap)
    start = getattr(runner.model.cfg, "decoder_start_token_id", None)  # seq2seq: prompts go to the encoder
    reqs = [
        Request.from_schedule(ScheduleRequest(f"r{i}", p, sp, max_new_tokens, 0.0), start)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    run_to_completion(engine, reqs, arrive_every)
    assert sched.block_manager.num_free == sched.block_manager.capacity
    if requests_out is not None:
        requests_out.extend(reqs)
    return [r.output_ids for r in reqs], sched


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>`` (a file without .py) imported as a module, for its functions."""
    module_name = f"{name}_script"
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(module_name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


def built_extension() -> ModuleType:
    """The C++ extension, built if needed; skips without a compiler, fails if it does not build."""
    from tgi_zmq import native

    if native.build() is None:
        from torch.utils.cpp_extension import get_cxx_compiler

        if shutil.which(get_cxx_compiler()) is None:
            pytest.skip("no C++ compiler: the extension cannot be built (torch's paths run)")
        pytest.fail("the C++ extension failed to build (see the warning above)")
    return native.extension()


def isa_codes(ext: ModuleType) -> list[int]:
    """One code per distinct path of the extension on this CPU (a request above the CPU is clamped down)."""
    from tgi_zmq import native

    paths = {ext.isa_name(code): code for code in sorted(native.ISAS.values(), reverse=True)}
    return sorted(paths.values())


def _rank(rank: int, port: int, tasks, results) -> None:
    """One rank of ``TwoRanks``: run each task's prompts through the engine on two ranks (rank 0 says
    the tokens), until a None task; a failure is reported and ends the rank (its group is unusable)."""
    torch.set_num_threads(1)
    shard = init_group(rank, 2, "127.0.0.1", port, "cpu")
    while (task := tasks.get()) is not None:
        folder, prompts, params = task
        try:
            out, _ = run_engine(
                folder, prompts, params, 8, num_blocks=40, max_step_tokens=16, overlap=True, shard=shard
            )
        except Exception as exc:
            results.put(f"rank {rank}: {exc!r}")
            return
        if rank == 0:
            results.put(out)
    torch.distributed.destroy_process_group()


class TwoRanks:
    """Two rank processes (gloo) started once and given one model after another (``run``: each rank runs
    the engine on its half of the model, rank 0 says the tokens): spawning a pair per model cost ~3 s of
    imports each. A failed task stops the pair; the next task starts anew. (conftest's ``two_ranks``.)"""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list = []
        self.tasks: list = []  # a queue per rank

    def run(self, folder, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.start()
        for tasks in self.tasks:
            tasks.put((folder, prompts, params))
        try:
            out = self.results.get(timeout=120)
        except queue.Empty:
            out = "no answer in 120 s"
        if isinstance(out, str):
            self.stop()
            pytest.fail(out)
        return out

    def start(self) -> None:
        self.stop()
        self.tasks = [self.ctx.Queue() for _ in range(2)]
        self.results = self.ctx.Queue()
        from tests.conftest import free_port

        port = free_port()
        self.procs = [
            self.ctx.Process(target=_rank, args=(r, port, self.tasks[r], self.results), daemon=True)
            for r in range(2)
        ]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        for p, tasks in zip(self.procs, self.tasks, strict=True):
            if p.is_alive():
                tasks.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        self.procs, self.tasks = [], []
