"""Optimizer, schedule, attention-mask and kernel techniques of the frontier records (R0410..R0427):
Polar Express Newton-Schulz, momentum warmup in steps, Muon weight-decay taper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import make_hp
from test_frontier_model import R0427_STACK as FRONTIER_MODEL_STACK

import train_gpt as tg

# ----------------------------------------------------------------------------- Polar Express Newton-Schulz


def test_polar_express_coefficients_are_the_records():
    # R0423/R0427 (from PR #1344): five (a, b, c) tuples, one per iteration.
    assert tg.POLAR_EXPRESS_COEFFS == (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    )


def reference_newton_schulz(G: torch.Tensor, coeffs) -> torch.Tensor:
    """The records' iteration written out: Frobenius-normalise, then X <- aX + (bA + cA^2)X, A = XX^T."""
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    X = X.mT if transposed else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (3, 48, 24)], ids=str)
def test_polar_express_follows_the_records_iteration(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = tg.newton_schulz(G, 5, polar_express=True)
    torch.testing.assert_close(got, reference_newton_schulz(G, tg.POLAR_EXPRESS_COEFFS), atol=1e-5, rtol=1e-5)
    fewer = tg.newton_schulz(G, 3, polar_express=True)  # MUON_NS_STEPS=3: the first three tuples
    torch.testing.assert_close(fewer, reference_newton_schulz(G, tg.POLAR_EXPRESS_COEFFS[:3]))


def fixed_newton_schulz_before_polar_express(G: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz as it was before the Polar Express option, operation for operation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


@pytest.mark.parametrize("steps", [1, 5, 7])
def test_default_newton_schulz_is_unchanged_bit_for_bit(steps):
    G = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(2))
    expected = fixed_newton_schulz_before_polar_express(G, steps)
    assert torch.equal(tg.newton_schulz(G, steps), expected)
    assert torch.equal(tg.newton_schulz(G, steps, polar_express=False), expected)


def test_polar_express_orthogonalises_better_than_the_fixed_coefficients():
    """Gradient-like matrices (singular values over two decades): after 5 steps the fixed quintic
    leaves singular values in ~[0.68, 1.2] (by design: it trades accuracy for a fast start); Polar
    Express lands in ~[0.86, 1.14] (measured: worst |s - 1| 0.318 vs 0.141, mean 0.167 vs 0.079)."""
    gen = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(8, 96, 96, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(8, 64, 64, generator=gen))
    G = U[..., :64] @ torch.diag_embed(torch.logspace(0, -2, 64).expand(8, 64)) @ V.mT
    fixed = (torch.linalg.svdvals(tg.newton_schulz(G, 5)) - 1).abs()
    X = tg.newton_schulz(G, 5, polar_express=True)
    polar = (torch.linalg.svdvals(X) - 1).abs()
    assert fixed.amax() > 0.3 and polar.amax() < 0.16, (fixed.amax(), polar.amax())
    assert polar.mean() < 0.6 * fixed.mean(), (polar.mean(), fixed.mean())
    # and it still approximates the polar factor U V^T, not just any orthogonal matrix
    cosine = (X * (U[..., :64] @ V.mT)).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * 8.0)
    assert (cosine > 0.99).all(), cosine


def test_muon_uses_polar_express_when_asked():
    p = torch.nn.Parameter(torch.randn(64, 32))
    grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    before = p.detach().clone()
    p.grad = grad.clone()
    tg.Muon([p], 0.1, 0.0, 5, 0.0, False, polar_express=True).step()
    expected = before - 0.1 * 2**0.5 * reference_newton_schulz(grad, tg.POLAR_EXPRESS_COEFFS)
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_build_optimizers_passes_the_knob(cpu_runtime):
    for on in (False, True):
        hp = make_hp(MODEL_DIM=64, MUON_POLAR_EXPRESS=on)
        muon = next(o for o in tg.build_optimizers(tg.GPT(hp), hp, cpu_runtime) if isinstance(o, tg.Muon))
        assert muon.polar_express is on


def test_polar_express_refuses_more_steps_than_tuples():
    with pytest.raises(tg.ConfigError, match="MUON_POLAR_EXPRESS"):
        make_hp(MUON_POLAR_EXPRESS=True, MUON_NS_STEPS=6)
    make_hp(MUON_POLAR_EXPRESS=True, MUON_NS_STEPS=5)
    make_hp(MUON_NS_STEPS=6)  # the fixed coefficients run any number of steps


# ----------------------------------------------------------------------------- schedules


