"""Model techniques of the 2026-03-23, 04-09 and 04-27 records, and the presets that rebuild their
models: parameter counts equal the records' logged `model_params`, each technique is off by default,
and each matches the record's formulas and init (tiny models on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import make_hp
from test_compile import CountingBackend

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The records' logged `model_params:` (train_seed*.log of each record folder).
RECORD_PARAMS = {"record_0323": 26_928_220, "record_0409": 35_944_536, "record_0427": 35_945_671}
NEW_PARAMS = ("skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas", "attn_gate_w", "ve_")


def build(seed: int = 0, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(make_hp(**overrides))


def ids_for(hp: tg.Hyperparameters, rows: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, hp.vocab_size, (rows, hp.train_seq_len), generator=g)
    ids[:, 5] = tg.BOS_ID  # a document boundary inside each row
    return ids


def perturb(model: tg.GPT, seed: int = 3) -> None:
    """Random values in every parameter, so zero-initialised paths (output projections, gates)
    carry signal and a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted(RECORD_PARAMS))
def test_record_preset_builds_the_records_parameter_count(preset):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    with torch.device("meta"):
        assert tg.model_params(tg.GPT(hp)) == RECORD_PARAMS[preset]


@pytest.mark.parametrize("preset", sorted(RECORD_PARAMS))
def test_print_config_names_what_the_preset_lacks(preset, capsys):
    tg.print_config(tg.Hyperparameters({"RUN_PRESET": preset}))
    lines = capsys.readouterr().out.splitlines()
    assert f"model_params:{RECORD_PARAMS[preset]}" in lines
    missing = [line for line in lines if line.startswith("preset_missing:")]
    lacks = tg.PRESET_MISSING.get(preset, ())  # a preset that runs all of its record has no entry
    assert missing == ([f"preset_missing:{','.join(lacks)}"] if lacks else [])


def test_record_0323_rope_base_is_its_ntk_rescaled_base():
    """R0323 builds Rotary for 1024 tokens and trains at 2048: base * (2048/1024)**(16/(16-2))."""
    hp = tg.Hyperparameters({"RUN_PRESET": "record_0323"})
    assert hp.rope_base == 10000.0 * (2048 / 1024) ** (16 / (16 - 2)) and hp.train_seq_len == 2048


def test_every_missing_list_names_a_preset():
    assert set(tg.PRESET_MISSING) <= set(tg.PRESETS)
    assert all("," not in item for items in tg.PRESET_MISSING.values() for item in items)


def test_presets_without_missing_work_print_no_missing_line(capsys):
    tg.print_config(tg.Hyperparameters({"RUN_PRESET": "smoke"}))
    assert "preset_missing" not in capsys.readouterr().out


def test_record_0427_parameters_beyond_record_0409_are_its_three_techniques():
    """R0427 - R0409 = 66 lane weights + 11 x 8 x 12 sparse gate + 13 SmearGate = 1,135."""
    names = {}
    for preset in ("record_0409", "record_0427"):
        with torch.device("meta"):
            model = tg.GPT(tg.Hyperparameters({"RUN_PRESET": preset}))
        names[preset] = {n: p.numel() for n, p in model.named_parameters()}
    extra = {n: c for n, c in names["record_0427"].items() if n not in names["record_0409"]}
    assert extra["parallel_post_lambdas"] == 11 * 2 * 2 and extra["parallel_resid_lambdas"] == 11 * 2
    assert sum(c for n, c in extra.items() if n.endswith("attn_gate_w")) == 11 * 8 * 12
    assert extra["smear.gate.weight"] + extra["smear.smear_lambda"] == 13
    assert sum(extra.values()) == 1_135
    assert not set(names["record_0409"]) - set(names["record_0427"])


def test_new_knobs_default_off_and_add_no_parameters():
    hp = make_hp()
    assert not hp.skip_gates_enabled and not hp.sparse_attn_gate_enabled and not hp.ve_enabled
    assert hp.parallel_start_layer == 0 and hp.smear_gate_form == "input"
    names = [n for n, _ in tg.GPT(hp).named_parameters()]
    assert not [n for n in names if any(k in n for k in NEW_PARAMS)]


# ---------------------------------------------------------------- sigmoid-gated skips


