"""The model (every switch), its initial state, causality, the BOS masks, XSA, RoPE, and the
Newton-Schulz / Muon / parameter-routing side of the optimiser."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hp, randomize_

import train_gpt
from train_gpt import BOS_ID, GPT

pytestmark = pytest.mark.usefixtures("torch_single_thread")

B, T, V = 2, 16, 64  # TINY_ENV: VOCAB_SIZE=64, MODEL_DIM=32, 4 heads of 8 dims, 2 KV heads, 2 layers


def make_ids(seed: int = 0, batch: int = B, length: int = T, vocab: int = V) -> torch.Tensor:
    """Random ids (no accidental BOS) with documents starting at 0 and 7 (row 0) and at 0 and 3 (row 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=gen)
    ids[:, 0] = BOS_ID
    ids[0, 7] = BOS_ID
    if batch > 1:
        ids[1, 3] = BOS_ID
    return ids


def tiny_model(seed: int = 0, noise: float = 0.2, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(make_hp(**overrides))
    return randomize_(model, std=noise, seed=seed) if noise else model


ALL_OFF = dict(
    XSA_LAST_N=0,
    VALUE_RESIDUAL=False,
    GATED_ATTN=False,
    SMEAR_GATE=False,
    BIGRAM_BUCKETS=0,
    ROPE_DIMS=0,
    LN_SCALE=False,
    UNET_SKIPS=False,
)
SWITCHES = {
    "defaults": {},
    "xsa_off": dict(XSA_LAST_N=0),
    "xsa_last_1": dict(XSA_LAST_N=1),
    "no_value_residual": dict(VALUE_RESIDUAL=False),
    "no_gated_attn": dict(GATED_ATTN=False),
    "no_smear_gate": dict(SMEAR_GATE=False),
    "no_bigram": dict(BIGRAM_BUCKETS=0),
    "rope_off": dict(ROPE_DIMS=0),
    "rope_full": dict(ROPE_DIMS=8),
    "no_ln_scale": dict(LN_SCALE=False),
    "no_unet": dict(UNET_SKIPS=False),
    "untied": dict(TIE_EMBEDDINGS=False),
    "three_layers": dict(NUM_LAYERS=3, XSA_LAST_N=3),
    "five_layers_untied": dict(NUM_LAYERS=5, XSA_LAST_N=2, TIE_EMBEDDINGS=False),
    "mha_kv_eq_heads": dict(NUM_KV_HEADS=4),
    "mqa_one_kv_head": dict(NUM_KV_HEADS=1),
    "all_off": ALL_OFF,
    "parallel_last_2": dict(NUM_LAYERS=4, PARALLEL_RESIDUAL_LAST_N=2),
    "loops": dict(NUM_LAYERS=4, NUM_LOOPS=2, LOOP_START=1, LOOP_END=2),
}


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("switch", SWITCHES)
def test_forward_shapes_and_losses(switch):
    model = tiny_model(noise=0.05, **SWITCHES[switch])
    ids, targets = make_ids(1), make_ids(2)
    logits = model(ids)
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.abs().max() <= model.softcap
    loss = model(ids, targets)
    assert loss.shape == () and torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)).item())
    per_token = model(ids, targets, reduction="none")
    assert per_token.shape == (B, T) and (per_token > 0).all()
    assert per_token.mean().item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("switch", SWITCHES)
