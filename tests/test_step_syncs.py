"""The timed loop never waits for the device on ordinary steps (issue 10): losses stay on the
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
