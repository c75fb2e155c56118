"""Compile cleanliness: the model forward traces as one graph (no graph breaks) and
never recompiles after warmup, across the depth-recurrence switch, train/eval mode and repeated
steps. CPU with the aot_eager backend (forward + backward graphs through AOTAutograd)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import make_hp

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class CountingBackend:
    """aot_eager, counting how many graphs dynamo hands over: each is a (re)compile."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def test_no_graph_breaks_and_no_recompiles_after_warmup():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hp = make_hp(NUM_LAYERS=3, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUAL_LAST_N=1)
    model = tg.GPT(hp)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    # As build_model does on GPU: eval compiled once, every batch padded to one row count.
    eval_forward = tg.fixed_rows(
        torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False), 2
    )
    ids = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len))

    def train_step(looping: bool) -> None:
        model.train()
        model.looping = looping
        compiled(ids, ids).backward()

    def eval_step(looping: bool, rows: int) -> None:
        model.eval()
        model.looping = looping
        with torch.no_grad():
            nll = eval_forward(ids[:rows], ids[:rows], reduction="none")
            assert nll.shape == (rows, hp.train_seq_len)
            torch.testing.assert_close(nll, model(ids[:rows], ids[:rows], reduction="none"))

    for looping in (False, True):  # warmup: what prime_compile and the first validations run
        train_step(looping)
        eval_step(looping, rows=2)
    warm = backend.compiles
    assert warm == 4  # one graph per (looping, train/eval) pair, nothing more
    for looping in (False, True, False, True):  # the schedule switches; validations interleave
        train_step(looping)
        eval_step(looping, rows=2)
        eval_step(looping, rows=1)  # the last, partial batch of a validation
    assert backend.compiles == warm, "recompiled after warmup"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_late_qat_switch_compiles_once_in_warmup_and_never_again():
    """prime_compile runs the QAT graph too, so switching QAT on mid-run (by schedule position)
    costs no compile in the timed loop, and the compiled QAT graph equals eager QAT."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hp = make_hp(NUM_LAYERS=2, MODEL_DIM=128, QAT_START_LR_SCALE=0.5)
    model = tg.GPT(hp)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    ids = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len))
    plan = tg.quant_plan(model, hp)
    assert plan
    for qat in (False, True):  # warmup, as prime_compile does
        tg.set_qat(model, plan if qat else None)
        compiled(ids, ids).backward()
    warm = backend.compiles
    assert warm == 2
    tg.set_qat(model, None)
    compiled(ids, ids).backward()
    tg.set_qat(model, plan)  # the schedule switches QAT on
    for _ in range(2):
        loss = compiled(ids, ids)
        loss.backward()
    torch.testing.assert_close(loss, model(ids, ids))
    assert backend.compiles == warm, "recompiled at the QAT switch"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