def test_min_lr_is_the_records_floor_on_the_warmdown_multiplier():
    # R0423/R0427: lr_mul = max((1 - frac) / WARMDOWN_FRAC, MIN_LR) in the warmdown, 1 before it.
    hp = tg.Hyperparameters({"WARMDOWN_FRAC": "0.85", "MIN_LR": "0.1"})
    for frac in (0.0, 0.1, 0.15, 0.5, 0.9, 0.95, 1.0):
        expected = max((1 - frac) / 0.85, 0.1) if frac >= 1 - 0.85 else 1.0
        assert tg.lr_multiplier(frac, hp) == pytest.approx(expected), frac


def test_momentum_warmup_in_steps_is_the_records_rule():
    # R0410..R0427 log muon_momentum 0.97, warmup_start 0.92, warmup_steps 1500.
    hp = tg.Hyperparameters(
        {"MUON_MOMENTUM": "0.97", "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500"}
    )
    for step, expected in {0: 0.92, 750: 0.945, 1500: 0.97, 4000: 0.97}.items():
        # the schedule position plays no part once the warmup is counted in steps
        for frac in (0.0, 0.5, 1.0):
            assert tg.muon_momentum(frac, hp, step) == pytest.approx(expected), (step, frac)


def test_momentum_warmup_without_steps_is_unchanged():
    hp = tg.Hyperparameters({**tg.MARCH_STACK, "MUON_MOMENTUM_WARMUP_FRAC": "0.2"})
    for step in (0, 100, 10_000):
        assert tg.muon_momentum(0.1, hp, step) == pytest.approx(0.955)


def test_wd_taper_is_the_records_rule():
    # R0418 (PR #1729): WD_TAPER_START_FRAC=0.70, WD_TAPER_FINAL_MULT=0.50.
    hp = tg.Hyperparameters({"WD_TAPER_START_FRAC": "0.7", "WD_TAPER_FINAL_MULT": "0.5"})
    expected = {0.0: 1.0, 0.5: 1.0, 0.7: 1.0, 0.85: 0.75, 1.0: 0.5, 1.2: 0.5}
    for frac, mult in expected.items():
        assert tg.wd_multiplier(frac, hp) == pytest.approx(mult), frac
    off = tg.Hyperparameters({})
    assert all(tg.wd_multiplier(f, off) == 1.0 for f in (0.0, 0.7, 0.99, 1.0))


def test_apply_schedule_tapers_only_muon_weight_decay(cpu_runtime):
    hp = make_hp(
        MODEL_DIM=64, MUON_WD=0.1, EMBED_WD=0.05, WD_TAPER_START_FRAC=0.5, WD_TAPER_FINAL_MULT=0.2,
        MUON_MOMENTUM_WARMUP_STEPS=10,
    )  # fmt: skip
    optimizers = tg.build_optimizers(tg.GPT(hp), hp, cpu_runtime)
    muon = next(o for o in optimizers if isinstance(o, tg.Muon))
    adam = next(o for o in optimizers if not isinstance(o, tg.Muon))
    tg.apply_schedule(optimizers, 0.75, hp, step=5)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.1 * 0.6)
    assert adam.param_groups[0]["weight_decay"] == 0.05
    assert muon.param_groups[0]["momentum"] == pytest.approx((0.92 + hp.muon_momentum) / 2)
    tg.apply_schedule(optimizers, 1.0, hp, step=20)  # from the base value each time, never compounded
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.1 * 0.2)


def test_default_schedule_keeps_weight_decay_and_momentum(cpu_runtime):
    hp = make_hp(MODEL_DIM=64)
    optimizers = tg.build_optimizers(tg.GPT(hp), hp, cpu_runtime)
    muon = next(o for o in optimizers if isinstance(o, tg.Muon))
    for frac in (0.0, 0.5, 0.99, 1.0):
        tg.apply_schedule(optimizers, frac, hp, step=int(frac * 1e4))
        assert muon.param_groups[0]["weight_decay"] == hp.muon_wd
        assert muon.param_groups[0]["momentum"] == tg.muon_momentum(frac, hp)


# ----------------------------------------------------------------------------- document-masked attention

V = 64  # TINY_ENV vocabulary


def doc(seed: int, length: int) -> torch.Tensor:
    """One document: BOS, then random non-BOS ids."""
    ids = torch.randint(2, V, (length,), generator=torch.Generator().manual_seed(seed))
    ids[0] = tg.BOS_ID
    return ids


