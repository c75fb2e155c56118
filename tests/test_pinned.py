"""Properties a plausible one-line change would break while every other test still passed: the fit
ladder's order, exact artifact settings, the export dry run's data position, the eval budget's TTT
cost, the momentum schedule, gradient accumulation, GPTQ damping and its fp16 scales."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_
from test_artifact import heavy_tailed_quantizer

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ---------------------------------------------------------------- the fit ladder's order

BLOCK_LOUDNESS = {0: 1.0, 1: 4.0**5, 2: 4.0**-5}  # Hessian scale per block: 1 loud, 2 nearly silent


def loudness_quantizer(**knobs) -> tg.Quantizer:
    """3 blocks of heavy-tailed (Student-t) weights, like trained ones, with the same Hessian shape
    on every block scaled by BLOCK_LOUDNESS. A power-of-4 scale multiplies every output error
    exactly and changes no clip choice, so block 2 costs the least error per byte, block 1 the most."""
    return heavy_tailed_quantizer(BLOCK_LOUDNESS, **knobs)


def fit_with_overshoot(overshoot: int, **knobs) -> tuple[tg.Quantizer, dict, list[str]]:
    """A loudness_quantizer (its orders not yet changed by a move), and the fit of another at a cap
    `overshoot` bytes under their unconstrained size."""
    free = loudness_quantizer(**knobs)
    free_blob, _ = tg.fit_artifact(free, 1000, [].append, 16_000_000)
    lines: list[str] = []
    cap = len(free_blob) + 1000 - overshoot
    _, info = tg.fit_artifact(loudness_quantizer(**knobs), 1000, lines.append, cap)
    return free, info, lines


def step_layers(lines: list[str], kind: str) -> list[int]:
    fields = [dict(f.split(":", 1) for f in line.split()) for line in lines]
    return [int(f["layer"]) for f in fields if f.get("fit_step") == kind]


def test_the_clip_search_is_given_up_least_error_per_byte_first():
    qz, info, lines = fit_with_overshoot(300)
    assert qz.max_clip_order() == [2, 0, 1]
    assert step_layers(lines, "max_clip")[0] == 2 and info["fit_max_clip_layers"][0] == 2


def test_blocks_move_to_int5_least_error_first():
    qz, info, lines = fit_with_overshoot(300, GPTQ_CLIP_FRACS="1.0")  # no clip search: int5 first
    assert qz.int5_order() == [2, 0, 1] and [b for _, b in tg.ladder_moves(qz)] == [2, 0, 1]
    assert step_layers(lines, "int5")[0] == 2 and info["fit_int5_layers"][0] == 2


def pm1_entries(qstate: dict, hessians: dict) -> list[tuple[float, str, int]]:
    """(cost s_r^2 * H_jj, tensor, flat index) of every block-matrix entry at +-1."""
    out = []
    for name, t in qstate.items():
        if not isinstance(t, tg.QuantTensor) or tg.block_index(name) is None:
            continue
        h = hessians[name].diagonal() if name in hessians else torch.ones(t.q.size(1))
        for idx in torch.nonzero(t.q.flatten().abs() == 1).squeeze(1).tolist():
            r, c = divmod(idx, t.q.size(1))
            out.append((float(t.scale.float()[r] ** 2 * h[c]), name, idx))
    return out


def test_pruning_zeroes_the_cheapest_plus_minus_one_weights_first():
    gen = torch.Generator().manual_seed(0)
    qstate, hessians = {}, {}
    for layer in range(3):
        name = f"blocks.{layer}.mlp.fc.weight"
        q = torch.randint(-3, 4, (8, 12), generator=gen).to(torch.int8)
        qstate[name] = tg.QuantTensor(q, (torch.rand(8, generator=gen) + 0.05).half(), 6)
        if layer < 2:  # block 2 has no Hessian: unit input weights
            hessians[name] = torch.diag(torch.rand(12, generator=gen) * 3)
    emb = tg.QuantTensor(torch.ones(4, 12, dtype=torch.int8), torch.full((4,), 1e-3).half(), 8)
    qstate["tok_emb.weight"] = emb  # not a block matrix: never pruned, however cheap
    entries = pm1_entries(qstate, hessians)
    order = tg.prune_order(qstate, hessians)
    assert len(order[1]) == len(entries)
    for count in (1, len(entries) // 3, len(entries) - 1):
        pruned = tg.zero_cheapest(qstate, order, count)
        zeroed = [int(pruned[name].q.view(-1)[idx]) == 0 for _, name, idx in entries]
        costs = [(cost, gone) for (cost, _, _), gone in zip(entries, zeroed, strict=True)]
        assert sum(zeroed) == count
        assert max(c for c, gone in costs if gone) <= min(c for c, gone in costs if not gone), count
        for name, t in qstate.items():  # nothing else changed
            keep = t.q.abs() != 1 if tg.block_index(name) is not None else torch.ones_like(t.q, dtype=bool)
            assert torch.equal(pruned[name].q[keep], t.q[keep]) and pruned[name].scale is t.scale


# ---------------------------------------------------------------- EVAL_ONLY: exact model settings


def artifact_with_settings(path, settings: dict) -> None:
    hp = make_hp()
    torch.manual_seed(0)
    qz = tg.Quantizer(tg.GPT(hp), {}, hp)
    meta = dict(qz.meta, settings=settings)
    body = tg.compress(tg.build_payload(qz.qstate(), meta, hp.quant_packing), "lzma")
    tg.write_atomic(path, tg.encode_artifact(body, "lzma"))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_eval_only_refuses_settings_that_are_not_exactly_the_scripts(change, tmp_path, cpu_runtime):
    """A subset (an artifact from an older script, before a knob existed) would silently take the
    new knob's default, a model other than the one trained; a superset names knobs this script lacks."""
    hp = make_hp()
    settings = {n: hp.knobs[n] for n in hp.model_knob_names}
    if change == "missing":
        del settings["LEAKY_RELU_SLOPE"]
        message = r"only this script has: \['LEAKY_RELU_SLOPE'\]"
    else:
        settings["FANCY_NEW_KNOB"] = 1
        message = r"only the artifact has: \['FANCY_NEW_KNOB'\]"
    path = tmp_path / "old.ptz"
    artifact_with_settings(path, settings)
    eval_hp = make_hp(EVAL_ONLY=True, ARTIFACT_PATH=str(path), DATA_PATH=str(tmp_path / "no_data"))
    with pytest.raises(tg.ConfigError, match=r"another version of train_gpt.py.*" + message):
        tg.eval_only(eval_hp, cpu_runtime, [].append, Path(tg.__file__))
    with pytest.raises(tg.ConfigError, match=message):
        make_hp().with_model_settings(settings)