def test_backward_reaches_every_parameter(switch):
    # Away from init, every parameter must get a finite, non-zero gradient: a parameter outside
    # the graph would stall DDP and one with a zero gradient is dead weight.
    model = tiny_model(noise=0.2, **SWITCHES[switch])
    model(make_ids(1), make_ids(2)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("switch", ["defaults", "untied", "five_layers_untied"])
def test_backward_at_init_is_finite_for_every_parameter(switch):
    model = tiny_model(noise=0.0, **SWITCHES[switch])
    loss = model(make_ids(1), make_ids(2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_logit_softcap_bounds_large_logits():
    model = tiny_model(noise=0.0, TIE_EMBEDDINGS=False, LOGIT_SOFTCAP=5.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 50.0)
    logits = model(make_ids())
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.9


def test_logit_softcap_divides_by_the_cap_inside_tanh():
    """Moderate logits, where cap*tanh(x/cap) and cap*tanh(x) differ by far more than rounding."""
    model = tiny_model(noise=0.0, TIE_EMBEDDINGS=False, LOGIT_SOFTCAP=5.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        raw = F.linear(model.hidden(make_ids()), model.lm_head.weight)
        logits = model(make_ids())
    assert 1.0 < raw.abs().max() < 20.0  # not saturated: the range where the two formulas part ways
    torch.testing.assert_close(logits, 5.0 * torch.tanh(raw / 5.0))
    assert (logits - 5.0 * torch.tanh(raw)).abs().max() > 0.5


# ----------------------------------------------------------------------------- initial state


def test_smear_gate_is_identity_at_init():
    model = tiny_model(noise=0.0)
    x = torch.randn(B, T, 32)
    assert torch.equal(model.smear(x, make_ids()), x)
    assert model.smear.smear_lambda.item() == 0 and not model.smear.gate.weight.any()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"GATED_ATTN_BIAS_INIT": 2.0},
        pytest.param({"MODEL_DIM": 64, "NUM_HEADS": 64, "NUM_KV_HEADS": 64, "ROPE_DIMS": 0}, id="64_heads"),
    ],
)
def test_attention_gate_starts_at_sigmoid_of_its_bias(overrides):
    hp = make_hp(**overrides)
    torch.manual_seed(0)
    model = GPT(hp)
    x = torch.randn(B, T, hp.model_dim)
    for block in model.blocks:
        gate = torch.sigmoid(block.attn.gate(x))
        assert gate.shape == (B, T, hp.num_heads)
        torch.testing.assert_close(gate, torch.full_like(gate, 1 / (1 + math.exp(-hp.gated_attn_bias_init))))
    assert 1 / (1 + math.exp(-4.0)) == pytest.approx(0.982, abs=1e-3)


def test_output_projections_start_at_zero():
    model = tiny_model(noise=0.0, TIE_EMBEDDINGS=False, NUM_LAYERS=3, XSA_LAST_N=3)
    zeros = [model.lm_head, model.bigram.proj]
    for block in model.blocks:
        zeros += [block.attn.proj, block.mlp.proj]
    for module in zeros:
        assert not module.weight.any()
    assert model.bigram.embed.weight.std() > 0.01  # the table itself starts random
    # untied zero head: uniform prediction at init
    loss = model(make_ids(1), make_ids(2))
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_large_matrices_start_orthogonal_and_embeddings_small():
    hp = make_hp(MODEL_DIM=64, NUM_KV_HEADS=4, MLP_MULT=2, VOCAB_SIZE=256, ROPE_DIMS=16)
    torch.manual_seed(0)
    model = GPT(hp)
    for block in model.blocks:
        for module in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            w = module.weight
            gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    assert model.tok_emb.weight.std().item() == pytest.approx(hp.tied_embed_init_std, rel=0.1)


def test_layer_structure_follows_the_switches():
    model = tiny_model(noise=0.0, NUM_LAYERS=5, XSA_LAST_N=2)
    assert [b.attn.xsa for b in model.blocks] == [False, False, False, True, True]
    assert model.blocks[0].attn.vr_lambda is None  # layer 0 produces v0; a lambda would get no grad
    for block in model.blocks[1:]:
        assert block.attn.vr_lambda.tolist() == [0.5, 0.5]
    assert [b.ln_scale for b in model.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(5)])
    assert model.skip_weights.shape == (2, 32)  # min(2 encoder, 3 decoder) skips

    off = tiny_model(noise=0.0, NUM_LAYERS=5, **ALL_OFF)
    assert not any(b.attn.xsa for b in off.blocks)
    assert all(b.attn.vr_lambda is None and b.attn.gate is None for b in off.blocks)
    assert all(b.ln_scale == 1.0 for b in off.blocks)
    assert off.skip_weights is None and off.smear is None and off.bigram is None
    assert tiny_model(noise=0.0, NUM_LAYERS=3, XSA_LAST_N=3).skip_weights.shape == (1, 32)


@pytest.mark.parametrize("ln_scale", [True, False])
def test_block_follows_the_sequential_residual_formula(ln_scale):
    hp = make_hp(NUM_LAYERS=3, XSA_LAST_N=3, LN_SCALE=ln_scale)
    block = randomize_(train_gpt.Block(hp, layer=2), std=0.3)
    x, x0, v0 = torch.randn(B, T, 32), torch.randn(B, T, 32), torch.randn(B, T, 2, 8)
    s = 1 / math.sqrt(3) if ln_scale else 1.0
    with torch.no_grad():
        out, v = block(x, x0, v0)
        x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
        a, v_ref = block.attn(F.rms_norm(x_in, (32,)) * s, v0)
        h = x_in + block.attn_scale * a
        h = h + block.mlp_scale * block.mlp(F.rms_norm(h, (32,)) * s)
    torch.testing.assert_close(out, h)
    torch.testing.assert_close(v, v_ref)


