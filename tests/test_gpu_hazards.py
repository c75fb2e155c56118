"""What a GPU run does that a plain CPU run hides: evaluation forwards built under autograd, and
compiled scoring graphs that recompile on their first real batch (inside the timed pass)."""

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import make_hp, randomize_
from test_eval import EVAL_KNOBS, V, random_tokens, val_data

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_model(**knobs):
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    torch.manual_seed(0)
    return hp, randomize_(tg.GPT(hp))


def eval_forwards_with_grad(calls):
    """Forwards of a model in eval mode with autograd on; only LoRA TTT (adapters attached) may."""
    return [c for c in calls if c[0] and not c[1] and not c[2]]


@pytest.mark.parametrize("ttt_mode", ["chunked", "lora"])
def test_no_evaluation_forward_runs_with_autograd(forwards, cpu_runtime, ttt_mode):
    hp, model = tiny_model(NGRAM_MIX=True, TTT_MODE=ttt_mode, VAL_BATCH_TOKENS=48)
    val = val_data(random_tokens())
    tg.evaluate(model, val, hp, cpu_runtime)  # step-0 / VAL_LOSS_EVERY validation, raw, pre_quant
    tg.score_model(model, val, hp, cpu_runtime, lambda _: None)  # every pass, as EVAL_ONLY runs it
    assert len(forwards) > 5
    assert not eval_forwards_with_grad(forwards), "an evaluation forward built an autograd graph"
    assert any(c[0] and c[1] for c in forwards) == (ttt_mode == "chunked")  # TTT training does use it


def test_calibration_forwards_run_without_autograd(forwards, cpu_runtime, tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", random_tokens(4096))
    hp, model = tiny_model(DATA_PATH=str(tmp_path))
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), cpu_runtime)
    tg.collect_hessians(model, loader, hp, cpu_runtime, 2)
    assert forwards and not any(c[0] for c in forwards)


class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize("ttt_mode", ["chunked", "lora"])
def test_scoring_passes_compile_in_warmup_only(monkeypatch, cpu_runtime, ttt_mode):
    """Compiled as on a GPU (dynamo with static shapes): each compiled scoring function compiles
    once, in its warmup on random tokens; no real batch of any pass (flat, sliding, chunked TTT with
    training between chunks, LoRA, the mixer) triggers a recompile."""
    torch._dynamo.reset()
    backend, made = CountingBackend(), []

    def compile_on_cpu(fn, hp, rt):
        made.append(fn)
        return torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)

    monkeypatch.setattr(tg, "compile_for_eval", compile_on_cpu)
    hp, model = tiny_model(NGRAM_MIX=True, TTT_MODE=ttt_mode)
    seen = []  # (log line, graphs compiled so far)
    out = tg.score_model(
        model, val_data(random_tokens()), hp, cpu_runtime, lambda line: seen.append((line, backend.compiles))
    )
    assert out["ngram_mix"] and len(made) >= 2 and backend.compiles >= 1
    at_warmup = 0
    for line, compiles in seen:
        if line.startswith("eval_compile_warmup_s:"):
            at_warmup = compiles
        if line.startswith("final_eval:"):  # a pass finished: nothing compiled since its warmup
            assert compiles == at_warmup, f"recompiled in the timed pass: {line}"
    assert backend.compiles == at_warmup
    torch._dynamo.reset()


def test_uncompiled_scoring_runs_no_warmup_forward(cpu_runtime, monkeypatch):
    """Without compilation (CPU, COMPILE=0) there is nothing to warm up: no forward on random tokens
    before the real batches (it used to run one per pass: `model.hidden is model.hidden` is False)."""
    hp, model = tiny_model()
    calls, lines, plain = [], [], tg.GPT.hidden
    monkeypatch.setattr(tg.GPT, "hidden", lambda self, ids: calls.append(ids.shape) or plain(self, ids))
    tg.scoring_forward(model, hp, cpu_runtime, 3, 16, lines.append)
    assert calls == [] and not [line for line in lines if line.startswith("eval_compile_warmup_s")]


def test_scored_logits_equal_the_full_forward(cpu_runtime):
    """The head applied to the scored positions only gives the full forward's logits there."""
    hp, model = tiny_model()
    model.eval()
    fwd = tg.scoring_forward(model, hp, cpu_runtime, 3, 16, lambda _: None)
    x = torch.from_numpy(random_tokens()[: 3 * 16].reshape(3, 16).astype(np.int64))
    with torch.inference_mode():
        torch.testing.assert_close(fwd(x, 2, 4), model.logits(x)[:2, -4:])


def test_lora_pass_stops_adapting_not_scoring_when_the_clock_runs_short(cpu_runtime):
    hp, model = tiny_model(TTT_MODE="lora")
    tokens = random_tokens()
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], val_data(tokens)).float())
    lines = []
    out = tg.run_lora_pass(model, stream, hp, cpu_runtime, tg.EvalClock(0.0, cpu_runtime), lines.append)
    assert out["tokens"] == stream.n and out["scored_before_update"]  # every token still scored once
    assert [line for line in lines if line.startswith("ttt_stopped:eval_clock mode:lora")]
    roomy = tg.run_lora_pass(model, stream, hp, cpu_runtime, tg.EvalClock(1e6, cpu_runtime), lines.append)
    assert len([line for line in lines if line.startswith("ttt_stopped")]) == 1
    assert roomy["val_bpb"] != out["val_bpb"]  # with time left it adapts, and that changes the score


@pytest.mark.parametrize("batch_seqs", [1, 64])  # many batches (first one left out), or one batch
def test_scoring_rate_is_positive_whatever_the_batch_count(cpu_runtime, batch_seqs):
    hp, model = tiny_model(EVAL_BATCH_SEQS=batch_seqs)
    tokens = random_tokens()
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], val_data(tokens)).float())
    p = tg.Pass("flat", 16, 16)
    out = tg.run_pass(model, stream, p, hp, cpu_runtime, tg.EvalClock(600.0, cpu_runtime), lambda _: None)
    assert 0 < out["window_tokens_per_s"] < float("inf")
    assert tg.projected_s(tg.Pass("sliding", 16, 4), stream, out["window_tokens_per_s"], hp) > 0
