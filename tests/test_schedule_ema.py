"""The records' fixed-decay EMA (EMA_FIXED_DECAY) and the progressive training sequence length
(TRAIN_SEQ_SCHEDULE, PR #2014)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import TINY_ENV, make_hp

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def weight_sequence(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, generator=gen) for _ in range(n + 1)]


def run_ema(weights: list[torch.Tensor], decay: float, fixed: bool) -> tg.EMA:
    model = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(weights[0])
    ema = tg.EMA(model, decay, window_frac=0.05, fixed=fixed)
    for w in weights[1:]:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update(model, expected_steps=100)
    return ema


def test_fixed_decay_ema_is_the_records_closed_form():
    """R0323/R0409/R0427: E_0 = W_0, E_n = d E_(n-1) + (1-d) W_n from step 1 on, so
    E_n = d^n W_0 + (1-d) sum_k d^(n-k) W_k (float64 reference; fp32 rounding over 50 steps)."""
    d, n = 0.9, 50
    weights = weight_sequence(n)
    ema = run_ema(weights, d, fixed=True)
    w64 = [w.double() for w in weights]
    closed = d**n * w64[0] + (1 - d) * sum(d ** (n - k) * w64[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.shadow["weight"].double(), closed, rtol=0, atol=1e-6)
    assert ema.decay_at(expected_steps=1) == d  # no running mean, no window: d from the first step


def test_fixed_decay_ema_uses_the_records_arithmetic():
    """Bit for bit the records' loop: ema.mul_(d).add_(w.float(), alpha=1-d) after every step."""
    d = 0.9965
    weights = weight_sequence(20)
    ema = run_ema(weights, d, fixed=True)
    ref = weights[0].float().clone()
    for w in weights[1:]:
        ref.mul_(d).add_(w.float(), alpha=1.0 - d)
    assert torch.equal(ema.shadow["weight"], ref)


def test_ema_without_the_knob_is_unchanged():
    """Off (the March stack) is the running-mean EMA: a plain mean of the weights until n/(n+1)
    reaches the decay. The defaults run the records' fixed decay."""
    weights = weight_sequence(3)
    ema = run_ema(weights, 0.997, fixed=False)
    torch.testing.assert_close(ema.shadow["weight"], torch.stack(weights[1:]).mean(0))
    assert tg.Hyperparameters({"RUN_PRESET": "march"}).ema_fixed_decay is False
    assert tg.Hyperparameters({}).ema_fixed_decay is True


@pytest.mark.parametrize("preset", ["record_0323", "record_0409", "record_0427"])
def test_record_presets_run_the_fixed_decay_ema(preset):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    assert hp.ema_fixed_decay
    assert "ema_fixed_decay" not in tg.PRESET_MISSING.get(preset, ())


# ---------------------------------------------------------------- progressive sequence length

SCHEDULE = {"TRAIN_SEQ_SCHEDULE": "8@0.2,16@0.6,32@1.0", "TRAIN_SEQ_LEN": 32}
# ITERATIONS=10 without a clock: the position of step s is s/10, so rows of 8 tokens on steps
# 0-2, 16 on steps 3-6, 32 on steps 7-9.
EXPECTED_LENGTHS = [8, 8, 8, 16, 16, 16, 16, 32, 32, 32]


