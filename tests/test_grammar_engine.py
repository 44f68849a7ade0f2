"""Structured output through the engine over a tiny model (``LocalExecutor``, overlap on): the worker
compiles each grammar once, when its request arrives, and no step starts a grammar before it is
compiled; it fills the grammar masks from its own matchers, so grammar requests keep two steps in
flight, and says when a grammar is done; their outputs follow the grammar through preemption, replays
and worker losses (the grammars announced again), and plain requests beside them keep the tokens they
have alone. A refused grammar fails its request alone. With two ranks only rank 0 gets and follows
the grammars."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.helpers import tiny_model
from tgi_zmq.block_manager import BlockManager
from tgi_zmq.engine import ROW_FAILED, EngineCore
from tgi_zmq.grammar import GrammarEngine, GrammarError, RowMatchers
from tgi_zmq.messages import Grammar, GrammarStart, SamplingParams
from tgi_zmq.model_runner import ModelRunner
from tgi_zmq.offline import LocalExecutor, run_to_completion
from tgi_zmq.parallel import Shard, init_group
from tgi_zmq.policy import Request, SchedulePolicy
from tgi_zmq.step import Step

EOS = 2
REGEX = "[0-9]{4}-[a-z]{3}-[0-9]{3}"
GRAMMAR = Grammar("regex", REGEX)
PLAIN = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.9, seed=5)]
CONSTRAINED = [
    SamplingParams(grammar=GRAMMAR),
    SamplingParams(do_sample=True, temperature=1.5, seed=7, grammar=GRAMMAR),
]
PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 60], [1, 70, 71, 72, 73, 74, 75, 76], [1, 80, 81]]
MAX_NEW = 16


def byte_tokenizer():
    """One token per byte (GPT-2's byte alphabet) after <pad>, <s> and </s>: 259 of the model's 512 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tiny_model("llama", tmp_path_factory.mktemp("llama"))  # its own: a tokenizer goes beside it
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def grammars(folder) -> GrammarEngine:
    """Rank 0's engine (loaded at its boot in the service)."""
    from transformers import AutoTokenizer

    return GrammarEngine(AutoTokenizer.from_pretrained(folder))


class Recording(LocalExecutor):
    """Runs each step at once; records, per step with grammar rows, the steps in flight at its
    submit (itself included), every grammar the steps start (each compiled already: no step waits for
    a compile) and every grammar announced."""

    def __init__(self, runner: ModelRunner, engine: list[EngineCore]):
        super().__init__(runner)
        self.engine = engine
        self.grammar_depths: list[int] = []
        self.starts: list[GrammarStart] = []
        self.announced: list[str] = []

    def submit(self, step_id: int, step: Step) -> None:
        if step.sampling.grammar.any():
            self.grammar_depths.append(len(self.engine[0].inflight))
        for start in step.grammars if self.runner.shard.rank == 0 else ():
            compiled = self.runner.grammars.engine._compiles.get((start.grammar.kind, start.grammar.value))
            assert compiled is not None and compiled.ready, "a step would wait for a compile"
        self.starts += step.grammars
        super().submit(step_id, step)

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        self.announced.append(rid)
        super().compile_grammar(rid, grammar)


def run(
    folder: Path,
    grammars: GrammarEngine | None,
    requests: list[Request],
    num_blocks: int = 64,
    lose_workers_at: int = 0,
    shard: Shard | None = None,
    device: str = "cpu",
    executor_cls: type[Recording] = Recording,
) -> tuple[EngineCore, Recording]:
    """``requests`` through an overlapping engine until done (the workers lost at that turn, if any)."""
    runner = ModelRunner(
        str(folder),
        "float32",
        device,
        num_blocks,
        4,
        shard,
        max_rows=8,
        max_total_tokens=256,
        grammars=grammars,
    )
    policy = SchedulePolicy(BlockManager(num_blocks, 4), 64, 8, (EOS,), 256)
    ref: list[EngineCore] = []
    executor = executor_cls(runner, ref)
    engine = EngineCore(policy, executor, 4, overlap=True)
    ref.append(engine)
    if lose_workers_at:
        for req in requests:
            if req.params.grammar is not None:  # compiled already (cached): the loss comes at a known point
                grammars.compile(req.params.grammar).template()
            policy.add(req)
        for _ in range(lose_workers_at):
            engine.step()
        engine.lose_workers("lost for the test")
        requests = []
    run_to_completion(engine, requests)
    assert policy.block_manager.num_free == num_blocks
    return engine, executor


def new_requests(params: list[SamplingParams]) -> list[Request]:
    return [Request(f"r{i}", PROMPTS[i], p, MAX_NEW) for i, p in enumerate(params)]


def text(req: Request) -> str:
    return byte_tokenizer().decode(req.output_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def plain_alone(folder, grammars) -> list[list[int]]:
    reqs = new_requests(PLAIN)
    run(folder, grammars, reqs)
    return [r.output_ids for r in reqs]


def test_grammar_requests_follow_their_regex_beside_plain_ones_and_keep_the_overlap(
    folder, grammars, plain_alone
):
    reqs = new_requests(PLAIN + CONSTRAINED)
    _, executor = run(folder, grammars, reqs)
    assert [r.output_ids for r in reqs[:2]] == plain_alone
    for req in reqs[2:]:
        assert re.fullmatch(REGEX, text(req)) and req.finish_reason == "eos_token"
    assert executor.grammar_depths and max(executor.grammar_depths) == 2  # built while one was in flight
    assert [start.output_ids for start in executor.starts] == [[], []]  # one start per request
    assert executor.announced == ["r2", "r3"]  # each grammar announced once
    assert not executor.runner.grammars._rows  # every matcher dropped once its request ended


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grammar_masks_apply_on_cuda(folder, grammars):
    reqs = new_requests(PLAIN + CONSTRAINED)
    _, executor = run(folder, grammars, reqs, device="cuda")
    for req in reqs[2:]:
        assert re.fullmatch(REGEX, text(req)) and req.finish_reason == "eos_token"
    assert max(executor.grammar_depths) == 2


def test_grammars_resume_after_preemption(folder, grammars, plain_alone):
    reqs = new_requests(PLAIN + CONSTRAINED)
    engine, executor = run(folder, grammars, reqs, num_blocks=14)
    assert engine.policy.num_preemptions > 0
    assert [r.output_ids for r in reqs[:2]] == plain_alone
    for req in reqs[2:]:
        assert re.fullmatch(REGEX, text(req))
    assert any(start.output_ids for start in executor.starts)  # a recompute resumed past its tokens
    assert max(executor.grammar_depths) == 2


def test_grammars_resume_after_a_replay_and_a_worker_loss(folder, grammars):
    tokenizer = byte_tokenizer()
    streamed = tokenizer.encode("2026-", add_special_tokens=False)  # a replay arrives with these
    replay = Request("replay", PROMPTS[0] + streamed, CONSTRAINED[1], MAX_NEW, prompt_len=len(PROMPTS[0]))
    reqs = [replay, *new_requests(PLAIN + CONSTRAINED)[1:]]
    _, executor = run(folder, grammars, reqs, lose_workers_at=4)
    assert text(replay).startswith("2026-")
    for req in (replay, *reqs[2:]):
        assert re.fullmatch(REGEX, text(req))
    resumed = [start.output_ids for start in executor.starts]
    assert resumed[0] == streamed and len(resumed) == 6  # each grammar request starts again after the loss
    assert sorted(executor.announced) == [
        "r2",
        "r2",
        "r3",
        "r3",
        "replay",
        "replay",
    ]  # and is announced again
    before, after = resumed[:3], resumed[3:]
    assert after[0][: len(streamed)] == streamed
    assert all(len(a) > len(b) for a, b in zip(after, before, strict=True))


def test_row_masks_never_leave_a_grammar_row_without_a_token(grammars):
    rows = RowMatchers(grammars)
    tokenizer = byte_tokenizer()
    a, b, x = tokenizer.convert_tokens_to_ids(["a", "b", "x"])
    rows.start(
        [
            GrammarStart("r3", 3, Grammar("regex", "ab"), [a]),
            GrammarStart("r5", 5, Grammar("regex", "ab"), []),
        ]
    )

    def allowed(row_pairs: list[tuple[int, int]]) -> list[list[int]]:
        bitmask = rows.masks(row_pairs, 3, 512)
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return [row.nonzero().flatten().tolist() for row in bits.view(3, -1)]

    first = allowed([(0, 3), (2, 5)])
    assert first[0] == [b] and first[2] == [a] and first[1] == list(range(512))  # row 1: no grammar
    assert rows.advance(3, b)  # "ab": done
    assert allowed([(0, 3)])[0] == [EOS]  # only EOS may follow
    with pytest.raises(GrammarError):
        rows.advance(3, x)  # a token it refuses: its row fails (the engine fails its request alone)
    assert allowed([(0, 3)])[0][:259] == list(range(259))
    rows.drop([3, 5], [])
    assert not rows._rows


class Router:
    """A ROUTER socket that keeps the frames sent."""

    def __init__(self):
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sent.append(frames)


def test_only_rank_0_gets_the_grammars(folder, tmp_path):
    from tgi_zmq import messages as m
    from tgi_zmq.config import ServerConfig
    from tgi_zmq.step import build_step
    from tgi_zmq.worker_group import WorkerGroup

    limits = dict(max_batch_prefill_tokens=64, max_concurrent_requests=4, max_total_tokens=128)
    router = Router()
    group = WorkerGroup(ServerConfig(str(folder), "m", str(tmp_path), num_shard=2, **limits), router)
    policy = SchedulePolicy(BlockManager(16, 4), 64, 4, (EOS,), 128)
    policy.add(Request("g", PROMPTS[0], CONSTRAINED[0], MAX_NEW))
    (req,) = policy.take_grammars()
    policy.grammar_compiled(req)
    step = build_step(policy.schedule(), 4)
    try:
        group.compile_grammar("g", GRAMMAR)
        group.submit(1, step)
    finally:
        group.close()
    (identity, frame), *steps = router.sent
    assert identity == b"worker-0" and m.decode(frame) == m.GrammarRequest("g", GRAMMAR)
    rank0, rank1 = (m.decode(frame) for identity, frame in sorted(steps))
    assert rank0.grammars == step.grammars == [GrammarStart("g", 0, GRAMMAR, [])]
    assert rank1.grammars == [] and rank1.tensors == rank0.tensors


class Rank(Recording):
    """A rank of a simulated group in which each rank runs its own engine (one scheduler drives them all
    in the service, with rank 0's answers): rank 0 shares which grammars are done; the others are
    announced no grammars, and say at once that they are compiled (they have no engine)."""

    def submit(self, step_id: int, step: Step) -> None:
        super().submit(step_id, step)
        output = self.results[step_id].output
        done = self.runner.shard.broadcast(output.grammar_done.to(torch.int64))
        output.grammar_done = done.bool()

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        if self.runner.shard.rank == 0:
            super().compile_grammar(rid, grammar)
        else:
            self.announced.append(rid)

    def compiled_grammars(self) -> list[tuple[str, str]]:
        if self.runner.shard.rank == 0:
            return super().compiled_grammars()
        taken, self.announced = [(rid, "") for rid in self.announced], []
        return taken


def _rank(rank: int, port: int, folder: Path, results) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    shard = init_group(rank, 2, "127.0.0.1", port, "cpu")
    reqs = new_requests(PLAIN + CONSTRAINED)
    grammars = None
    if rank == 0:
        grammars = GrammarEngine(AutoTokenizer.from_pretrained(folder))
        grammars.compile(GRAMMAR).template()  # answered in the first turn, as rank 1's: the ranks keep step
    _, executor = run(folder, grammars, reqs, shard=shard, executor_cls=Rank)
    results.put((rank, [r.output_ids for r in reqs], executor.runner.grammars._engine is not None))
    torch.distributed.destroy_process_group()


def test_two_ranks_give_the_tokens_of_one_and_only_rank_0_follows_the_grammars(folder, grammars):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, folder, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    ranks = {rank: (outputs, loaded) for rank, outputs, loaded in (results.get(), results.get())}
    single = new_requests(PLAIN + CONSTRAINED)
    run(folder, grammars, single)
    assert ranks[0][0] == ranks[1][0] == [r.output_ids for r in single]
    assert ranks[0][1] and not ranks[1][1]  # rank 1 never loaded llguidance


class Credulous(LocalExecutor):
    """Says every grammar announced is compiled, without compiling it (a compile's verdict gone wrong)."""

    def __init__(self, runner: ModelRunner):
        super().__init__(runner)
        self.announced: list[str] = []

    def compile_grammar(self, rid: str, grammar: Grammar) -> None:
        self.announced.append(rid)

    def compiled_grammars(self) -> list[tuple[str, str]]:
        answers, self.announced = [(rid, "") for rid in self.announced], []
        return answers


def test_a_grammar_the_worker_cannot_start_fails_its_row_alone(folder, grammars, plain_alone):
    """Rank 0 refuses such a grammar when it is announced (a 422); should one reach a step anyway, its
    matcher cannot start and its mask raises: that row fails, and the grammar and plain rows beside it
    go on."""
    runner = ModelRunner(
        str(folder), "float32", "cpu", 64, 4, max_rows=8, max_total_tokens=256, grammars=grammars
    )
    policy = SchedulePolicy(BlockManager(64, 4), 64, 8, (EOS,), 256)
    engine = EngineCore(policy, Credulous(runner), 4, overlap=True)
    reqs = new_requests(PLAIN + CONSTRAINED)
    reqs[3].params = SamplingParams(grammar=Grammar("regex", "[0-9"))  # not a regex
    for req in reqs:
        policy.add(req)
    failed = []
    while engine.has_work():
        failed += [(req.rid, reason) for req, reason in engine.step().failed]
    assert failed == [("r3", ROW_FAILED)]
    assert [r.output_ids for r in reqs[:2]] == plain_alone
    assert re.fullmatch(REGEX, text(reqs[2])) and reqs[2].finish_reason == "eos_token"
    assert policy.block_manager.num_free == 64


def test_a_refused_grammar_fails_its_request_alone_and_a_slow_one_holds_no_step(folder, grammars):
    """A grammar the engine refuses, and one past the compile timeout, are their requests' refusals (the
    process makes them 422s); the requests beside them run meanwhile and keep their tokens."""
    from transformers import AutoTokenizer

    slow = Grammar(
        "json",
        json.dumps({"properties": {f"p{i}": {"minimum": i, "maximum": i * 1000 + 7} for i in range(3000)}}),
    )
    quick = GrammarEngine(AutoTokenizer.from_pretrained(folder), timeout=0.2)
    runner = ModelRunner(
        str(folder), "float32", "cpu", 64, 4, max_rows=8, max_total_tokens=256, grammars=quick
    )
    ref: list[EngineCore] = []
    engine = EngineCore(SchedulePolicy(BlockManager(64, 4), 64, 8, (EOS,), 256), Recording(runner, ref), 4)
    ref.append(engine)
    bad = Request("bad", PROMPTS[1], SamplingParams(grammar=Grammar("regex", "a(b")), MAX_NEW)
    late = Request("slow", PROMPTS[2], SamplingParams(grammar=slow), MAX_NEW)
    plain, good = new_requests([PLAIN[0], CONSTRAINED[0]])
    for req in (bad, late, plain, good):
        engine.policy.add(req)
    refused: dict[str, str] = {}
    while engine.has_work():
        out = engine.step()
        assert not out.failed
        refused.update((req.rid, reason) for req, reason in out.refused)
    assert "unclosed group" in refused["bad"]
    assert refused["slow"] == "compilation timed out after 0.2 s"
    assert bad.finish_reason == late.finish_reason == "error" and not bad.output_ids and not late.output_ids
    assert re.fullmatch(REGEX, text(good)) and plain.finish_reason == "length"
