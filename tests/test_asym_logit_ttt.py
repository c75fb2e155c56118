"""ASYM_LOGIT_RESCALE under test-time training (PR #1923): the two logit caps are frozen in training
and trained by the whole-model TTT steps (TTT_MODE=chunked and the phased global phases), only on
tokens already scored; per-document LoRA steps leave them alone; with the knob off nothing changes.
"""

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_
from test_eval import EVAL_KNOBS, V, random_tokens, val_data
from test_phased_ttt import PHASED

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Caps well inside the logits' range (a random tiny model's logits have std ~1): at LOGIT_SOFTCAP=30
# tanh is nearly linear there and a step moves a cap by less than one float32 ulp of 30.
CAPS = (4.0, 3.0)
SILENT = lambda _: None  # noqa: E731


def build(tokens: np.ndarray, **knobs):
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    if model.softcap_pos is not None:  # set directly: a test may stub logit_caps out
        with torch.no_grad():
            model.softcap_pos.fill_(CAPS[0])
            model.softcap_neg.fill_(CAPS[1])
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], val_data(tokens)).float())
    return hp, rt, model, stream


def chunked(tokens: np.ndarray, **knobs) -> dict:
    hp, rt, model, stream = build(tokens, **knobs)
    p = tg.Pass("chunked", 16, hp.eval_stride, ttt=True)
    return tg.run_pass(model, stream, p, hp, rt, tg.EvalClock(600.0, rt), SILENT)


def caps(model: tg.GPT) -> tuple[float, ...]:
    return tuple(c.item() for c in model.logit_caps())


def spy_train_chunk(monkeypatch) -> list[dict]:
    """Each ChunkTTT.train_chunk call: the caps before and after it and how far the ledger had
    scored when it started."""
    real, calls = tg.ChunkTTT.train_chunk, []

    def wrapped(self, tokens, c, lo, hi, ledger):
        call = dict(hi=hi, scored_upto=ledger.scored_upto, before=caps(self.model))
        real(self, tokens, c, lo, hi, ledger)
        trainable = [p.requires_grad for p in self.model.logit_caps()]
        calls.append(dict(call, after=caps(self.model), trainable=trainable))

    monkeypatch.setattr(tg.ChunkTTT, "train_chunk", wrapped)
    return calls


def test_chunked_ttt_trains_the_caps_only_after_scoring_each_chunk(monkeypatch):
    calls = spy_train_chunk(monkeypatch)
    r = chunked(random_tokens(), ASYM_LOGIT_RESCALE=True)
    assert r["scored_before_update"] is True and len(calls) >= 2
    assert calls[0]["before"] == CAPS  # the first chunk was scored with the caps as they started
    for call in calls:
        assert call["scored_upto"] >= call["hi"]  # the chunk trained on was scored first
        assert call["trainable"] == [True, True]
        assert all(a != b for a, b in zip(call["after"], call["before"], strict=True))  # both caps moved
    for done, following in zip(calls, calls[1:], strict=False):
        assert following["before"] == done["after"]  # scoring the next chunk left them as trained


def test_trained_caps_change_only_the_scores_after_the_first_chunk(monkeypatch):
    tokens = random_tokens()
    with_caps = chunked(tokens, ASYM_LOGIT_RESCALE=True)["nll"]
    monkeypatch.setattr(tg.GPT, "logit_caps", lambda self: [])  # the caps frozen during TTT
    frozen = chunked(tokens, ASYM_LOGIT_RESCALE=True)["nll"]
    plan = tg.window_plan(len(tokens) - 1, 16, EVAL_KNOBS["EVAL_STRIDE"])
    first_hi = tg.chunk_bounds(plan, EVAL_KNOBS["TTT_CHUNK_TOKENS"])[0][3]
    torch.testing.assert_close(with_caps[:first_hi], frozen[:first_hi], rtol=0, atol=0)
    assert not torch.allclose(with_caps[first_hi:], frozen[first_hi:])


def ttt_param_names(**knobs) -> set[str]:
    hp, rt, model, _ = build(random_tokens(), TTT_FREEZE_BLOCKS=1, **knobs)
    ttt = tg.ChunkTTT(model, hp, rt, 3, 16)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in ttt.params}


def test_knob_off_leaves_the_ttt_parameters_as_they_were():
    """Off: no caps and ChunkTTT trains what it always did (every trainable parameter outside the
    frozen blocks); on: those plus exactly the two caps."""
    off, on = ttt_param_names(), ttt_param_names(ASYM_LOGIT_RESCALE=True)
    hp, _, model, _ = build(random_tokens())
    assert model.logit_caps() == []
    assert off == {n for n, p in model.named_parameters() if not n.startswith("blocks.0.")}
    assert on - off == {"softcap_pos", "softcap_neg"} and off <= on


def test_knob_off_chunked_scores_are_bit_identical_to_a_run_that_never_looks_at_caps(monkeypatch):
    tokens = random_tokens()
    base = chunked(tokens)["nll"]
    monkeypatch.setattr(tg.GPT, "logit_caps", lambda self: [])
    torch.testing.assert_close(chunked(tokens)["nll"], base, rtol=0, atol=0)


def test_callers_model_keeps_its_caps_frozen_and_unchanged():
    hp, rt, model, stream = build(random_tokens(), ASYM_LOGIT_RESCALE=True)
    tg.run_pass(model, stream, tg.Pass("chunked", 16, 4, ttt=True), hp, rt, tg.EvalClock(600.0, rt), SILENT)
    assert caps(model) == CAPS and [c.requires_grad for c in model.logit_caps()] == [False, False]


def test_phased_global_phases_train_the_caps_and_lora_steps_do_not(monkeypatch):
    moves = []
    real_phase, real_batch = tg.global_phase, tg.lora_batch

    def phase(model, *args):
        before = caps(model)
        out = real_phase(model, *args)
        moves.append(("phase", before, caps(model)))
        return out

    def batch(model, lora, *args):
        before = caps(lora.model)
        out = real_batch(model, lora, *args)
        moves.append(("lora", before, caps(lora.model)))
        return out

    monkeypatch.setattr(tg, "global_phase", phase)
    monkeypatch.setattr(tg, "lora_batch", batch)
    hp, rt, model, stream = build(random_tokens(), ASYM_LOGIT_RESCALE=True, **PHASED)
    r = tg.run_lora_pass(model, stream, hp, rt, tg.EvalClock(600.0, rt), SILENT, phased=True)
    assert r["scored_before_update"] is True and r["ttt_phases_run"] == 2
    assert [kind for kind, *_ in moves] == ["lora", "phase", "lora", "phase", "lora"]
    assert moves[0][1] == CAPS
    for kind, before, after in moves:
        if kind == "phase":
            assert all(a != b for a, b in zip(after, before, strict=True))
        else:
            assert after == before


def test_lora_pass_leaves_the_caps_alone(monkeypatch):
    seen = []
    real = tg.lora_batch

    def batch(model, lora, *args):
        out = real(model, lora, *args)
        seen.append(caps(lora.model))
        return out

    monkeypatch.setattr(tg, "lora_batch", batch)
    hp, rt, model, stream = build(random_tokens(), ASYM_LOGIT_RESCALE=True, TTT_MODE="lora")
    tg.run_lora_pass(model, stream, hp, rt, tg.EvalClock(600.0, rt), SILENT)
    assert seen and set(seen) == {CAPS}