def test_schedule_parses_as_the_pr_writes_it():
    pr_2014 = "1024@0.100,2048@0.700,3072@1.000"
    hp = make_hp(
        TRAIN_SEQ_SCHEDULE=pr_2014, TRAIN_SEQ_LEN=3072, TRAIN_BATCH_TOKENS=786432, MICROBATCH_TOKENS=98304
    )
    assert hp.seq_schedule == ((0.1, 1024), (0.7, 2048), (1.0, 3072))
    assert hp.seq_schedule_lengths == (1024, 2048, 3072)
    positions = (0.0, 0.1, 0.1001, 0.7, 0.71, 1.0)
    assert [tg.seq_len_at(p, hp) for p in positions] == [1024, 1024, 2048, 2048, 3072, 3072]
    short = make_hp(TRAIN_SEQ_SCHEDULE="8@0.5,16@0.6", TRAIN_SEQ_LEN=16)
    assert tg.seq_len_at(0.9, short) == 16  # past the last stage, its length stays
    off = make_hp()
    assert off.seq_schedule == () and off.seq_schedule_lengths == (16,) and tg.seq_len_at(0.5, off) == 16


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRAIN_SEQ_SCHEDULE": "8@0.5,16"}, "TRAIN_SEQ_SCHEDULE stage '16'"),
        ({"TRAIN_SEQ_SCHEDULE": "8@0,16@1"}, "TRAIN_SEQ_SCHEDULE stage '8@0'"),
        ({"TRAIN_SEQ_SCHEDULE": "4@0.5,8@1"}, "longest length must be TRAIN_SEQ_LEN"),  # TRAIN_SEQ_LEN=16
        ({"TRAIN_SEQ_SCHEDULE": "12@0.5,16@1"}, "must divide MICROBATCH_TOKENS"),  # 32 tokens
        ({"TRAIN_SEQ_SCHEDULE_MODE": "time"}, "TRAIN_SEQ_SCHEDULE_MODE must be wallclock or step"),
    ],
)
def test_bad_schedules_stop_before_any_work(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters({**TINY_ENV, **env})


class RecordingLoader(tg.DistributedTokenLoader):
    """The training loader, keeping every micro-batch it hands out."""

    def __init__(self, files, rt):
        super().__init__(files, rt)
        self.batches: list[torch.Tensor] = []

    def next_batch(self, micro_tokens: int, seq_len: int):
        x, y = super().next_batch(micro_tokens, seq_len)
        self.batches.append(x)
        return x, y


def write_train_shard(tmp_path, high: int = 64) -> list:
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, np.random.default_rng(0).integers(0, high, 5000))
    return [path]


def train_run(tmp_path, compiled=None, **knobs):
    """tg.train() on a tiny model (rows from a real shard) after prime_compile, as run() does."""
    hp = make_hp(
        MODEL_DIM=64, TRAIN_BATCH_TOKENS=64, MICROBATCH_TOKENS=32, ITERATIONS=10, MAX_WALLCLOCK_SECONDS=0,
        VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=100, **knobs,
    )  # fmt: skip
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), hp.train_batch_tokens // hp.microbatch_tokens, "t")
    torch.manual_seed(0)
    model = tg.GPT(hp)
    loader = RecordingLoader(write_train_shard(tmp_path), rt)
    optimizers = tg.build_optimizers(model, hp, rt)
    lines: list[str] = []
    train_model = model if compiled is None else compiled(model)
    tg.prime_compile(train_model, model, loader, optimizers, hp, rt, lines.append)
    warmup_batches = len(loader.batches)
    ema = tg.EMA(model, hp.ema_decay, hp.ema_window_frac)
    state = tg.train(model, train_model, optimizers, loader, None, ema, hp, rt, lines.append)
    return state, loader.batches[warmup_batches:], lines, model