def test_skip_gates_shape_init_and_lerp():
    model = build(SKIP_GATES_ENABLED=True, NUM_LAYERS=4)
    assert model.skip_gates.shape == model.skip_weights.shape == (2, 32)
    assert torch.equal(model.skip_gates, torch.zeros(2, 32))
    x, skip = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        model.skip_weights[1].uniform_(0.5, 1.5)
        torch.testing.assert_close(model.add_skip(x, skip, 1), 0.5 * (x + model.skip_weights[1] * skip))
        model.skip_gates[1].fill_(2.0)
        g = torch.sigmoid(torch.tensor(2.0))  # R0409: lerp(w * skip, x, g) = w*skip + g (x - w*skip)
        torch.testing.assert_close(model.add_skip(x, skip, 1), (1 - g) * model.skip_weights[1] * skip + g * x)
    assert id(model.skip_gates) in {id(p) for p in tg.split_params(model)["scalar"]}


def test_skip_gates_need_unet_skips():
    with pytest.raises(tg.ConfigError, match="SKIP_GATES_ENABLED"):
        make_hp(SKIP_GATES_ENABLED=True, UNET_SKIPS=False)


# ---------------------------------------------------------------- two-lane parallel residual


def reference_two_lane(block, lane0, lane1, x0, post, resid):
    """R0427's GPT._parallel_block, written out independently of Block.two_lane."""
    mix = block.resid_mix
    attn_out, _ = block.attn(tg.rms_norm(mix[0] * lane0 + mix[1] * x0) * block.ln_scale, None)
    attn_out = block.attn_scale * attn_out
    mlp_out = block.mlp_scale * block.mlp(tg.rms_norm(lane1) * block.ln_scale)
    attn_post, mlp_post = post[0], post[1]
    new0 = resid[0] * lane0 + attn_post[0] * attn_out + mlp_post[0] * mlp_out
    new1 = resid[1] * lane1 + attn_post[1] * attn_out + mlp_post[1] * mlp_out
    return new0, new1


def test_two_lane_parameters_and_init():
    model = build(NUM_LAYERS=4, PARALLEL_START_LAYER=2)
    assert torch.equal(model.parallel_post_lambdas, torch.ones(4, 2, 2))
    assert torch.equal(model.parallel_resid_lambdas, torch.full((4, 2), 1.1))
    scalar = {id(p) for p in tg.split_params(model)["scalar"]}
    assert {id(model.parallel_post_lambdas), id(model.parallel_resid_lambdas)} <= scalar


