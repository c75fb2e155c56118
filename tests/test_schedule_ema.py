"""The records' fixed-decay EMA (EMA_FIXED_DECAY) and the progressive training sequence length
(TRAIN_SEQ_SCHEDULE, PR #2014)."""

from __future__ import annotations

import pytest
import torch

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


def test_default_ema_is_unchanged_by_the_knob():
    """Off (the default) is today's EMA: a plain mean of the weights until n/(n+1) reaches the decay."""
    weights = weight_sequence(3)
    ema = run_ema(weights, 0.997, fixed=False)
    torch.testing.assert_close(ema.shadow["weight"], torch.stack(weights[1:]).mean(0))
    assert tg.Hyperparameters({}).ema_fixed_decay is False


@pytest.mark.parametrize("preset", ["record_0323", "record_0409", "record_0427"])
def test_record_presets_run_the_fixed_decay_ema(preset):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    assert hp.ema_fixed_decay
    assert "ema_fixed_decay" not in tg.PRESET_MISSING.get(preset, ())
