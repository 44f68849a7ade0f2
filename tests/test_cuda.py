"""The GPU path, where a GPU exists (every test here skips without CUDA; ``scripts/gpu-check`` runs them).

- the engine on ``cuda`` gives the tokens of the engine on CPU float32, on every architecture, for
  greedy requests and for a seeded sampled one, with and without the overlap schedule;
- the CUDA IPC transport: a ``TensorRing`` on the GPU in this process, a ``TensorReader`` in a spawned
  one reading through the handle (sent through msgpack, as in a result header), and a second write
  into the same slot seen by the reader;
- a 2-rank NCCL group (2 GPUs): an all-reduce, then the engine on each architecture gives the tokens
  of one rank;
- the real service on the GPU: ``tgi-zmq launch`` on a tiny model gives transformers' greedy tokens.
"""

from __future__ import annotations

import functools
import random
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, start_service, stop_service
from tests.helpers import ARCHITECTURES, hf_greedy, run_engine
from tgi_zmq.messages import SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

MAX_NEW = 8
SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=7)
PARAMS = [SamplingParams()] * 3 + [SAMPLED]
_rng = random.Random(7)
PROMPTS = [[_rng.randrange(3, 512) for _ in range(_rng.randrange(2, 30))] for _ in PARAMS]
ENGINE = dict(num_blocks=40, max_step_tokens=16)  # prompts longer than a step: chunked prefill too
CHILD_TIMEOUT = 180  # seconds for a spawned process to import torch, start CUDA and answer


@pytest.fixture(params=ARCHITECTURES)
def model(request, tiny_models) -> Path:
    return tiny_models(request.param)


# ------------------------------------------------------------------------- the engine on one GPU


@functools.cache
def engine_tokens(folder: Path, device: str, overlap: bool) -> list[list[int]]:
    """Every request's tokens: greedy ones first, the seeded sampled one last (``PARAMS``)."""
    return run_engine(folder, PROMPTS, PARAMS, MAX_NEW, overlap=overlap, device=device, **ENGINE)[0]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_greedy_engine_on_cuda_gives_the_cpu_tokens(model, overlap):
    assert engine_tokens(model, "cuda", overlap)[:3] == engine_tokens(model, "cpu", overlap)[:3]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_seeded_sampling_on_cuda_gives_the_cpu_tokens(model, overlap):
    # The draw of a request's n-th token depends on its seed alone, not on the device it runs on.
    assert engine_tokens(model, "cuda", overlap)[3] == engine_tokens(model, "cpu", overlap)[3]


# ----------------------------------------------------------------------- CUDA IPC across processes


def _ipc_reader(headers, answers) -> None:
    """Spawned: read two result headers through ``TensorReader("cuda")``; answer with what it saw."""
    import msgpack

    from tgi_zmq.messages import TensorRef
    from tgi_zmq.transport import TensorReader

    reader = TensorReader("cuda")
    try:
        for _ in range(2):
            name, refs, handle = msgpack.unpackb(headers.get(timeout=CHILD_TIMEOUT))
            tensors = reader.read(name, [TensorRef(*ref) for ref in refs], handle)
            answers.put(
                (
                    "ok",
                    {
                        "devices": sorted({t.device.type for t in tensors.values()}),
                        "x": tensors["x"].cpu().tolist(),
                        "y": tensors["y"].cpu().tolist(),
                        "buffers": len(reader.buffers),
                    },
                )
            )
    except Exception:
        answers.put(("error", traceback.format_exc()))
    finally:
        reader.close()


def test_cuda_ipc_ring_is_read_by_another_process():
    import msgpack

    from tgi_zmq.transport import TensorRing, remove_stale

    ctx = mp.get_context("spawn")
    headers, answers = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_reader, args=(headers, answers))
    child.start()
    prefix = f"tgi-zmq-test-cuda-{uuid.uuid4().hex[:8]}"
    ring = TensorRing(prefix, 1, 1 << 16, "cuda")  # one slot: the second write reuses it
    try:
        for start in (0, 1000):  # the second write changes the bytes the reader already maps
            x = torch.arange(start, start + 300, dtype=torch.int64, device="cuda")
            y = torch.linspace(start, start + 1, 15, device="cuda").view(3, 5)
            name, refs, handle = ring.write({"x": x, "y": y})
            assert handle is not None, "a CUDA buffer must publish its IPC handle"
            header = [name, [[r.name, r.dtype, r.shape, r.offset] for r in refs], handle]
            headers.put(msgpack.packb(header))
            status, seen = answers.get(timeout=CHILD_TIMEOUT)
            assert status == "ok", seen
            assert seen["devices"] == ["cuda"]
            assert seen["x"] == x.tolist() and seen["y"] == y.tolist()
            assert seen["buffers"] == 1  # opened once, on first use
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        ring.close()
        remove_stale(prefix)


# ------------------------------------------------------------------------- 2 ranks over NCCL