def test_loader_rows_follow_the_schedule_on_the_same_token_stream(tmp_path):
    state, batches, lines, _ = train_run(tmp_path, WARMUP_STEPS=0, **SCHEDULE)
    _, plain, _, _ = train_run(tmp_path, WARMUP_STEPS=0, TRAIN_SEQ_LEN=32)
    assert state.step == 10
    # two micro-batches of 32 tokens per step: rows of the scheduled length, the tokens unchanged
    assert [x.shape for x in batches] == [(32 // n, n) for n in EXPECTED_LENGTHS for _ in range(2)]
    assert all(torch.equal(x.flatten(), p.flatten()) for x, p in zip(batches, plain, strict=True))
    changes = [line for line in lines if line.startswith("train_seq_len:")]
    assert changes == [
        "train_seq_len:8 progress:0.000000 step:0",
        "train_seq_len:16 progress:0.300000 step:3",
        "train_seq_len:32 progress:0.700000 step:7",
    ]


def test_schedule_off_trains_exactly_as_before(tmp_path, monkeypatch):
    """No TRAIN_SEQ_SCHEDULE: the same batches, LRs and weights as the loop without the feature
    (set_seq_len stubbed out to TRAIN_SEQ_LEN and factor 1)."""
    _, batches, lines, model = train_run(tmp_path, WARMUP_STEPS=1, TRAIN_SEQ_LEN=32)

    def fixed(state, frac, hp, log):
        state.seq_len = hp.train_seq_len
        return 1.0

    monkeypatch.setattr(tg, "set_seq_len", fixed)
    _, before, _, reference = train_run(tmp_path, WARMUP_STEPS=1, TRAIN_SEQ_LEN=32)
    assert not [line for line in lines if line.startswith("train_seq_len:")]
    assert all(torch.equal(a, b) for a, b in zip(batches, before, strict=True))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_length_change_rewarms_the_learning_rate():
    """SEQ_CHANGE_WARMUP_STEPS=N: (k+1)/N of the LR on the k-th step after each change, never
    for the first length; the schedule's multiplier (which starts QAT) is not scaled."""
    hp = make_hp(MODEL_DIM=64, SEQ_CHANGE_WARMUP_STEPS=2, ITERATIONS=10, MAX_WALLCLOCK_SECONDS=0, **SCHEDULE)
    state, factors = tg.TrainState(), []
    for step in range(10):
        state.step = step
        factors.append(tg.set_seq_len(state, step / 10, hp, lambda line: None))
        assert state.seq_len == EXPECTED_LENGTHS[step]
    assert factors == [1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1]
    model = tg.GPT(hp)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    optimizers = tg.build_optimizers(model, hp, rt)
    mult = tg.apply_schedule(optimizers, 0.1, hp, 1, rewarm=0.5)
    assert mult == tg.lr_multiplier(0.1, hp)
    assert all(g["lr"] == g["base_lr"] * mult * 0.5 for opt in optimizers for g in opt.param_groups)


def test_schedule_reads_the_run_fraction_or_the_step_count():
    """wallclock (default): the schedule position every rank agrees on (time- or step-based, the
    further); step: step/ITERATIONS whatever the clock says."""
    for mode, expected in (("wallclock", 32), ("step", 8)):
        hp = make_hp(TRAIN_SEQ_SCHEDULE_MODE=mode, ITERATIONS=10, **SCHEDULE)
        state = tg.TrainState(step=1)
        tg.set_seq_len(state, 0.9, hp, lambda line: None)  # 90% of the time budget spent at step 1
        assert state.seq_len == expected


class CountingBackend:
    """Counts the graphs dynamo hands over (each is a (re)compile; recompiles are dynamo's guards,
    whatever the backend) and runs them eagerly: the cheapest backend on a shared CPU."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_every_scheduled_length_compiles_in_warmup_and_never_again(tmp_path, monkeypatch):
    """prime_compile compiles each length's graph before the clock; the timed loop then goes
    through 8 -> 16 -> 32 without one compile."""
    torch._dynamo.reset()
    backend = CountingBackend()
    warm = []
    train = tg.train
    monkeypatch.setattr(tg, "train", lambda *a: (warm.append(backend.compiles), train(*a))[1])
    state, batches, _, _ = train_run(
        tmp_path,
        compiled=lambda model: torch.compile(model, backend=backend, fullgraph=True, dynamic=False),
        WARMUP_STEPS=1,
        NUM_LAYERS=1,
        **SCHEDULE,
    )
    assert state.step == 10 and [x.shape[1] for x in batches[::2]] == EXPECTED_LENGTHS
    assert warm == [3]  # one graph per scheduled length, all before the clock
    assert backend.compiles == 3, "recompiled in the timed loop"


def test_warmup_reads_only_training_tokens(tmp_path):
    """prime_compile's batches are cut from the training stream (ids < 32 here; the val shard's
    would be >= 32) at every scheduled length, and the stream is rewound afterwards."""
    hp = make_hp(MODEL_DIM=64, WARMUP_STEPS=2, TRAIN_BATCH_TOKENS=64, MICROBATCH_TOKENS=32, **SCHEDULE)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 2, "t")
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.random.default_rng(1).integers(32, 64, 5000))
    train = tmp_path / "train"
    train.mkdir()
    loader = RecordingLoader(write_train_shard(train, high=32), rt)
    model = tg.GPT(hp)
    tg.prime_compile(model, model, loader, tg.build_optimizers(model, hp, rt), hp, rt, lambda line: None)
    assert {x.shape[1] for x in loader.batches} == {8, 16, 32}
    assert all(int(x.max()) < 32 for x in loader.batches)
    assert loader.stream.state_dict() == {"file_idx": 0, "pos": 0}


def test_dynamo_keeps_every_scheduled_graph():
    """More graphs than dynamo's default 8 per function: the limit is raised only with a schedule."""
    saved = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        tg.allow_schedule_graphs(make_hp())
        assert torch._dynamo.config.recompile_limit == 8
        tg.allow_schedule_graphs(make_hp(**SCHEDULE))
        assert torch._dynamo.config.recompile_limit == 64
    finally:
        torch._dynamo.config.recompile_limit = saved