# ---------------------------------------------------------------- the export dry run keeps the data order


def test_the_export_dry_run_leaves_the_training_data_order_unchanged(tmp_path, cpu_runtime):
    """EXPORT_RESERVE_SECONDS=-1 calibrates on training batches before training: the run's batches
    must then be those of a run without the dry run, shard boundary included."""
    rng = np.random.default_rng(0)
    for i in range(2):  # calibration (4 x 33 tokens) runs past the first shard's 100
        tg.write_shard(tmp_path / f"fineweb_train_00000{i}.bin", rng.integers(0, 64, 100 + 50 * i))
    files = tg.find_shards(str(tmp_path), "train")
    hp = make_hp(
        MAX_WALLCLOCK_SECONDS=100, EXPORT_RESERVE_SECONDS=-1, GPTQ_CALIB_TOKENS=128, DATA_PATH=str(tmp_path)
    )
    assert tg.calibration_batches(hp, cpu_runtime) == 4
    torch.manual_seed(0)
    model = tg.GPT(hp)
    probed, plain = (
        tg.DistributedTokenLoader(files, cpu_runtime),
        tg.DistributedTokenLoader(files, cpu_runtime),
    )
    first = probed.next_batch(hp.microbatch_tokens, hp.train_seq_len)  # mid-run position, not the start
    assert torch.equal(first[0], plain.next_batch(hp.microbatch_tokens, hp.train_seq_len)[0])
    lines: list[str] = []
    reserve, ratio = tg.measure_export_reserve(model, probed, hp, cpu_runtime, lines.append, 1000)
    assert reserve > 0 and ratio > 0 and lines[0].startswith("export_probe_s:")
    for _ in range(6):  # into the second shard and around
        x, y = probed.next_batch(hp.microbatch_tokens, hp.train_seq_len)
        x0, y0 = plain.next_batch(hp.microbatch_tokens, hp.train_seq_len)
        assert torch.equal(x, x0) and torch.equal(y, y0)