def test_unet_decoder_pops_encoder_outputs_last_in_first_out():
    model = tiny_model(noise=0.2, NUM_LAYERS=5, XSA_LAST_N=2)  # encoder 0,1; decoder 2,3,4
    inputs, outputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out[0]))
    with torch.no_grad():
        model(make_ids())
        w = model.skip_weights
        torch.testing.assert_close(inputs[2], outputs[1] + w[0] * outputs[1])
        torch.testing.assert_close(inputs[3], outputs[2] + w[1] * outputs[0])
        torch.testing.assert_close(inputs[4], outputs[3])  # skips used up


# Each optional component, set to its neutral value, must give exactly the model without it.
NEUTRAL = {
    "SMEAR_GATE": lambda m: m.smear.smear_lambda.zero_(),
    "BIGRAM_BUCKETS": lambda m: m.bigram.bigram_scale.zero_(),
    "UNET_SKIPS": lambda m: m.skip_weights.zero_(),
    "VALUE_RESIDUAL": lambda m: [b.attn.vr_lambda.copy_(torch.tensor([0.0, 1.0])) for b in m.blocks[1:]],
    "GATED_ATTN": lambda m: [(b.attn.gate.weight.zero_(), b.attn.gate.bias.fill_(1e4)) for b in m.blocks],
}
OFF_VALUE = {"SMEAR_GATE": False, "BIGRAM_BUCKETS": 0, "UNET_SKIPS": False, "VALUE_RESIDUAL": False}