def tiny_model(**overrides) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(make_hp(**overrides)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # noise everywhere: zero-initialised projections and gates would hide paths
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def twin_models():
    """The same weights with and without VARLEN_ATTN (the knob adds no parameter)."""
    masked = tiny_model(VARLEN_ATTN=True)
    plain = tiny_model(VARLEN_ATTN=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(masked.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    return masked, plain


@torch.no_grad()
def test_a_document_scores_the_same_alone_or_packed_after_others():
    masked, plain = twin_models()
    a, b, c = doc(1, 9), doc(2, 12), doc(3, 5)
    packed = torch.cat((a, b, c))[None]
    got = masked(packed)
    # RoPE is relative, so a document's logits do not depend on where it sits in the row
    for start, d in ((0, a), (9, b), (21, c)):
        alone = plain(d[None])
        torch.testing.assert_close(got[0, start : start + len(d)], alone[0], atol=1e-5, rtol=1e-5)
    # without the mask the later documents see the earlier ones: the test can tell them apart
    assert not torch.allclose(plain(packed)[0, 9:21], plain(b[None])[0], atol=1e-3)


@torch.no_grad()
def test_a_row_of_one_document_is_unchanged_by_the_mask():
    masked, plain = twin_models()
    one = doc(4, 16)[None]
    torch.testing.assert_close(masked(one), plain(one), atol=1e-6, rtol=1e-6)
    no_bos = torch.randint(2, V, (2, 16), generator=torch.Generator().manual_seed(5))  # a row's tail of a doc
    torch.testing.assert_close(masked(no_bos), plain(no_bos), atol=1e-6, rtol=1e-6)


def test_the_masked_training_loss_has_gradients_only_within_documents():
    masked, _ = twin_models()
    emb = masked.tok_emb
    packed = torch.cat((doc(1, 8), doc(2, 8)))[None]
    x = emb(packed).detach().requires_grad_(True)
    emb.forward = lambda ids: x  # feed the embedding output we differentiate against
    logits = masked(packed)
    logits[0, 12].sum().backward()  # a position of the second document
    assert x.grad[0, :8].abs().max() == 0 and x.grad[0, 8:13].abs().max() > 0


def test_sdpa_document_mask():
    ids = torch.tensor([[1, 5, 6, 1, 7], [3, 4, 1, 4, 4]])
    mask = tg.document_layout(ids)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected_row0 = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    expected_row1 = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected_row0) and torch.equal(mask[1, 0], expected_row1)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """flash_attn_varlen_func in plain torch: causal attention inside each [cu[i], cu[i+1])."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal and cu_seqlens_q.dtype == torch.int32
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert hi - lo <= max_seqlen_q
        if hi > lo:
            seg = [t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
            y = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)
            out[lo:hi] = y[0].transpose(0, 1)
    return out


def test_fa3_cu_seqlens_cut_rows_at_bos_and_row_starts(monkeypatch):
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "fa3")
    ids = torch.tensor([[1, 5, 6, 1, 7, 7, 7, 7], [3, 4, 1, 4, 4, 1, 1, 2]])
    cu = tg.document_layout(ids)
    assert cu.dtype == torch.int32 and cu.shape == (2 + 16 // 64 + 1,)  # static: one compiled shape
    # 6 segments, room for B + B*T/64 = 2: the first two are kept, the rest attends as one (causal)
    assert cu.tolist() == [0, 3, 16]
    monkeypatch.setattr(tg, "VARLEN_TOKENS_PER_SEGMENT", 1)  # room for 2 + 16 segments
    assert tg.document_layout(ids).tolist() == [0, 3, 8, 10, 13, 14] + [16] * 13


@torch.no_grad()
def test_fa3_varlen_path_equals_the_sdpa_mask(monkeypatch):
    masked, _ = twin_models()
    packed = torch.stack((torch.cat((doc(1, 9), doc(2, 7))), torch.cat((doc(3, 3), doc(4, 13)))))
    expected = masked(packed)
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "fa3")
    monkeypatch.setattr(tg, "flash_attn_varlen_func", reference_varlen)
    monkeypatch.setattr(tg, "VARLEN_TOKENS_PER_SEGMENT", 8)  # 2 + 32/8 = 6 >= the 4 segments
    torch.testing.assert_close(masked(packed), expected, atol=1e-5, rtol=1e-5)


def test_varlen_attn_needs_the_fa3_varlen_function(monkeypatch):
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "sdpa")  # restored after the test
    monkeypatch.setattr(tg, "flash_attn_func", lambda q, k, v, causal: q)
    monkeypatch.setattr(tg, "fa3_problem", lambda device, heads: None)  # FA3 itself works
    monkeypatch.setattr(tg, "flash_attn_varlen_func", None)
    cuda = tg.Runtime(0, 1, 0, torch.device("cuda", 0), 1, "t")
    problem = tg.select_attention_backend(cuda, make_hp(VARLEN_ATTN=True))
    assert "flash_attn_varlen_func" in problem and tg.ATTENTION_BACKEND == "sdpa"
    assert tg.select_attention_backend(cuda, make_hp()) is None and tg.ATTENTION_BACKEND == "fa3"


# ----------------------------------------------------------------------------- fused kernels
# The kernels run on CUDA only; on CPU the custom ops run their torch references (the same math),
# so these tests check the fused paths' formulas, forward and backward, against the eager ones.
# The kernels themselves are checked against the references under Triton's interpreter when
# Triton is installed (test_kernels_match_their_references_under_the_triton_interpreter).


def eager_softcapped_ce(raw: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        softcap * torch.tanh(raw.float() / softcap), targets, reduction="none"
    )


@pytest.mark.parametrize("softcap", [30.0, 5.0])
def test_fused_ce_matches_the_eager_loss_and_gradient(softcap):
    gen = torch.Generator().manual_seed(5)
    raw = (torch.randn(40, 1100, generator=gen) * 20).requires_grad_(True)  # V not a multiple of the block
    targets = torch.randint(0, 1100, (40,), generator=gen)
    weights = torch.rand(40, generator=gen)
    expected = eager_softcapped_ce(raw, targets, softcap)
    (expected * weights).sum().backward()
    expected_grad, raw.grad = raw.grad, None
    losses, lse = torch.ops.pgolf.softcapped_ce(raw, targets, softcap)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    (losses * weights).sum().backward()
    torch.testing.assert_close(raw.grad, expected_grad, atol=1e-6, rtol=1e-5)
    # lse is of the shifted logits 2c*sigmoid(2x/c) = c*tanh(x/c) + c
    shifted = softcap * torch.tanh(raw.detach() / softcap) + softcap
    torch.testing.assert_close(lse, torch.logsumexp(shifted, -1), atol=1e-5, rtol=1e-5)


def eager_mlp(x, w1, w2, slope):
    return torch.nn.functional.leaky_relu(x @ w1.T, slope).square() @ w2.T


@pytest.mark.parametrize("slope", [0.5, 0.3])
def test_fused_mlp_matches_the_eager_mlp_and_its_gradients(slope):
    gen = torch.Generator().manual_seed(6)
    x, w1, w2 = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((2, 7, 16), (48, 16), (16, 48))
    )
    grad = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    eager_mlp(*leaves, slope).backward(grad)
    expected = [t.grad for t in leaves]
    fused = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    out = tg.FusedLeakyReLUSqMLP.apply(*fused, slope)
    torch.testing.assert_close(out, eager_mlp(x, w1, w2, slope))
    out.backward(grad)
    for got, want, name in zip([t.grad for t in fused], expected, ("x", "w1", "w2"), strict=True):
        torch.testing.assert_close(got, want, msg=name)


@torch.no_grad()
def test_fused_knobs_leave_cpu_runs_and_evaluation_unchanged():
    ids = torch.cat((doc(1, 9), doc(2, 7)))[None]
    targets = torch.roll(ids, -1, 1)
    plain = tiny_model().train()
    fused = tiny_model(FUSED_MLP_ENABLED=True, FUSED_CE_ENABLED=True).train()
    assert fused.fused_ce_enabled and all(block.mlp.fused for block in fused.blocks)
    assert torch.equal(fused(ids, targets), plain(ids, targets))  # CPU: the eager formulas, bit for bit


def test_fused_mlp_is_used_only_on_plain_layers():
    mlp = tiny_model(FUSED_MLP_ENABLED=True).blocks[0].mlp
    assert mlp.plain()
    mlp.fc.qat_bits = 6  # late QAT fake-quantises the weights: the kernel does not
    assert not mlp.plain()


KERNEL_CHECK = """
import torch, train_gpt as tg
torch.manual_seed(0)
slope = 0.3  # not 0.5, where the derivative 2*slope^2*x would equal slope*x
a, b = torch.randn(300, 96), torch.randn(200, 96) * 0.1  # fp32: the interpreter mishandles bf16 TMA
pre, post = tg.leaky_relu_sq_mm(a, b, slope)
ref_pre, ref_post = tg.leaky_relu_sq_mm_reference(a, b, slope)
torch.testing.assert_close(pre, ref_pre, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(post, ref_post, atol=1e-4, rtol=1e-4)
g, w2t = torch.randn(300, 64), torch.randn(200, 64)
want = tg.leaky_relu_sq_mm_reference(g, w2t, slope, pre)
torch.testing.assert_close(tg.leaky_relu_sq_mm(g, w2t, slope, pre), want, atol=1e-4, rtol=1e-4)
raw, t = torch.randn(37, 1500) * 20, torch.randint(0, 1500, (37,))
for dtype in (torch.float32, torch.bfloat16):
    losses, lse = tg.softcapped_ce_launch(raw.to(dtype), t, 30.0)
    ref_losses, ref_lse = tg.softcapped_ce_reference(raw.to(dtype), t, 30.0)
    torch.testing.assert_close(losses, ref_losses, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    grad = torch.rand(37)
    got = tg.softcapped_ce_grad_launch(raw.to(dtype), t, lse, grad, 30.0)
    want = tg.softcapped_ce_grad_reference(raw.to(dtype), t, ref_lse, grad, 30.0)
    atol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16 gradients: one rounding apart
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-2)
print("kernels ok")
"""


def test_kernels_match_their_references_under_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton.tools.tensor_descriptor")
    env = dict(
        os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(tg.Path(tg.__file__).parent)
    )
    run = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "kernels ok" in run.stdout, run.stderr[-3000:]


# ----------------------------------------------------------------------------- under torch.compile
# The model is compiled with fullgraph=True on GPU: the new pieces must trace without graph breaks.
# aot_eager runs dynamo and autograd tracing (where breaks and missing fake kernels show) cheaply.


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")


@pytest.mark.parametrize("backend", ["sdpa", "fa3"])
def test_document_layout_traces_in_one_graph(backend, monkeypatch):
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", backend)
    ids = torch.tensor([[1, 5, 6, 1, 7, 7, 7, 7], [3, 4, 1, 4, 4, 1, 1, 2]])
    assert torch.equal(compiled(tg.document_layout)(ids), tg.document_layout(ids))


def test_fused_ops_trace_in_one_graph_forward_and_backward():
    gen = torch.Generator().manual_seed(7)
    x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((3, 5, 16), (32, 16), (16, 32)))
    raw, targets = torch.randn(15, 50, generator=gen), torch.randint(0, 50, (15,), generator=gen)

    def loss(x, w1, w2, raw):
        out = tg.FusedLeakyReLUSqMLP.apply(x, w1, w2, 0.5)
        return out.square().mean() + torch.ops.pgolf.softcapped_ce(raw, targets, 30.0)[0].mean()

    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, raw)]
    loss(*leaves).backward()
    expected = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, raw)]
    compiled(loss)(*leaves).backward()
    for got, want in zip([t.grad for t in leaves], expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_failing_fa3_varlen_build_falls_back_to_sdpa_with_the_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("varlen kernel not built for this GPU")

    monkeypatch.setattr(tg, "flash_attn_varlen_func", broken)
    problem = tg.fa3_varlen_problem(torch.device("cpu"), 4, 2, 8)
    assert "varlen failed a compiled forward+backward" in problem and "not built" in problem


def test_the_document_masked_model_compiles_in_one_graph():
    model = tiny_model(VARLEN_ATTN=True).train()
    packed = torch.cat((doc(1, 9), doc(2, 7)))[None].repeat(2, 1)
    targets = torch.roll(packed, -1, 1)
    expected = model(packed, targets)
    torch.testing.assert_close(compiled(model)(packed, targets), expected)


def test_varlen_attn_travels_with_the_artifact_and_the_kernel_switches_do_not():
    # VARLEN_ATTN changes what the model computes, so an EVAL_ONLY rebuild must use the artifact's
    # value; the fused kernels compute the same function and may differ between training and scoring.
    names = make_hp().model_knob_names
    assert "VARLEN_ATTN" in names
    assert "FUSED_MLP_ENABLED" not in names and "FUSED_CE_ENABLED" not in names


# ------------------------------------------------- document masking on the R0427 model stack

R0427_STACK = {**FRONTIER_MODEL_STACK, "ASYM_LOGIT_RESCALE": True}  # with the asymmetric logit caps


@torch.no_grad()
def test_documents_stay_separate_in_one_and_two_lane_blocks_of_the_record_stack():
    masked, plain = tiny_model(VARLEN_ATTN=True, **R0427_STACK), tiny_model(**R0427_STACK)
    masked.looping = plain.looping = True
    a, b = doc(1, 9), doc(2, 12)
    got = masked(torch.cat((a, b))[None])
    torch.testing.assert_close(got[0, :9], plain(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 9:], plain(b[None])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(torch.cat((a, b))[None])[0, 9:], plain(b[None])[0], atol=1e-3)