# ---------------------------------------------------------------- the eval budget counts TTT training


def test_the_eval_budget_projection_counts_ttt_training(cpu_runtime, monkeypatch):
    """Score-first TTT trains on every chunk it scored, TTT_EPOCHS times: a projection of its
    scoring alone would start a pass the budget cannot hold (and stop its adapting part-way)."""
    n, rate = 16 * 13, 1000.0
    tokens = torch.arange(n + 1) % 64
    stream = tg.EvalStream(tokens, torch.ones(n))
    scoring = tg.Pass("sliding", 16, 8)
    ttt = tg.Pass("chunked", 16, 8, ttt=True)
    score_s = tg.projected_s(scoring, stream, rate, make_hp())
    assert score_s > 0 and tg.projected_s(ttt, stream, rate, make_hp(TTT_EPOCHS=0)) == score_s
    ttt_s = {e: tg.projected_s(ttt, stream, rate, make_hp(TTT_EPOCHS=e)) for e in (1, 3)}
    assert ttt_s[1] >= score_s + n / rate  # a trained token costs at least a scored one, per epoch
    assert ttt_s[3] - score_s == pytest.approx(3 * (ttt_s[1] - score_s))
    monkeypatch.setattr(tg.EvalClock, "elapsed", lambda self: 0.0)  # no wall clock in the decision
    clock = tg.EvalClock((score_s + ttt_s[3]) / 2, cpu_runtime)  # room to score, not to train
    lines: list[str] = []
    last = {"window_tokens_per_s": rate}
    assert tg.fits_or_log(scoring, stream, last, clock, make_hp(TTT_EPOCHS=3), lines.append)
    assert not tg.fits_or_log(ttt, stream, last, clock, make_hp(TTT_EPOCHS=3), lines.append)
    assert lines == [
        tg.kv(
            eval_fallback="chunked",
            reason="over_budget",
            projected_s=round(ttt_s[3], 1),
            budget_s=clock.budget_s,
        )
    ]


# ---------------------------------------------------------------- optimizer schedule and accumulation


def test_muon_momentum_follows_the_schedule_position_not_the_lr(cpu_runtime):
    """Momentum warms up over the first MUON_MOMENTUM_WARMUP_FRAC of the run whatever the LR does:
    at the start the LR multiplier is 1 (no LR warmup) yet momentum is at its start value, and late in
    warmdown the LR is near 0 yet momentum is at its final value."""
    hp = make_hp(MODEL_DIM=64, MUON_MOMENTUM_WARMUP_FRAC=0.2, LR_WARMUP_FRAC=0.0, WARMDOWN_FRAC=0.72)
    optimizers = tg.build_optimizers(tg.GPT(hp), hp, cpu_runtime)
    muon = next(opt for opt in optimizers if isinstance(opt, tg.Muon))
    assert muon.param_groups[0]["params"]
    expected = {0.0: 0.92, 0.1: 0.955, 0.2: 0.99, 0.5: 0.99, 0.95: 0.99}
    for frac, momentum in expected.items():
        mult = tg.apply_schedule(optimizers, frac, hp)
        assert mult == tg.lr_multiplier(frac, hp)
        assert muon.param_groups[0]["momentum"] == pytest.approx(momentum), frac


class GradRecorder:
    """Stands in for the optimizers: keeps the gradients train_step hands them (after clipping)."""

    param_groups: list = []

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def accumulation_setup(tmp_path, clip: float):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 64, 400))
    files = tg.find_shards(str(tmp_path), "train")
    hp = make_hp(MICROBATCH_TOKENS=32, TRAIN_BATCH_TOKENS=64, GRAD_CLIP_NORM=clip)
    torch.manual_seed(0)
    return hp, randomize_(tg.GPT(hp), std=0.1), files