@pytest.mark.parametrize("knob", NEUTRAL)
def test_component_at_its_neutral_value_equals_switching_it_off(knob):
    on = tiny_model(noise=0.2, NUM_LAYERS=3, XSA_LAST_N=3)
    with torch.no_grad():
        NEUTRAL[knob](on)
    off = GPT(make_hp(NUM_LAYERS=3, XSA_LAST_N=3, **{knob: OFF_VALUE.get(knob, False)}))
    result = off.load_state_dict(on.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys  # only the component's own weights left
    ids = make_ids()
    torch.testing.assert_close(on(ids), off(ids), atol=1e-5, rtol=0)
    with torch.no_grad():
        randomize_(on, std=0.2, seed=1)  # away from neutral the component matters
    assert (on(ids) - off(ids)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- causality


def assert_causal(model: GPT, ids: torch.Tensor, positions=(1, 5, 8, 12, 15), tol: float = 1e-5) -> None:
    """Changing tokens at positions >= p must leave logits < p unchanged (and change logits at p)."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        base = model(ids)
        for p in positions:
            changed = ids.clone()
            changed[:, p:] = torch.randint(0, V, (ids.size(0), T - p), generator=gen)
            changed[:, p] = (ids[:, p] + 1 + torch.randint(0, V - 1, (ids.size(0),), generator=gen)) % V
            out = model(changed)
            leak = (out[:, :p] - base[:, :p]).abs().max().item()
            assert leak <= tol, f"logits before position {p} moved by {leak:.3g}"
            assert (out[:, p] - base[:, p]).abs().max() > 1e-4, f"position {p} ignores its own token"


COMBOS = list(itertools.product([False, True], repeat=6))


@pytest.mark.parametrize(
    ("smear", "bigram", "xsa", "value_residual", "gated", "unet"),
    COMBOS,
    ids=["".join(str(int(b)) for b in combo) for combo in COMBOS],
)
def test_model_is_causal_for_every_switch_combination(smear, bigram, xsa, value_residual, gated, unet):
    model = tiny_model(
        noise=0.2,
        NUM_LAYERS=3,
        SMEAR_GATE=smear,
        BIGRAM_BUCKETS=16 if bigram else 0,
        XSA_LAST_N=3 if xsa else 0,
        VALUE_RESIDUAL=value_residual,
        GATED_ATTN=gated,
        UNET_SKIPS=unet,
    )
    model.eval()
    assert_causal(model, make_ids())


@pytest.mark.parametrize(
    "switch", ["rope_off", "rope_full", "untied", "mqa_one_kv_head", "mha_kv_eq_heads", "parallel_last_2"]
)
def test_model_is_causal_for_other_switches(switch):
    assert_causal(tiny_model(noise=0.2, **SWITCHES[switch]), make_ids())


@pytest.mark.parametrize("parallel", [0, 2])
def test_looped_model_is_causal(parallel):
    model = tiny_model(noise=0.2, **SWITCHES["loops"], PARALLEL_RESIDUAL_LAST_N=parallel)
    model.looping = True
    assert_causal(model, make_ids())


def test_depth_recurrence_repeats_the_segment_with_shared_weights():
    model = tiny_model(noise=0.2, NUM_LAYERS=5, NUM_LOOPS=2, LOOP_START=1, LOOP_END=2)
    assert model.layer_order(looping=False) == [0, 1, 2, 3, 4]
    assert model.layer_order(looping=True) == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    plain = tiny_model(noise=0.2, NUM_LAYERS=5)
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    assert model.skip_weights.shape[0] == 4  # min(9 // 2, 9 - 9 // 2): sized for the looped order
    ids = make_ids()
    with torch.no_grad():
        off = model(ids)
        model.looping = True
        on = model(ids)
    assert not torch.allclose(off, on)
    model.looping = False
    torch.testing.assert_close(model(ids).detach(), off)


def test_looping_off_or_no_loops_is_the_plain_model():
    looped = tiny_model(
        noise=0.2, seed=3, NUM_LAYERS=4, NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, UNET_SKIPS=False
    )
    plain = tiny_model(noise=0.2, seed=3, NUM_LAYERS=4, UNET_SKIPS=False)
    ids = make_ids()
    with torch.no_grad():
        torch.testing.assert_close(looped(ids), plain(ids))


def test_parallel_residual_block_reads_one_input():
    model = tiny_model(noise=0.2, NUM_LAYERS=2, PARALLEL_RESIDUAL_LAST_N=1)
    assert [b.parallel for b in model.blocks] == [False, True]
    block = model.blocks[1]
    x, x0 = torch.randn(B, T, 32), torch.randn(B, T, 32)
    with torch.no_grad():
        mix = block.resid_mix
        h = mix[0] * x + mix[1] * x0
        a, _ = block.attn(train_gpt.rms_norm(h) * block.ln_scale, None)
        m = block.mlp(train_gpt.rms_norm(h) * block.ln_scale)
        expected = h + block.attn_scale * a + block.mlp_scale * m
        torch.testing.assert_close(block(x, x0, None)[0], expected)


def test_causality_check_detects_attention_to_the_future(monkeypatch):
    def bidirectional(q, k, v, docs=None):
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )
        return y.transpose(1, 2)

    monkeypatch.setattr(train_gpt, "causal_attention", bidirectional)
    with pytest.raises(AssertionError, match="logits before position"):
        assert_causal(tiny_model(noise=0.2), make_ids())


def test_causality_check_detects_a_smear_from_the_next_token(monkeypatch):
    def smear_next(self, x, ids):
        nxt = F.pad(x[:, 1:], (0, 0, 0, 1))
        return x + self.smear_lambda * torch.sigmoid(self.gate(x[..., : self.inputs])) * nxt

    monkeypatch.setattr(train_gpt.SmearGate, "forward", smear_next)
    with pytest.raises(AssertionError, match="logits before position"):
        assert_causal(tiny_model(noise=0.2, XSA_LAST_N=0), make_ids())


def test_fa3_gets_one_16_bit_dtype_when_autocast_leaves_q_and_k_in_fp32(monkeypatch):
    """CUDA autocast runs rms_norm in fp32 (ATen's AT_FORALL_FP32 lists it), so the normed q/k are
    fp32 while c_v's v is bf16. SDPA is autocast-aware; FA3 is not and refuses mixed dtypes."""

    def strict_fa3(q, k, v, causal):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16, (q.dtype, k.dtype, v.dtype)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return y.transpose(1, 2).bfloat16(), None  # older FA3 builds also return the LSE

    monkeypatch.setattr(train_gpt, "flash_attn_func", strict_fa3)
    monkeypatch.setattr(train_gpt, "ATTENTION_BACKEND", "fa3")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, 4, 8, generator=gen), torch.randn(B, T, 2, 8, generator=gen)
    v = torch.randn(B, T, 2, 8, generator=gen).bfloat16()
    y = train_gpt.causal_attention(q, k, v)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, 4, 8)
    q16, k16 = (t.bfloat16().float().transpose(1, 2) for t in (q, k))
    expected = F.scaled_dot_product_attention(
        q16, k16, v.float().transpose(1, 2), is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(y.float(), expected.transpose(1, 2), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- BOS masks


def smear_bos_leak(smear: train_gpt.SmearGate, dim: int) -> tuple[float, float]:
    """(change at a BOS position, change at an ordinary position) when the previous vector changes."""
    gen = torch.Generator().manual_seed(0)
    ids = make_ids(batch=1)  # BOS at 0 and 7
    x = torch.randn(1, T, dim, generator=gen)
    bumped = x.clone()
    bumped[:, 6] += torch.randn(dim, generator=gen)  # the vector before the BOS at 7
    bumped[:, 10] += torch.randn(dim, generator=gen)  # the vector before the ordinary token at 11
    with torch.no_grad():
        diff = (smear(bumped, ids) - smear(x, ids)).abs()
    return diff[0, 7].max().item(), diff[0, 11].max().item()


def random_smear(dim: int = 32) -> train_gpt.SmearGate:
    smear = train_gpt.SmearGate(12)
    return randomize_(smear, std=1.0)


def test_smear_gate_does_not_cross_bos():
    at_bos, ordinary = smear_bos_leak(random_smear(), 32)
    assert at_bos == 0.0
    assert ordinary > 1e-3


def test_smear_bos_check_detects_a_missing_mask(monkeypatch):
    def no_mask(self, x, ids):
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        return x + self.smear_lambda * torch.sigmoid(self.gate(x[..., : self.inputs])) * prev

    monkeypatch.setattr(train_gpt.SmearGate, "forward", no_mask)
    at_bos, _ = smear_bos_leak(random_smear(), 32)
    assert at_bos > 1e-3


def test_smear_gate_formula():
    smear = random_smear()
    ids = make_ids(batch=1)
    x = torch.randn(1, T, 32)
    with torch.no_grad():
        out = smear(x, ids)
        g = torch.sigmoid(x[0, 5, :12] @ smear.gate.weight[0])
    torch.testing.assert_close(out[0, 5], x[0, 5] + smear.smear_lambda * g * x[0, 4])
    torch.testing.assert_close(out[0, 0], x[0, 0])  # no previous token


def test_bigram_buckets_reserve_last_bucket_for_no_previous_token():
    bigram = train_gpt.BigramHash(3072, 8, 32)
    ids = make_ids(batch=1, vocab=1024)
    buckets = bigram.bucket_ids(ids)
    assert buckets[0, 0] == 3071 and buckets[0, 7] == 3071  # position 0 and a BOS
    for t in range(1, T):
        if ids[0, t] != BOS_ID:
            cur, prev = int(ids[0, t]), int(ids[0, t - 1])
            assert buckets[0, t] == ((36313 * cur) ^ (27191 * prev)) % 3071
    big = torch.randint(0, 65536, (4, 64))
    assert ((bigram.bucket_ids(big) >= 0) & (bigram.bucket_ids(big) < 3072)).all()  # int32 wrap-around


def bigram_bos_leak(bigram: train_gpt.BigramHash) -> tuple[bool, bool]:
    """(bucket at a BOS changed, bucket at an ordinary position changed) when the token before moves."""
    ids = make_ids(batch=1, vocab=1024)
    ids[0, 6], ids[0, 10] = 100, 100
    other = ids.clone()
    other[0, 6], other[0, 10] = 200, 200
    a, b = bigram.bucket_ids(ids), bigram.bucket_ids(other)
    return bool(a[0, 7] != b[0, 7]), bool(a[0, 11] != b[0, 11])


def test_bigram_bucket_does_not_cross_bos():
    at_bos, ordinary = bigram_bos_leak(train_gpt.BigramHash(3072, 8, 32))
    assert not at_bos and ordinary


def test_bigram_bos_check_detects_a_missing_mask(monkeypatch):
    def no_mask(self, ids):
        cur = ids.to(torch.int32)
        prev = F.pad(cur[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.buckets - 1)
        h[:, 0] = self.buckets - 1
        return h.long()

    monkeypatch.setattr(train_gpt.BigramHash, "bucket_ids", no_mask)
    at_bos, _ = bigram_bos_leak(train_gpt.BigramHash(3072, 8, 32))
    assert at_bos


def test_embedding_stage_at_bos_ignores_the_previous_document():
    model = tiny_model(noise=0.2)  # SmearGate and BigramHash both on
    captured = []
    model.smear.register_forward_hook(lambda mod, args, out: captured.append(out))
    ids = make_ids(batch=1)  # documents start at 0 and 7
    other = ids.clone()
    other[0, 1:7] = (ids[0, 1:7] + 5) % (V - 2) + 2  # a different first document, no BOS
    with torch.no_grad():
        model(ids), model(other)
    first, second = captured
    assert (first[0, 1:7] - second[0, 1:7]).abs().max() > 1e-3
    assert torch.equal(first[0, 7:], second[0, 7:])


# ----------------------------------------------------------------------------- XSA


def test_xsa_output_is_orthogonal_to_own_value_per_kv_group():
    gen = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, generator=gen), torch.randn(2, 5, 2, 8, generator=gen)
    out = train_gpt.exclusive_self_attention(y, v)
    v_hat = F.normalize(v, dim=-1)
    for h in range(4):
        own = v_hat[:, :, h // 2]  # query heads 0,1 share KV head 0; 2,3 share KV head 1
        assert (out[:, :, h] * own).sum(-1).abs().max() < 1e-5
        removed = y[:, :, h] - out[:, :, h]  # only the component along the own value is removed
        torch.testing.assert_close(removed, (y[:, :, h] * own).sum(-1, keepdim=True) * own)
    for h in (1, 2):  # a wrong grouping (h % 2) would not be orthogonal
        assert (out[:, :, h] * v_hat[:, :, h % 2]).sum(-1).abs().max() > 1e-2


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_xsa_inside_attention_uses_the_same_kv_head_as_attention(kv_heads):
    # At position 0 causal attention returns exactly the token's own value, which XSA removes.
    hp = make_hp(NUM_KV_HEADS=kv_heads, VALUE_RESIDUAL=False, GATED_ATTN=False, XSA_LAST_N=2)
    attn = randomize_(train_gpt.Attention(hp, layer=1), std=0.2)
    plain_hp = make_hp(NUM_KV_HEADS=kv_heads, VALUE_RESIDUAL=False, GATED_ATTN=False, XSA_LAST_N=0)
    plain = train_gpt.Attention(plain_hp, layer=1)
    plain.load_state_dict(attn.state_dict())
    assert attn.xsa and not plain.xsa
    captured = {}
    for name, module in (("xsa", attn), ("plain", plain)):
        module.proj.register_forward_pre_hook(
            lambda mod, args, name=name: captured.__setitem__(name, args[0])
        )
        module.c_v.register_forward_hook(
            lambda mod, args, out, name=name: captured.__setitem__(name + "_v", out)
        )
    x = torch.randn(B, T, 32)
    with torch.no_grad():
        attn(x, None), plain(x, None)
    group = 4 // kv_heads
    y = captured["xsa"].view(B, T, 4, 8)
    y_plain = captured["plain"].view(B, T, 4, 8)
    v = captured["xsa_v"].view(B, T, kv_heads, 8).repeat_interleave(group, dim=2)
    torch.testing.assert_close(y_plain[:, 0], v[:, 0])  # attention's own GQA grouping
    assert y[:, 0].abs().max() < 1e-5
    assert (y * F.normalize(v, dim=-1)).sum(-1).abs().max() < 1e-5
    assert y[:, 1:].abs().max() > 1e-2


def test_xsa_with_value_residual_removes_the_value_attention_used():
    hp = make_hp(VALUE_RESIDUAL=True, GATED_ATTN=False, XSA_LAST_N=2)
    attn = randomize_(train_gpt.Attention(hp, layer=1), std=0.2)
    captured = {}
    attn.proj.register_forward_pre_hook(lambda mod, args: captured.__setitem__("y", args[0]))
    x, v0 = torch.randn(B, T, 32), torch.randn(B, T, 2, 8)
    with torch.no_grad():
        attn(x, v0)
    y = captured["y"].view(B, T, 4, 8)
    assert y[:, 0].abs().max() < 1e-5  # position 0 attends only to its own (mixed) value
    assert y[:, 1:].abs().max() > 1e-2


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dims", [2, 4, 8])
def test_rope_scores_depend_on_relative_position_only(dims):
    rotary = train_gpt.Rotary(dims, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    rq, rk = rotary(q.expand(1, T, 1, 8)), rotary(k.expand(1, T, 1, 8))
    scores = rq[0, :, 0] @ rk[0, :, 0].T  # scores[i, j] = <q at i, k at j>
    for offset in (0, 1, 5):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=0)
    assert not torch.allclose(scores[0, 0], scores[0, 3])  # but position matters
    torch.testing.assert_close(rq[..., dims:], q.expand(1, T, 1, 8)[..., dims:])  # unrotated dims pass
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, T, 1))
    torch.testing.assert_close(rq[:, 0], q[:, 0])  # position 0: angle 0


def test_rope_off_is_identity_and_frequencies_follow_the_base():
    x = torch.randn(2, T, 4, 8)
    assert torch.equal(train_gpt.Rotary(0, 10000.0)(x), x)
    rotary = train_gpt.Rotary(4, 10000.0)
    torch.testing.assert_close(rotary.inv_freq, torch.tensor([1.0, 10000.0**-0.5]))


# ----------------------------------------------------------------------------- Newton-Schulz & Muon


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 48, 24), (2, 16, 40)], ids=str)
def test_newton_schulz_output_is_near_orthogonal(shape):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=gen)
    if shape == (48, 48):  # square Gaussian matrices have tiny singular values: use a conditioned one
        q1, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
        q2, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
        G = q1 @ torch.diag(torch.logspace(-1, 1, 48)) @ q2
    X = train_gpt.newton_schulz(G, steps=5)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.3, s
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the orthogonal factor of G: NS must approximate this one, not any orthogonal matrix
    cosine = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.95).all()
    torch.testing.assert_close(train_gpt.newton_schulz(1000 * G, steps=5), X, atol=1e-4, rtol=1e-4)


