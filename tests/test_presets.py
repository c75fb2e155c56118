"""Pull-request presets: seed_687 (PR #687's Hedge mixer + chunked TTT stack, normalised) and seed_2
(PR #1090's 11-layer XSA + LoRA TTT stack on one GPU). Each resolves, builds the parameter count its
source states, holds the source's key settings, lists what it lacks, and its evaluation stack runs
legally on a tiny model of the same settings.
"""

import numpy as np
import pytest
import torch
from conftest import randomize_
from test_eval import V, random_tokens, val_data

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# model_params of each source: PR #687's seed logs; PR #1090's train_gpt.py (11 layers of SwiGLU
# with hidden 1024; its train.log counts a BigramHash its script no longer builds).
PARAMS = {"seed_687": 33_317_980, "seed_2": 26_502_232}

KEY_SETTINGS = {
    "seed_687": dict(
        vocab_size=1024,
        num_layers=11,
        num_kv_heads=8,
        mlp_mult=3.5,
        mlp_act="leaky_relu_sq",
        leaky_relu_slope=0.5,
        xsa_last_n=11,
        bigram_buckets=6144,
        bigram_dim=128,
        ve_enabled=True,
        ve_layers="9,10",
        value_residual=False,
        gated_attn=False,
        smear_gate_form="channel",
        qat_start_lr_scale=0.5,
        quant_bits=5,
        eval_stride=32,
        ttt_mode="chunked",
        ttt_optimizer="adamw",
        ttt_lr=0.0001,
        ttt_epochs=3,
        ttt_chunk_tokens=131072,
        ttt_freeze_blocks=9,
        ngram_mix=True,
        hedge_lr=0.1,
        ngram_buckets=65536,
    ),
    "seed_2": dict(
        vocab_size=1024,
        num_layers=11,
        num_kv_heads=4,
        mlp_mult=3.0,
        mlp_act="swiglu",
        xsa_last_n=4,
        rope_dims=64,
        ln_scale=False,
        value_residual=False,
        gated_attn=False,
        bigram_buckets=0,
        smear_gate_form="channel",
        matrix_lr=0.04,
        muon_momentum=0.95,
        muon_wd=0.0,
        ema_window_frac=0.0,
        train_batch_tokens=524288,
        max_wallclock_seconds=4850.0,
        quant_method="rtn",
        ttt_mode="lora",
        ttt_lora_rank=8,
        ttt_lora_alpha=1.0,
        ttt_lora_lr=0.05,
        ttt_lora_chunk=256,
        ttt_beta2=0.999,
        ngram_mix=False,
    ),
}

# A tiny shape for running each preset's evaluation stack; everything else stays the preset's.
TINY_SHAPE = dict(
    VOCAB_SIZE=str(V),
    NUM_LAYERS="2",
    MODEL_DIM="32",
    NUM_HEADS="2",
    NUM_KV_HEADS="2",
    ROPE_DIMS="16",
    BIGRAM_BUCKETS="16",
    BIGRAM_DIM="8",
    VE_DIM="8",
    VE_LAYERS="1",
    TTT_FREEZE_BLOCKS="1",  # the last block trains, as seed_687 trains the last 2 of 11
    TRAIN_SEQ_LEN="16",
    TRAIN_BATCH_TOKENS="64",
    MICROBATCH_TOKENS="32",
    VAL_BATCH_TOKENS="64",
    COMPILE="0",
)
TINY_EVAL = dict(  # chunks and documents small enough that a 208-token stream adapts several times
    EVAL_STRIDE="4",
    EVAL_BATCH_SEQS="3",
    TTT_CHUNK_TOKENS="40",
    TTT_BATCH_SEQS="2",
    TTT_LORA_CHUNK="8",
    TTT_LORA_DOCS="3",
    NGRAM_BUCKETS="32",
    NGRAM_WARMUP_TOKENS="0",
    NGRAM_CHECK_NORM="1",  # seed_687's mixture checked to be a distribution at every scored position
)


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_preset_builds_its_sources_parameter_count(preset):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    with torch.device("meta"):
        assert tg.model_params(tg.GPT(hp)) == PARAMS[preset]


@pytest.mark.parametrize("preset", sorted(KEY_SETTINGS))
def test_preset_states_its_sources_key_settings(preset):
    hp = tg.Hyperparameters({"RUN_PRESET": preset})
    want = KEY_SETTINGS[preset]
    assert {name: getattr(hp, name) for name in want} == want


def test_seed_687_rope_base_is_its_ntk_rescaled_base():
    """Its Rotary is built for 1024 tokens and rescales at 2048: base * 2 ** (16 / 14), as R0323's."""
    hp = tg.Hyperparameters({"RUN_PRESET": "seed_687"})
    assert hp.rope_base == tg.Hyperparameters({"RUN_PRESET": "record_0323"}).rope_base


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_print_config_names_what_the_preset_lacks(preset, capsys):
    tg.print_config(tg.Hyperparameters({"RUN_PRESET": preset}))
    lines = capsys.readouterr().out.splitlines()
    assert f"model_params:{PARAMS[preset]}" in lines
    assert [line for line in lines if line.startswith("preset_missing:")] == [
        f"preset_missing:{','.join(tg.PRESET_MISSING[preset])}"
    ]


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_preset_pins_what_the_script_defaults_may_change(preset):
    """Built on the March stack: every knob whose default R0427 moved is in the table (inherited from
    MARCH_STACK or written out), so the preset never runs a default it does not name."""
    assert set(tg.MARCH_STACK) <= set(tg.PRESETS[preset])


def tiny_scores(preset: str, rt: tg.Runtime, **knobs) -> tuple[tg.Hyperparameters, dict]:
    """A tiny model of the preset's settings: one training step's loss is finite, then the whole
    evaluation stack of the preset scores a 208-token stream."""
    hp = tg.Hyperparameters({"RUN_PRESET": preset, **TINY_SHAPE, **TINY_EVAL, **knobs})
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    ids = torch.randint(2, V, (2, 17))
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    model.zero_grad(set_to_none=True)
    tokens = random_tokens()
    return hp, tg.score_model(model, val_data(tokens), hp, rt, lambda _: None)


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_tiny_model_with_the_presets_settings_trains_and_scores_legally(preset, cpu_runtime):
    hp, out = tiny_scores(preset, cpu_runtime)
    final = hp.ttt_mode + ("+ngram_mix" if hp.ngram_mix else "")
    assert out["eval_mode"] == final and out["ttt_mode"] == hp.ttt_mode and np.isfinite(out["val_bpb"])
    assert out["scored_before_update"] is True and out["scored_tokens"] == len(random_tokens()) - 1
    # the stream adapted, not only scored
    if hp.ttt_mode == "chunked":
        assert out["ttt_chunks_trained"] > 0
    else:
        _, frozen = tiny_scores(preset, cpu_runtime, TTT_LORA_LR="0")
        assert out["val_bpb_lora"] != frozen["val_bpb_lora"]