def reference_step(model, files, hp, micro_steps: int) -> tuple[dict[str, torch.Tensor], float]:
    """The mean gradient and loss over `micro_steps` micro-batches, each computed on its own."""
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), micro_steps, "t")
    loader, grads, losses = tg.DistributedTokenLoader(files, rt), {}, []
    params = dict(model.named_parameters())
    for _ in range(micro_steps):
        x, y = loader.next_batch(hp.microbatch_tokens, hp.train_seq_len)
        loss = model(x, y)
        losses.append(float(loss.detach()))
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            grads[name] = grads.get(name, 0) + g / micro_steps
    return grads, sum(losses) / micro_steps


@pytest.mark.parametrize("micro_steps", [2, 4])
def test_accumulated_gradient_is_the_mean_over_micro_steps(micro_steps, tmp_path):
    """The optimizers must get the mean of the micro-batch gradients, not their sum: Muon's
    Newton-Schulz and Adam both undo a constant scale, so final weights barely show it, but the
    global-norm clip does not. With GRAD_CLIP_NORM between the true norm and micro_steps times it,
    the right gradient passes unclipped and a summed one would be clipped."""
    hp, model, files = accumulation_setup(tmp_path, clip=0.0)
    want, want_loss = reference_step(model, files, hp, micro_steps)
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()])))
    for clip in (0.0, 0.5 * (1 + micro_steps) * norm):
        hp = make_hp(MICROBATCH_TOKENS=32, TRAIN_BATCH_TOKENS=32 * micro_steps, GRAD_CLIP_NORM=clip)
        rt = tg.Runtime(0, 1, 0, torch.device("cpu"), micro_steps, "t")
        recorder = GradRecorder(model)
        loss = tg.train_step(model, model, tg.DistributedTokenLoader(files, rt), [recorder], hp, rt)
        assert float(loss) == pytest.approx(want_loss, rel=1e-5)
        assert recorder.grads.keys() == want.keys()
        for name, g in recorder.grads.items():
            torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-7, msg=f"{name} clip={clip}")
    clip = 0.5 * norm  # and a clip below the true norm scales the mean gradient to exactly the clip
    hp = make_hp(MICROBATCH_TOKENS=32, TRAIN_BATCH_TOKENS=32 * micro_steps, GRAD_CLIP_NORM=clip)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), micro_steps, "t")
    recorder = GradRecorder(model)
    tg.train_step(model, model, tg.DistributedTokenLoader(files, rt), [recorder], hp, rt)
    for name, g in recorder.grads.items():
        torch.testing.assert_close(g, want[name] * (clip / norm), rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- GPTQ: relative damping, fp16 scales


def correlated_layer(seed: int = 0, rows: int = 48, cols: int = 96):
    """A weight with outlier columns and the Hessian of correlated, unequal-scale inputs."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    W[:, :3] *= 6
    mix = torch.randn(cols, cols, generator=gen) * 0.2 + torch.diag(torch.rand(cols, generator=gen) * 3)
    X = torch.randn(4096, cols, generator=gen) @ mix
    return W, X.T @ X


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_is_invariant_to_the_hessians_scale(act_order):
    """GPTQ_DAMP is a fraction of the Hessian's mean diagonal: calibrating on more tokens (a summed
    Hessian) or on louder activations must quantise the same. Powers of 4 scale every step exactly,
    so the integers must be identical, not only close."""
    W, H = correlated_layer()
    hp = make_hp(GPTQ_ACT_ORDER=act_order, GPTQ_BLOCK_SIZE=32)
    base = tg.gptq_quantize(W, H, 6, hp)
    assert not torch.equal(tg.gptq_quantize(W, H, 6, make_hp(GPTQ_DAMP=0.5)).q, base.q)  # damping matters
    for c in (4.0**-10, 4.0**10):
        scaled = tg.gptq_quantize(W, H * c, 6, hp)
        assert torch.equal(scaled.q, base.q) and torch.equal(scaled.scale, base.scale), c


@pytest.mark.parametrize("knobs", [{}, {"GPTQ_CLIP_FRACS": "1.0"}, {"GPTQ_SDCLIP_K": 12.0}])
def test_quantizers_round_with_the_fp16_scale_they_store(knobs, monkeypatch):
    """Every scale a quantiser rounds with is an fp16 value (the search's candidates included), and
    the final rounding uses exactly the stored one: rounding with fp32 scales and storing fp16 ones
    would put the stored weights off the grid the quantiser chose and compensated for."""
    W, H = correlated_layer(1)
    used: list[torch.Tensor] = []
    real = tg.round_to_grid
    monkeypatch.setattr(
        tg, "round_to_grid", lambda w, scale, bits: used.append(scale) or real(w, scale, bits)
    )
    for quantize in (lambda: tg.gptq_quantize(W, H, 6, make_hp(**knobs)), lambda: tg.rtn_quantize(W, 6)):
        used.clear()
        qt = quantize()
        assert qt.scale.dtype == torch.float16 and used
        assert all(torch.equal(s, s.half().float()) for s in used)
        assert torch.equal(used[-1], qt.scale.float())
        assert torch.equal(qt.dequantize(), qt.q.float() * qt.scale.float()[:, None])
    rtn = tg.rtn_quantize(W, 6)
    assert torch.equal(rtn.q, real(W, rtn.scale.float(), 6).to(torch.int8))


def test_gptq_compensates_each_columns_error_with_the_stored_scale():
    """Two inputs with correlation b/a: quantising column 0 moves column 1 by its error x b/a'
    (a' the damped diagonal), the error measured on the stored fp16 grid. Checked in float64 on
    4096 rows, leaving out the few whose target lies within 1e-4 of a rounding boundary."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4096, 2, generator=gen)
    a, b = 4.0, 2.0
    damp = 0.01
    hp = make_hp(GPTQ_CLIP_FRACS="1.0", GPTQ_ACT_ORDER=False, GPTQ_DAMP=damp)
    qt = tg.gptq_quantize(W, torch.tensor([[a, b], [b, a]]), 6, hp)
    s, w, top = qt.scale.double(), W.double(), tg.qmax(6)
    q0 = torch.round(w[:, 0] / s).clamp(-top, top)
    target = (w[:, 1] + (w[:, 0] - q0 * s) * b / (a + damp * a)) / s
    clear = (target - target.floor() - 0.5).abs() > 1e-4
    assert clear.float().mean() > 0.99
    assert torch.equal(qt.q[:, 0].double(), q0)
    assert torch.equal(qt.q[clear, 1].double(), torch.round(target[clear]).clamp(-top, top))


def test_the_artifact_holds_the_weights_the_quantiser_made(tmp_path):
    """Decoded from the stored bytes, every quantised weight is q x its fp16 scale exactly, the same
    tensor the in-process quantiser produced: what EVAL_ONLY scores is what the run scored."""
    hp = make_hp(NUM_LAYERS=2, MODEL_DIM=64, COMPRESSOR="zstd")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    gen = torch.Generator().manual_seed(2)
    hessians = {}
    for name in tg.quant_plan(model, hp):
        if tg.block_index(name) is not None:
            x = torch.randn(256, model.get_parameter(name).size(1), generator=gen)
            hessians[name] = x.T @ x
    qz = tg.Quantizer(model, hessians, hp)
    made = qz.qstate()
    blob, _ = tg.fit_artifact(qz, 1000, [].append, 16_000_000)
    _, stored = tg.decode_artifact(blob, "mem")
    rebuilt = tg.GPT(hp)
    tg.load_artifact_weights(rebuilt, stored, "mem")
    loaded = rebuilt.state_dict()
    for name, qt in made.items():
        if isinstance(qt, tg.QuantTensor):
            assert stored[name].scale.dtype == torch.float16 and torch.equal(stored[name].q, qt.q)
            assert torch.equal(loaded[name], qt.q.float() * qt.scale.float()[:, None]), name
            if name not in hessians:  # round-to-nearest: the integers are those of the stored grid
                W = model.state_dict()[name].float()
                assert torch.equal(qt.q, tg.round_to_grid(W, qt.scale.float(), qt.bits).to(torch.int8))