def _nccl_rank(rank: int, port: int, folders: dict[str, Path], results) -> None:
    """Spawned: one rank on ``cuda:<rank>``; rank 0 answers with every architecture's tokens."""
    from tgi_zmq.parallel import init_group

    try:
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
        shard = init_group(rank, 2, "localhost", port, device)
        summed = shard.all_reduce(torch.full((4,), float(rank + 1), device=device))
        out: dict = {"all_reduce": summed.cpu().tolist()}
        for arch, folder in folders.items():
            out[arch], _ = run_engine(
                folder, PROMPTS, PARAMS, MAX_NEW, overlap=True, shard=shard, device=device, **ENGINE
            )
        if rank == 0:
            results.put(("ok", out))
    except Exception:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@two_gpus
def test_two_nccl_ranks_give_the_tokens_of_one(tiny_models):
    folders = {arch: tiny_models(arch) for arch in ARCHITECTURES}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, folders, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        status, sharded = results.get(timeout=CHILD_TIMEOUT + 60 * len(folders))
        assert status == "ok", sharded
        for p in procs:
            p.join(CHILD_TIMEOUT)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert sharded["all_reduce"] == [3.0] * 4
    for arch, folder in folders.items():
        single, _ = run_engine(folder, PROMPTS, PARAMS, MAX_NEW, overlap=True, device="cuda", **ENGINE)
        assert sharded[arch] == single, arch


# ------------------------------------------------------------------------- the service on the GPU

WORDS = "the river model light paris seven orange quietly build window engine north".split()
TEXTS = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(8)]


def generated_ids(url: str, prompt: str) -> list[int]:
    import requests

    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    response = requests.post(url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


@pytest.mark.e2e
def test_service_on_cuda_gives_transformers_greedy_tokens(tiny_models, tmp_path):
    import requests
    from transformers import AutoTokenizer

    folder = tiny_models("llama", smol_tokenizer=True, vocab_size=49152)  # prompts: text, as any client's
    service = start_service(
        tmp_path,
        *("--model-id", str(folder), "--dtype", "float32"),
        *("--max-batch-total-tokens", "8192", "--max-total-tokens", "512"),
    )
    try:
        info = requests.get(service.url + "/info", timeout=10).json()
        assert info["model_device_type"] == "cuda"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        expected = [hf_greedy(folder, tokenizer(t)["input_ids"], MAX_NEW, stop_at_eos=True) for t in TEXTS]
        assert generated_ids(service.url, TEXTS[0]) == expected[0]
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            assert list(pool.map(lambda t: generated_ids(service.url, t), TEXTS)) == expected
    finally:
        stop_service(service)


# ------------------------------------------------------------------------- quantized weights on the GPU


@pytest.mark.parametrize("quantize", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8", "gptq"])
def test_quantized_models_on_cuda_stay_close_to_float(quantize, tiny_models, tmp_path):
    """bitsandbytes' layers (TGI's numerics), fp8 and our repacked GPTQ weights on CUDA: the
    last-token logits stay close to the float model's (4-bit: cosine 0.97 on CPU with our kernels on
    these random weights), and with 8 bits most greedy tokens agree."""
    import torch.nn.functional as F

    from tests.quant_checkpoints import write_gptq_checkpoint
    from tgi_zmq.models import load_model
    from tgi_zmq.quant import runnable

    if quantize not in runnable("cuda", torch.cuda.get_device_capability()):
        pytest.skip(f"this GPU cannot run --quantize {quantize}")
    if quantize.startswith("bitsandbytes"):  # its 43 MB wheel does not fit scripts/gpu-check's 64 MiB carry
        pytest.importorskip("bitsandbytes")
    folder = tiny_models("llama", hidden_size=128, intermediate_size=256)
    served = folder
    if quantize == "gptq":
        served = tmp_path / "gptq"
        write_gptq_checkpoint(folder, served, group=32)
    quantized = load_model(served, "float16", "cuda", quantize=quantize)
    dense = load_model(folder, "float16", "cuda")
    ids = torch.tensor(PROMPTS[0], device="cuda")
    logits = [_last_logits(m, ids) for m in (quantized, dense)]
    assert F.cosine_similarity(logits[0], logits[1], dim=0) > (
        0.99 if quantize in ("bitsandbytes", "fp8") else 0.95
    )
    if quantize not in ("bitsandbytes", "fp8"):
        return
    greedy = [SamplingParams()] * len(PROMPTS)
    tokens = run_engine(served, PROMPTS, greedy, MAX_NEW, device="cuda", quantize=quantize, **ENGINE)[0]
    reference = run_engine(folder, PROMPTS, greedy, MAX_NEW, **ENGINE)[0]
    agree = sum(a == b for a, b in zip(tokens, reference, strict=True))
    assert agree >= len(PROMPTS) // 2, (tokens, reference)


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The float32 logits after ``ids`` in one prefill of a fresh cache."""
    from tgi_zmq.attention import AttentionMetadata
    from tgi_zmq.forward_batch import ForwardBatch

    cache = model.new_cache(8, 16)
    n = len(ids)
    table = torch.arange(8, device=ids.device).view(1, 8)
    slots = torch.arange(n, device=ids.device)
    meta = AttentionMetadata.for_pages([0, n], [n], table, slots, 16)
    rows = torch.tensor([n - 1], device=ids.device)
    batch = ForwardBatch(ids, torch.arange(n, device=ids.device), meta, rows, None)
    return model.forward(batch, cache)[0].float()
