"""MLP_ACT=swiglu (PR #1090): W_down(silu(W_gate x) * W_up x) with hidden 2/3 of MLP_MULT x MODEL_DIM
rounded up to 64, its gate a Muon matrix quantised like the other block matrices; the default MLP is
untouched."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hp, randomize_

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize(
    "dim,mult,hidden", [(512, 3.0, 1024), (32, 2.0, 64), (96, 4.0, 256), (512, 3.5, 1216)]
)
def test_hidden_is_two_thirds_rounded_up_to_64(dim, mult, hidden):
    """PR #1090: hidden = int(2 * mlp_mult * dim / 3), then up to a multiple of 64."""
    hp = make_hp(MODEL_DIM=dim, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=mult, MLP_ACT="swiglu")
    mlp = tg.MLP(hp)
    assert mlp.fc.weight.shape == mlp.glu.weight.shape == (hidden, dim)
    assert mlp.proj.weight.shape == (dim, hidden)


def test_forward_is_the_gated_formula():
    hp = make_hp(MLP_ACT="swiglu")
    mlp = randomize_(tg.MLP(hp))
    x = torch.randn(2, 5, hp.model_dim)
    want = F.linear(F.silu(F.linear(x, mlp.glu.weight)) * F.linear(x, mlp.fc.weight), mlp.proj.weight)
    torch.testing.assert_close(mlp(x), want)


def test_same_parameter_count_as_the_plain_mlp_at_mult_3():
    """3 x 512 x 1024 = 2 x 512 x 1536: the March 11-layer model's count does not move."""
    with torch.device("meta"):
        plain = tg.model_params(tg.GPT(tg.Hyperparameters({"RUN_PRESET": "march"})))
        swiglu = tg.model_params(tg.GPT(tg.Hyperparameters({"RUN_PRESET": "march", "MLP_ACT": "swiglu"})))
    assert swiglu == plain


def test_gate_is_orthogonal_and_the_output_zero_at_init():
    hp = make_hp(MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, MLP_ACT="swiglu")
    torch.manual_seed(0)
    block = tg.GPT(hp).blocks[0].mlp
    g = block.glu.weight.float()  # (128, 64): orthonormal columns
    torch.testing.assert_close(g.T @ g, torch.eye(64), rtol=0, atol=1e-5)
    assert block.proj.weight.abs().max() == 0
    assert block(torch.randn(1, 3, 64)).abs().max() == 0


def test_gate_is_a_muon_matrix_quantised_at_quant_bits():
    """Its name must not match a control-tensor pattern ("gate" does): PR #1090 trains it with Muon."""
    hp = make_hp(MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, MLP_ACT="swiglu", QUANT_BITS=5)
    model = tg.GPT(hp)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in tg.split_params(model)["matrix"]}
    assert {"blocks.0.mlp.glu.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"} <= matrices
    assert tg.quant_plan(model, hp)["blocks.1.mlp.glu.weight"] == 5


def test_default_mlp_has_no_gate():
    model = tg.GPT(make_hp())
    assert model.blocks[0].mlp.glu is None
    assert not any("glu" in name for name in model.state_dict())


def test_swiglu_model_trains_one_step():
    hp = make_hp(MLP_ACT="swiglu")
    model = randomize_(tg.GPT(hp))
    ids = torch.randint(0, hp.vocab_size, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks[0].mlp.parameters())


def test_gate_and_up_share_one_hessian_and_gptq_quantises_both(cpu_runtime, shard_dir):
    """W_gate and W_up read the same input one after the other: one Hessian object for both, as for
    c_q/c_k/c_v; both get GPTQ at QUANT_BITS."""
    hp = make_hp(VOCAB_SIZE=1024, MODEL_DIM=128, DATA_PATH=str(shard_dir), MLP_ACT="swiglu")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), cpu_runtime)
    hessians = tg.collect_hessians(model, loader, hp, cpu_runtime, batches=2)
    gate, up, down = (f"blocks.1.mlp.{n}.weight" for n in ("glu", "fc", "proj"))
    assert hessians[gate] is hessians[up] and hessians[down] is not hessians[up]
    assert hessians[gate].shape == (128, 128) and hessians[down].shape == (192, 192)  # 2/3 of 2 x 128, to 64
    qstate = tg.Quantizer(model, hessians, hp).qstate()
    W = model.blocks[1].mlp.glu.weight.detach()
    err = tg.output_error(W - qstate[gate].dequantize(), hessians[gate]).sum()
    rtn = tg.output_error(W - tg.rtn_quantize(W, hp.quant_bits).dequantize(), hessians[gate]).sum()
    assert err < rtn


def test_artifact_round_trip_rebuilds_the_swiglu_model():
    """The artifact's settings carry MLP_ACT: a fresh process rebuilds the gated MLP and loads it."""
    hp = make_hp(NUM_LAYERS=3, MODEL_DIM=128, BIGRAM_BUCKETS=64, COMPRESSOR="zstd", MLP_ACT="swiglu")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    blob, _ = tg.fit_artifact(tg.Quantizer(model, {}, hp), 1000, lambda _: None, 16_000_000)
    meta, qstate = tg.decode_artifact(blob, "mem")
    assert meta["settings"]["MLP_ACT"] == "swiglu"
    rebuilt = tg.GPT(tg.Hyperparameters({}).with_model_settings(meta["settings"]))
    tg.load_artifact_weights(rebuilt, qstate, "mem")
    assert rebuilt.blocks[0].mlp.glu is not None
    for name, value in model.state_dict().items():
        assert torch.allclose(rebuilt.state_dict()[name], value, atol=0.05 * value.abs().max() + 1e-3), name