def test_two_lane_block_matches_the_record_formula():
    model = build(NUM_LAYERS=3, PARALLEL_START_LAYER=1, VALUE_RESIDUAL=False)
    perturb(model)
    block = model.blocks[2]
    g = torch.Generator().manual_seed(5)
    lane0, lane1, x0 = (torch.randn(2, 16, 32, generator=g) for _ in range(3))
    post, resid = model.parallel_post_lambdas[2], model.parallel_resid_lambdas[2]
    (got0, got1), _ = block.two_lane((lane0, lane1), x0, None, None, post, resid)
    want0, want1 = reference_two_lane(block, lane0, lane1, x0, post, resid)
    torch.testing.assert_close(got0, want0, rtol=0, atol=1e-6)
    torch.testing.assert_close(got1, want1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lane", ["mean", "attn", "mlp"])
def test_final_lane_choice(lane):
    model = build(NUM_LAYERS=3, PARALLEL_START_LAYER=2, PARALLEL_FINAL_LANE=lane)
    a, b = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    want = {"mean": 0.5 * (a + b), "attn": a, "mlp": b}[lane]
    assert torch.equal(model.lane_output((a, b)), want)


def test_start_past_the_last_block_is_bit_identical_to_off():
    off = build(NUM_LAYERS=3)
    past = build(NUM_LAYERS=3, PARALLEL_START_LAYER=3)
    perturb(off)
    past.load_state_dict(off.state_dict(), strict=False)
    ids = ids_for(make_hp())
    assert torch.equal(off(ids, ids), past(ids, ids))


def test_two_lanes_with_unit_weights_equal_the_one_lane_parallel_block():
    """Lanes start equal; with resid = post = 1 and resid_mix at its init (x, not x0) both read
    the same stream, so one parallel block on two lanes is GPT-J's one-lane block, bit for bit."""
    one = build(NUM_LAYERS=3, UNET_SKIPS=False, PARALLEL_RESIDUAL_LAST_N=1)
    two = build(NUM_LAYERS=3, UNET_SKIPS=False, PARALLEL_START_LAYER=2)
    with torch.no_grad():
        for name, p in one.named_parameters():  # everything but resid_mix
            if "resid_mix" not in name:
                p.add_(0.1 * torch.randn_like(p))
    two.load_state_dict(one.state_dict(), strict=False)
    with torch.no_grad():
        two.parallel_resid_lambdas.fill_(1.0)
    ids = ids_for(make_hp())
    assert torch.equal(one(ids, ids), two(ids, ids))


# Two lanes from block 3, looping, gated skips, sparse gate, value embeddings (also used by the
# document-masking tests of tests/test_frontier_optim.py).
R0427_STACK = dict(
    NUM_LAYERS=5,
    NUM_LOOPS=1,
    LOOP_START=1,
    LOOP_END=2,
    PARALLEL_START_LAYER=3,
    SKIP_GATES_ENABLED=True,
    SPARSE_ATTN_GATE_ENABLED=True,
    GATED_ATTN=False,
    VE_ENABLED=True,
    VE_LAYERS="1,4",
    VE_DIM=8,
)


def test_two_lanes_are_causal_with_looping_and_all_new_techniques():
    model = build(**R0427_STACK)
    perturb(model)
    model.looping = True
    ids = ids_for(make_hp())
    logits = model(ids)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % model.tok_emb.num_embeddings
    after = model(changed)
    assert torch.equal(logits[:, :9], after[:, :9])
    assert not torch.allclose(logits[:, 9:], after[:, 9:])


def test_parallel_start_rules():
    with pytest.raises(tg.ConfigError, match="exclude each other"):
        make_hp(NUM_LAYERS=3, PARALLEL_START_LAYER=2, PARALLEL_RESIDUAL_LAST_N=1)
    with pytest.raises(tg.ConfigError, match="LOOP_START"):  # a repeated block below it would follow
        make_hp(NUM_LAYERS=6, NUM_LOOPS=1, LOOP_START=1, LOOP_END=3, PARALLEL_START_LAYER=2)
    make_hp(NUM_LAYERS=6, NUM_LOOPS=1, LOOP_START=1, LOOP_END=3, PARALLEL_START_LAYER=4)


# ---------------------------------------------------------------- sparse attention output gate


def test_sparse_gate_shape_and_half_open_init():
    hp = make_hp(SPARSE_ATTN_GATE_ENABLED=True, GATED_ATTN=False, SPARSE_ATTN_GATE_SCALE=0.5)
    attn = tg.Attention(hp, 0)
    assert attn.attn_gate_w.shape == (hp.num_heads, 12)
    assert torch.equal(attn.attn_gate_w, torch.zeros(hp.num_heads, 12))
    x = torch.randn(2, 16, 32)
    assert torch.equal(attn.sparse_gate(x), torch.full((2, 16, hp.num_heads), 0.5))


def test_sparse_gate_halves_the_ungated_attention_at_init():
    """sigmoid(0) = 0.5 on every head, and halving is exact in floating point."""
    torch.manual_seed(0)
    plain = tg.Attention(make_hp(GATED_ATTN=False), 1)
    gated = tg.Attention(make_hp(GATED_ATTN=False, SPARSE_ATTN_GATE_ENABLED=True), 1)
    with torch.no_grad():
        plain.proj.weight.normal_()
    gated.load_state_dict(plain.state_dict(), strict=False)
    x, v0 = torch.randn(2, 16, 32), torch.randn(2, 16, 2, 8)
    assert torch.equal(gated(x, v0)[0], 0.5 * plain(x, v0)[0])


def test_sparse_gate_reads_only_its_leading_channels_with_scale():
    gate = dict(SPARSE_ATTN_GATE_ENABLED=True, SPARSE_ATTN_GATE_INPUTS=6, SPARSE_ATTN_GATE_SCALE=0.5)
    hp = make_hp(GATED_ATTN=False, **gate)
    attn = tg.Attention(hp, 0)
    with torch.no_grad():
        attn.attn_gate_w.normal_()
    x = torch.randn(2, 16, 32)
    want = torch.sigmoid(0.5 * x[..., :6] @ attn.attn_gate_w.T)
    torch.testing.assert_close(attn.sparse_gate(x), want)
    x2 = x.clone()
    x2[..., 6:] += 1.0
    assert torch.equal(attn.sparse_gate(x2), attn.sparse_gate(x))


def test_sparse_gate_init_std():
    torch.manual_seed(0)
    hp = make_hp(
        MODEL_DIM=64,
        SPARSE_ATTN_GATE_ENABLED=True,
        SPARSE_ATTN_GATE_INPUTS=64,
        SPARSE_ATTN_GATE_INIT_STD=0.05,
        GATED_ATTN=False,
    )
    w = tg.Attention(hp, 0).attn_gate_w
    assert w.shape == (4, 64) and 0.04 < float(w.detach().std()) < 0.06  # 256 draws, fixed seed


def test_sparse_and_dense_gates_exclude_each_other():
    with pytest.raises(tg.ConfigError, match="GATED_ATTN"):
        make_hp(SPARSE_ATTN_GATE_ENABLED=True, GATED_ATTN=True)


# ---------------------------------------------------------------- R0323 SmearGate and value embeddings


def test_channel_smear_after_the_norm_at_init():
    model = build(SMEAR_GATE_FORM="channel", BIGRAM_BUCKETS=0)
    assert model.smear.gate.shape == (32,)
    ids = ids_for(make_hp())
    x = tg.rms_norm(model.tok_emb(ids))
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    torch.testing.assert_close(model.embed(ids), 0.5 * x + 0.5 * prev)  # no BOS mask in R0323


def test_value_embedding_shapes_init_and_routing():
    model = build(VE_ENABLED=True, VE_DIM=8, VE_LAYERS="1")
    kv_dim = 2 * 8
    assert model.ve_shared.embed.weight.shape == (64, 8)
    assert model.ve_shared.proj.weight.shape == (kv_dim, 8)
    assert torch.equal(model.ve_shared.proj.weight, torch.zeros(kv_dim, 8))
    assert model.ve_shared.scale.item() == pytest.approx(0.1) and len(model.ve_layer_scales) == 1
    groups = {k: {id(p) for p in v} for k, v in tg.split_params(model).items()}
    assert id(model.ve_shared.embed.weight) in groups["embed"]
    assert id(model.ve_shared.proj.weight) in groups["scalar"]


def test_value_embedding_reaches_only_its_layers():
    """With a zero projection it adds exact zeros (the model equals the one without it); with a
    live one it changes the values of VE_LAYERS only."""
    off = build(NUM_LAYERS=2)
    perturb(off)
    on = build(NUM_LAYERS=2, VE_ENABLED=True, VE_DIM=8, VE_LAYERS="1")
    on.load_state_dict(off.state_dict(), strict=False)
    ids = ids_for(make_hp())
    assert torch.equal(off(ids, ids), on(ids, ids))
    with torch.no_grad():
        on.ve_shared.proj.weight.normal_()
    ve = on.ve_shared(ids)
    assert on.layer_ve(ve, 0) is None
    torch.testing.assert_close(on.layer_ve(ve, 1), ve * on.ve_layer_scales[0])
    assert not torch.equal(off(ids, ids), on(ids, ids))


def test_ve_layers_must_be_blocks():
    with pytest.raises(tg.ConfigError, match="VE_LAYERS"):
        make_hp(VE_ENABLED=True, VE_LAYERS="2")


# ---------------------------------------------------------------- compile


def test_frontier_model_compiles_once_per_looping_graph():
    """R0427's model (recurrence, two lanes, sparse gate, gated skips, BOS SmearGate) compiles one
    graph per looping state in warmup and never again as the schedule switches."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build(
        NUM_LAYERS=3,
        NUM_LOOPS=1,
        LOOP_START=0,
        LOOP_END=0,
        PARALLEL_START_LAYER=2,
        SKIP_GATES_ENABLED=True,
        SPARSE_ATTN_GATE_ENABLED=True,
        GATED_ATTN=False,
        VALUE_RESIDUAL=False,
        BIGRAM_BUCKETS=0,
    )
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    ids = ids_for(make_hp())
    for looping in (False, True):
        model.looping = looping
        compiled(ids, ids).backward()
    assert backend.compiles == 2
    for looping in (False, True):
        model.looping = looping
        loss = compiled(ids, ids)
        loss.backward()
    assert backend.compiles == 2, "recompiled after warmup"
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()))


# ---------------------------------------------------------------- asymmetric logit rescale


def test_asym_logit_rescale_is_the_plain_softcap_at_init_and_frozen_in_training():
    off, on = build(), build(ASYM_LOGIT_RESCALE=True)
    assert tg.model_params(on) == tg.model_params(off) + 2
    assert on.softcap_pos.item() == on.softcap_neg.item() == 30.0
    on.load_state_dict(off.state_dict(), strict=False)
    ids = ids_for(make_hp())
    loss = on(ids, ids)
    assert torch.equal(loss, off(ids, ids))
    loss.backward()  # PR #1923: the training loss leaves both caps where they are
    assert on.softcap_pos.grad is None and on.softcap_neg.grad is None


def test_asym_logit_rescale_caps_each_sign_with_its_own_scalar():
    model = build(ASYM_LOGIT_RESCALE=True)
    with torch.no_grad():
        model.softcap_pos.fill_(5.0)
        model.softcap_neg.fill_(2.0)
    h = torch.randn(2, 8, 32)
    raw = F.linear(h, model.tok_emb.weight) * 200  # well past both caps
    logits = model.head(h * 200)
    assert torch.all(logits <= 5.0) and torch.all(logits >= -2.0)
    want = torch.where(raw > 0, 5.0 * torch.tanh(raw / 5.0), 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(logits, want)
    model.softcap_pos.requires_grad_(True)  # what a TTT that adapts them does
    model.head(h).sum().backward()
    assert model.softcap_pos.grad is not None and model.softcap_neg.grad is None


# ---------------------------------------------------------------- depth recurrence as the records run it


@pytest.mark.parametrize("preset", ["record_0409", "record_0427"])
def test_recurrence_runs_the_records_encoder_and_decoder(preset):
    """train_seed42.log of both records: `encoder:[0, 1, 2, 3, 4, 5, 3, 4]
    decoder:[5, 3, 4, 5, 6, 7, 8, 9, 10]`, switched on at 35 % of training."""
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    with torch.device("meta"):
        order = tg.GPT(hp).layer_order(looping=True)
    half = len(order) // 2
    assert order[:half] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert order[half:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert hp.enable_looping_at == 0.35


# ---------------------------------------------------------------- seed presets


@pytest.mark.parametrize(
    "preset, want",
    [
        (
            "seed_638",
            dict(num_layers=11, xsa_last_n=11, leaky_relu_slope=0.5, value_residual=True, gated_attn=True),
        ),
        ("seed_1125", dict(xsa_last_n=11, qk_gain_init=4.0, ln_scale=True)),
        (
            "seed_1485_legal",
            dict(
                vocab_size=8192, num_loops=2, parallel_residual_last_n=4, qk_gain_init=5.0, ttt_mode="chunked"
            ),
        ),
    ],
)
def test_seed_presets_state_their_stacks(preset, want):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    assert {name: getattr(hp, name) for name in want} == want
    with torch.device("meta"):
        assert tg.model_params(tg.GPT(hp)) > 0


# ---------------------------------------------------------------- test-time training on the new paths

FRONTIER_KNOBS = dict(
    NUM_LOOPS=1,
    LOOP_START=0,
    LOOP_END=0,
    PARALLEL_START_LAYER=1,
    SKIP_GATES_ENABLED=True,
    SPARSE_ATTN_GATE_ENABLED=True,
    GATED_ATTN=False,
    VE_ENABLED=True,
    VE_DIM=8,
    VE_LAYERS="1",
)


def test_lora_ttt_keeps_first_chunks_untouched_on_the_frontier_model():
    """LoRA TTT through two lanes, the sparse gate, gated skips and value embeddings: a document's
    first chunk scores as the plain model, later chunks see the trained adapter."""
    from test_eval import random_tokens, run_mode

    tokens = random_tokens()
    trained = run_mode("lora", tokens, **FRONTIER_KNOBS)["nll"]
    untrained = run_mode("lora", tokens, TTT_LORA_LR=0.0, **FRONTIER_KNOBS)["nll"]
    spans = tg.document_spans(tokens, len(tokens) - 1)
    firsts = torch.tensor([i for lo, hi in spans for i in range(lo, min(lo + 16, hi))])
    torch.testing.assert_close(trained[firsts], untrained[firsts], rtol=0, atol=1e-6)
    assert torch.isfinite(trained).all() and not torch.allclose(trained, untrained)


def test_chunked_ttt_scores_the_first_chunk_before_adapting_on_the_frontier_model():
    from test_eval import random_tokens, run_mode

    tokens = random_tokens()
    adapted = run_mode("ttt", tokens, **FRONTIER_KNOBS)["nll"]
    plain = run_mode("sliding", tokens, **FRONTIER_KNOBS)["nll"]
    first_chunk = 40  # TTT_CHUNK_TOKENS of test_eval's knobs
    torch.testing.assert_close(adapted[:first_chunk], plain[:first_chunk], rtol=0, atol=1e-5)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, plain)
