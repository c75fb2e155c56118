"""The defaults are R0427's configuration; the March stack and the presets that predate R0427 keep theirs."""

from __future__ import annotations

import pytest

import train_gpt as tg

# Knobs that turn on a technique R0427 runs and the March stack does not (with the March value).
R0427_TECHNIQUES = {
    "CASEOPS_ENABLED": False,
    "NUM_LOOPS": 0,
    "PARALLEL_START_LAYER": 0,
    "SPARSE_ATTN_GATE_ENABLED": False,
    "SKIP_GATES_ENABLED": False,
    "VARLEN_ATTN": False,
    "MUON_POLAR_EXPRESS": False,
    "MIN_LR": 0.0,
    "FUSED_MLP_ENABLED": False,
    "FUSED_CE_ENABLED": False,
    "LQER_ENABLED": False,
    "GATED_ATTN_QUANT_GATE": False,
    "TTT_MODE": "chunked",
}
# The presets written against the March defaults, and which R0427 techniques each runs itself.
OWN_TECHNIQUES = {
    "march": set(),
    "smoke": set(),
    "smoke_caseops": {"CASEOPS_ENABLED"},
    "record_0323": set(),
    "record_0409": {"NUM_LOOPS", "SKIP_GATES_ENABLED"},
    "seed_638": set(),
    "seed_1125": set(),
    "seed_1485_legal": {"NUM_LOOPS"},
    "seed_687": set(),
    "seed_2": {"TTT_MODE"},  # per-document LoRA TTT (PR #1090)
}


def resolved(preset: str = "") -> dict[str, object]:
    knobs = dict(tg.Hyperparameters({"RUN_PRESET": preset} if preset else {}).knobs)
    knobs.pop("RUN_PRESET")
    return knobs


# Where the defaults keep our closest equivalent: R0427's per-group lrzip needs a system binary that
# a bare GPU image lacks (RUN_PRESET=record_0427 asks for it, and a run without it stops at once).
DEFAULTS_NOT_R0427 = {"COMPRESSOR"}


def test_defaults_are_the_record_0427_preset():
    defaults, record = resolved(), resolved("record_0427")
    assert {name for name in defaults if defaults[name] != record[name]} == DEFAULTS_NOT_R0427


def test_march_preset_restores_the_march_stack_at_full_size():
    knobs = resolved("march")
    assert (knobs["VOCAB_SIZE"], knobs["MLP_MULT"], knobs["BIGRAM_BUCKETS"]) == (1024, 3.0, 3072)
    assert knobs["VALUE_RESIDUAL"] and knobs["GATED_ATTN"]
    assert {name: knobs[name] for name in R0427_TECHNIQUES} == R0427_TECHNIQUES
    with tg.torch.device("meta"):
        assert tg.model_params(tg.GPT(tg.Hyperparameters({"RUN_PRESET": "march"}))) == 26_948_306


@pytest.mark.parametrize("preset", sorted(OWN_TECHNIQUES))
def test_presets_before_r0427_run_none_of_its_techniques_they_do_not_name(preset):
    knobs = resolved(preset)
    leaked = {
        name: knobs[name]
        for name, march_value in R0427_TECHNIQUES.items()
        if name not in OWN_TECHNIQUES[preset] and knobs[name] != march_value
    }
    assert not leaked, f"RUN_PRESET={preset} picked up R0427 defaults: {leaked}"


def test_every_knob_the_defaults_changed_is_in_the_march_stack():
    march, defaults = resolved("march"), resolved()
    changed = {name for name in defaults if march[name] != defaults[name]}
    assert changed == set(tg.MARCH_STACK)


@pytest.mark.parametrize(
    ("path", "command"),
    [
        ("./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "sp8192_caseops"),
        ("./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", "sp8192_caseops"),
        ("./data/datasets/fineweb10B_sp1024", "sp1024"),
        ("./data/tokenizers/fineweb_4096_bpe.model", "sp4096"),
        ("my/own/shards", "sp<VOCAB_SIZE>"),
    ],
)
def test_missing_data_names_the_download_that_fetches_it(path, command):
    assert tg.download_command(path) == f"`python3 -m data.download --variant {command}`"


def test_default_run_without_data_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hp = tg.Hyperparameters({})
    with pytest.raises(tg.DataError, match="--variant sp8192_caseops"):
        tg.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    with pytest.raises(tg.DataError, match="--variant sp8192_caseops"):
        tg.find_shards(hp.data_path, "train")


TINY_WIDTH = {"MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "4", "VOCAB_SIZE": "64"}
TINY_WIDTH |= {"BIGRAM_DIM": "8", "VE_DIM": "8", "COMPILE": "0"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NUM_LAYERS": "6"},  # PARALLEL_START_LAYER=8 lies past the last block: no two-lane block
        {"RUN_PRESET": "march"},
        {"RUN_PRESET": "record_0323"},
        {"RUN_PRESET": "record_0409"},
    ],
    ids=["defaults", "defaults_6_layers", "march", "record_0323", "record_0409"],
)
def test_every_trainable_parameter_gets_a_gradient(env):
    """DistributedDataParallel stops the run at the first step in which a trainable parameter got no
    gradient; the defaults shrunk below PARALLEL_START_LAYER used to keep unused lane lambdas."""
    hp = tg.Hyperparameters({**env, **TINY_WIDTH})
    tg.torch.manual_seed(0)
    model = tg.GPT(hp)
    ids = tg.torch.randint(0, hp.vocab_size, (2, 33))
    for looping in (False, True):  # before and after ENABLE_LOOPING_AT
        model.zero_grad(set_to_none=True)
        model.looping = looping
        model(ids[:, :-1], ids[:, 1:]).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"looping={looping}: no gradient for {missing}"