def test_newton_schulz_batched_equals_one_by_one():
    G = torch.randn(3, 24, 40)
    G[1] *= 100  # per-matrix normalisation: a large neighbour must not squash the others
    batched = train_gpt.newton_schulz(G, steps=5)
    for i in range(3):
        torch.testing.assert_close(batched[i], train_gpt.newton_schulz(G[i], steps=5), atol=1e-5, rtol=1e-5)


def make_muon(params, lr=0.1, momentum=0.0, weight_decay=0.0, row_normalize=True):
    return train_gpt.Muon(params, lr, momentum, 5, weight_decay, row_normalize)


def test_muon_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.randn(64, 32))
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)  # no gradient signal: only the decay acts
    make_muon([p], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_step_is_an_orthogonalised_update(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    before = p.detach().clone()
    p.grad = torch.randn(shape)
    make_muon([p], lr=0.01).step()
    update = (before - p.detach()) / 0.01
    scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall matrices get sqrt(rows/cols)
    s = torch.linalg.svdvals(update / scale)
    assert s.min() > 0.6 and s.max() < 1.3
    assert (update * p.grad).sum() > 0  # a descent direction


@pytest.mark.parametrize("row_normalize", [False, True])
def test_muon_update_is_orthogonalised_nesterov_momentum(row_normalize):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    g1, g2 = torch.randn(64, 32), torch.randn(64, 32) * torch.linspace(0.1, 3, 64)[:, None]
    opt = make_muon([p], lr=0.1, momentum=0.9, row_normalize=row_normalize)
    p.grad = g1
    opt.step()
    before = p.detach().clone()
    p.grad = g2
    opt.step()
    buf = 0.9 * g1 + g2
    u = g2 + 0.9 * buf  # Nesterov look-ahead
    if row_normalize:  # MuonEq-R: unit rows before Newton-Schulz
        u = u / u.norm(dim=-1, keepdim=True)
    expected = before - 0.1 * math.sqrt(2) * train_gpt.newton_schulz(u, 5)
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


def test_muon_nesterov_momentum_buffer_and_skipped_params():
    p, idle = torch.nn.Parameter(torch.randn(32, 32)), torch.nn.Parameter(torch.randn(32, 32))
    idle_before = idle.detach().clone()
    g = torch.randn(32, 32)
    opt = make_muon([p, idle], momentum=0.9)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], g * 1.9)
    assert torch.equal(idle.detach(), idle_before) and idle not in opt.state


