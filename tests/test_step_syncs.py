"""The timed loop never waits for the device on ordinary steps: losses stay on the
device and are read only on logging steps, and the cross-rank clock is agreed every
CLOCK_SYNC_EVERY steps (every step near the end of the budget), extrapolated identically between."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_hp

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class SyncCounter:
    """Counts, per step, device syncs and host reads of tensors (item/tolist/float/int/bool)
    made by train_gpt.py itself. Library-internal reads are not counted: CPU AdamW reads its step
    counter every step, which the fused CUDA AdamW of GPU runs does not."""

    def __init__(self, monkeypatch):
        self.per_step: list[int] = [0]
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))
        monkeypatch.setattr(tg, "sync", self._counted(tg.sync))
        step = tg.train_step
        monkeypatch.setattr(tg, "train_step", lambda *a: (self.per_step.append(0), step(*a))[1])

    def _counted(self, fn):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == tg.__file__:
                self.per_step[-1] += 1
            return fn(*args, **kwargs)

        return wrapper


def run_train(tmp_path, monkeypatch, **knobs) -> tuple[tg.TrainState, list[int]]:
    hp = make_hp(MODEL_DIM=64, VAL_LOSS_EVERY=0, WARMUP_STEPS=0, **knobs)  # 64: Muon gets matrices
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 64, 5000))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), hp.train_batch_tokens // hp.microbatch_tokens, "t")
    torch.manual_seed(0)
    model = tg.GPT(hp)
    loader = tg.DistributedTokenLoader([tmp_path / "fineweb_train_000000.bin"], rt)
    optimizers = tg.build_optimizers(model, hp, rt)
    ema = tg.EMA(model, hp.ema_decay, hp.ema_window_frac)
    counter = SyncCounter(monkeypatch)
    state = tg.train(model, model, optimizers, loader, None, ema, hp, rt, tg.Logger(None))
    monkeypatch.undo()
    # per_step[i] (i >= 1): host syncs from step i's start up to the next step's start.
    return state, counter.per_step[1:]


def test_ordinary_steps_never_read_the_device(tmp_path, monkeypatch):
    state, syncs = run_train(
        tmp_path, monkeypatch, ITERATIONS=24, MAX_WALLCLOCK_SECONDS=0, CLOCK_SYNC_EVERY=8, TRAIN_LOG_EVERY=100
    )
    assert state.step == 24
    with_syncs = {step for step, n in enumerate(syncs, start=1) if n}
    # logged steps 1-5; then an agreement 8 steps after the last one; the final step is measured
    assert with_syncs == {1, 2, 3, 4, 5, 13, 21, 24}
    assert state.train_ms > 0  # the final agreement measured the clock


def test_the_last_stretch_of_a_budget_agrees_every_step(tmp_path, monkeypatch):
    state, syncs = run_train(
        tmp_path,
        monkeypatch,
        ITERATIONS=100000,
        MAX_WALLCLOCK_SECONDS=3,
        EXPORT_RESERVE_SECONDS=0,
        CLOCK_SYNC_EVERY=4,
        TRAIN_LOG_EVERY=100000,
    )
    assert state.stopped_by_clock
    assert all(syncs[-6:])  # the final stretch agrees on every step, so the stop rule is exact
    assert syncs[5:].count(0) > 0  # but earlier steps ran without a host sync


def test_extrapolated_clock_is_the_same_on_every_rank():
    """Between agreements each rank computes the clock from agreed numbers only."""
    hp = make_hp(MAX_WALLCLOCK_SECONDS=0, CLOCK_SYNC_EVERY=5)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    clocks = []
    for local_elapsed in (1.0, 7.0):  # two ranks whose local clocks differ
        clock, state = tg.TrainClock(hp, rt), tg.TrainState()
        clock.agreed_ms, clock.agreed_step, clock.step_ms = 500.0, 10, 50.0  # last agreement
        clock.t0 = -local_elapsed
        state.step = 13
        assert clock.tick(state, force=False) is False
        clocks.append(state.train_ms)
    assert clocks == [650.0, 650.0]


def run_with_fake_clock(
    tmp_path, monkeypatch, step_ms: list[float], **knobs
) -> tuple[tg.TrainState, list[str]]:
    """train() where the clock advances exactly step_ms[i] during step i (deterministic timing)."""
    now = [0.0]
    monkeypatch.setattr(tg.time, "perf_counter", lambda: now[0])
    step = tg.train_step

    def timed_step(*args):
        now[0] += step_ms[min(timed_step.calls, len(step_ms) - 1)] / 1000
        timed_step.calls += 1
        return step(*args)

    timed_step.calls = 0
    monkeypatch.setattr(tg, "train_step", timed_step)
    lines: list[str] = []
    logger = tg.Logger(None)
    logger.enabled, logger.__class__ = (
        True,
        type("Capture", (tg.Logger,), {"__call__": lambda s, x: lines.append(x)}),
    )
    hp = make_hp(MODEL_DIM=64, VAL_LOSS_EVERY=0, WARMUP_STEPS=0, EXPORT_RESERVE_SECONDS=0, **knobs)
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 64, 5000))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), hp.train_batch_tokens // hp.microbatch_tokens, "t")
    model = tg.GPT(hp)
    loader = tg.DistributedTokenLoader([tmp_path / "fineweb_train_000000.bin"], rt)
    ema = tg.EMA(model, hp.ema_decay, hp.ema_window_frac)
    state = tg.train(model, model, tg.build_optimizers(model, hp, rt), loader, None, ema, hp, rt, logger)
    return state, lines


def test_the_clock_stops_before_a_step_would_overrun_with_warmdown_done(tmp_path, monkeypatch):
    """125 ms steps (exact in binary), 4 s budget: 32 steps fit exactly; the last one starts at
    96.9% of the budget."""
    state, lines = run_with_fake_clock(
        tmp_path,
        monkeypatch,
        [125.0],
        ITERATIONS=100000,
        MAX_WALLCLOCK_SECONDS=4,
        CLOCK_SYNC_EVERY=8,
        TRAIN_LOG_EVERY=4,
    )
    assert state.stopped_by_clock and state.step == 32
    assert state.train_ms == 4000.0
    last = [line for line in lines if line.startswith("step:32/")]
    assert last and "lr_scale:0.043403" in last[0]  # (1 - 0.96875) / 0.72: the warmdown is done
    assert any(line.startswith("stopping_early:wallclock_cap") for line in lines)


def test_a_slower_pace_between_agreements_still_never_overruns(tmp_path, monkeypatch):
    """Steps slow 2.5x right after the agreement at step 25 (as when depth recurrence switches
    on). Extrapolating at the old pace for a whole window would end step 35 at 3125 ms, past the
    3100 ms budget; the final stretch (3 windows of margin) starts at step 25 instead, so every
    later step is agreed and the exact stop rule holds."""
    pace = [62.5] * 25 + [156.25]
    state, _ = run_with_fake_clock(
        tmp_path, monkeypatch, pace, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3.1, CLOCK_SYNC_EVERY=10
    )
    assert state.stopped_by_clock and state.train_ms <= 3100.0
    assert state.train_ms == 2968.75 and state.step == 34  # no step that fitted was left out