def test_muon_same_shape_batch_equals_separate_steps():
    torch.manual_seed(0)
    a, b = torch.randn(32, 48), torch.randn(32, 48)
    ga, gb = torch.randn(32, 48), 50 * torch.randn(32, 48)
    together = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    together[0].grad, together[1].grad = ga.clone(), gb.clone()
    make_muon(together, row_normalize=False).step()
    for start, grad, result in ((a, ga, together[0]), (b, gb, together[1])):
        alone = torch.nn.Parameter(start.clone())
        alone.grad = grad.clone()
        make_muon([alone], row_normalize=False).step()
        torch.testing.assert_close(result.detach(), alone.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_split_params_routes_matrices_to_muon(tied):
    hp = make_hp(MODEL_DIM=64, NUM_KV_HEADS=4, ROPE_DIMS=16, NUM_LAYERS=3, XSA_LAST_N=3, TIE_EMBEDDINGS=tied)
    model = GPT(hp)
    groups = train_gpt.split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    routed = {g: sorted(names[id(p)] for p in ps) for g, ps in groups.items()}
    assert sorted(sum(routed.values(), [])) == sorted(names.values())  # a partition
    assert routed["embed"] == ["bigram.embed.weight", "tok_emb.weight"]
    assert routed["head"] == ([] if tied else ["lm_head.weight"])
    expected_matrices = sorted(
        f"blocks.{i}.{m}.weight"
        for i in range(3)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert routed["matrix"] == expected_matrices
    for name in routed["scalar"]:  # vectors, gates, lambdas, skip weights, small projections
        p = dict(model.named_parameters())[name]
        assert p.ndim < 2 or min(p.shape) < 64, name
    assert "smear.smear_lambda" in routed["scalar"] and "skip_weights" in routed["scalar"]
    assert "blocks.1.attn.vr_lambda" in routed["scalar"] and "blocks.0.attn.gate.weight" in routed["scalar"]


def test_build_optimizers_gives_muon_only_matrices(cpu_runtime):
    hp = make_hp(MODEL_DIM=64, NUM_KV_HEADS=4, ROPE_DIMS=16, TIE_EMBEDDINGS=False)
    model = GPT(hp)
    adam, muon = train_gpt.build_optimizers(model, hp, cpu_runtime)
    assert isinstance(muon, train_gpt.Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_params = {id(p) for g in adam.param_groups for p in g["params"]}
    assert muon_params.isdisjoint(adam_params)
    assert muon_params | adam_params == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert [g["lr"] for g in adam.param_groups] == [hp.tied_embed_lr, hp.scalar_lr, hp.head_lr]
    assert muon.param_groups[0]["weight_decay"] == hp.muon_wd


def test_fa3_is_chosen_only_after_its_probe_passes(monkeypatch):
    """An FA3 build that breaks fullgraph compilation must give SDPA and a reason, not a crash."""
    cuda = train_gpt.Runtime(0, 1, 0, torch.device("cuda", 0), 1, "t")
    monkeypatch.setattr(train_gpt, "flash_attn_func", None)
    assert "not importable" in train_gpt.select_attention_backend(cuda)
    assert train_gpt.ATTENTION_BACKEND == "sdpa"

    def extension_only_fa3(q, k, v, causal):
        raise RuntimeError("flash_attn_3_cuda.fwd is not a torch op")

    monkeypatch.setattr(train_gpt, "flash_attn_func", extension_only_fa3)
    problem = train_gpt.fa3_problem(torch.device("cpu"))
    assert "failed a compiled forward+backward" in problem and "not a torch op" in problem
    cpu = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    assert train_gpt.select_attention_backend(cpu) is None and train_gpt.ATTENTION_BACKEND == "sdpa"

    def working_fa3(q, k, v, causal):  # registered-op builds trace like any torch function
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
        return y.transpose(1, 2)

    monkeypatch.setattr(train_gpt, "flash_attn_func", working_fa3)
    assert train_gpt.fa3_problem(torch.device("cpu")) is None


@pytest.mark.parametrize("error", ["OSError", "RuntimeError"])
def test_a_broken_fa3_import_falls_back_to_sdpa_with_the_reason(error, tmp_path, monkeypatch):
    """A build for another CUDA or torch fails on loading its extension, not with ImportError: the
    run must still start, on SDPA, and the warning must say why."""
    fake = tmp_path / "flash_attn_interface.py"
    fake.write_text(f"raise {error}('libflash_attn_3.so: undefined symbol _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    fa3, why = train_gpt.import_fa3()
    assert fa3 is None and why.startswith(error) and "undefined symbol" in why
    monkeypatch.setattr(train_gpt, "flash_attn_func", fa3)
    monkeypatch.setattr(train_gpt, "FA3_IMPORT_ERROR", why)
    cuda = train_gpt.Runtime(0, 1, 0, torch.device("cuda", 0), 1, "t")
    problem = train_gpt.select_attention_backend(cuda, make_hp())
    assert "not importable" in problem and error in problem and "undefined symbol" in problem
    assert train_gpt.ATTENTION_BACKEND == "sdpa"


def test_the_fa3_probe_runs_the_models_gqa_head_shapes(monkeypatch):
    """An FA3 build can pass on equal query/KV heads and fail on GQA: the probe must call it as the
    model does, 8 query / 4 KV heads of 64 dims (the default) and the configured model's heads."""
    torch._dynamo.reset()  # the probe's graph guards on the fake; start from an empty cache
    calls = []

    def recording_fa3(q, k, v, causal):
        calls.append((q.size(2), k.size(2), v.size(2), q.size(3)))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
        return y.transpose(1, 2)

    def no_gqa_fa3(q, k, v, causal):  # a build that only handles equal head counts
        if q.size(2) != k.size(2):
            raise RuntimeError("Number of heads in key/value must divide number of heads in query")
        return recording_fa3(q, k, v, causal)

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_gpt, "flash_attn_func", recording_fa3)
    assert train_gpt.fa3_problem(cpu) is None and set(calls) == {(8, 4, 4, 64)}
    calls.clear()
    assert train_gpt.fa3_problem(cpu, ((8, 4, 64), (6, 2, 16))) is None
    assert set(calls) == {(8, 4, 4, 64), (6, 2, 2, 16)}
    monkeypatch.setattr(train_gpt, "flash_attn_func", no_gqa_fa3)
    problem = train_gpt.fa3_problem(cpu)
    assert "8 query / 4 KV heads of dim 64" in problem and "must divide" in problem
    torch._dynamo.reset()

    probed = []
    monkeypatch.setattr(train_gpt, "fa3_problem", lambda device, heads: probed.append(heads))
    monkeypatch.setattr(train_gpt, "ATTENTION_BACKEND", "sdpa")  # restored after the test
    cuda = train_gpt.Runtime(0, 1, 0, torch.device("cuda", 0), 1, "t")
    train_gpt.select_attention_backend(cuda, make_hp(MODEL_DIM=96, NUM_HEADS=6, NUM_KV_HEADS=2))
    train_gpt.select_attention_backend(cuda, make_hp(MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4))
    assert probed == [((8, 4, 64), (6, 2, 16)), ((8, 4, 64),)]  # the default heads probed once
