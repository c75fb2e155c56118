"""Hyperparameters: typed parsing, unknown-variable refusal, presets, resolved lines and hash,
declared bounds and cross-knob validation, --print-config, and where train_gpt.py may read the
process environment."""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_ENV

import train_gpt
from train_gpt import ConfigError, Hyperparameters

SOURCE = (REPO / "train_gpt.py").read_text()


def knob_names_in_source() -> list[str]:
    """Names passed to the knob reader `k("NAME", type, default)` anywhere in class Hyperparameters."""
    tree = ast.parse(SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    names = [
        call.args[0].value
        for call in ast.walk(cls)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "k"
    ]
    assert len(names) > 50, "the knob reader is no longer called k(...); update this scan"
    return names


# ----------------------------------------------------------------------------- defaults & typing


def test_defaults_build_the_record_sized_model():
    hp = Hyperparameters({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads) == (11, 512, 8, 4)
    assert hp.vocab_size == 8192 and hp.head_dim == 64  # R0427's SP8192 CaseOps
    assert hp.tie_embeddings is True and hp.compile is True
    assert isinstance(hp.matrix_lr, float) and isinstance(hp.iterations, int)
    assert hp.preset_name == "none"


def test_every_knob_is_an_attribute_of_its_parsed_type():
    hp = Hyperparameters({})
    assert sorted(hp.knobs) == sorted(knob_names_in_source())
    for name, value in hp.knobs.items():
        assert getattr(hp, name.lower()) == value


def test_values_are_parsed_to_the_knob_type():
    hp = Hyperparameters({"MODEL_DIM": "256", "MATRIX_LR": "0.5", "TIE_EMBEDDINGS": "0", "RUN_ID": "abc"})
    assert hp.model_dim == 256 and type(hp.model_dim) is int
    assert hp.matrix_lr == 0.5 and type(hp.matrix_lr) is float
    assert hp.tie_embeddings is False
    assert hp.run_id == "abc"


@pytest.mark.parametrize(
    ("name", "raw", "type_name"),
    [
        ("MODEL_DIM", "abc", "int"),
        ("NUM_LAYERS", "1.5", "int"),
        ("ITERATIONS", "", "int"),
        ("MATRIX_LR", "fast", "float"),
        ("TIE_EMBEDDINGS", "maybe", "bool"),
        ("COMPILE", "2", "bool"),
    ],
)
def test_bad_value_names_variable_value_and_type(name, raw, type_name):
    with pytest.raises(ConfigError) as err:
        Hyperparameters({name: raw})
    message = str(err.value)
    assert name in message and repr(raw) in message and type_name in message


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", "on", " on "])
def test_bool_true_words(raw):
    assert Hyperparameters({"SMEAR_GATE": raw}).smear_gate is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "NO", "off", "0 "])
def test_bool_false_words(raw):
    assert Hyperparameters({"SMEAR_GATE": raw}).smear_gate is False


# ----------------------------------------------------------------------------- unknown variables


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("NUM_LAYER", "NUM_LAYERS"),
        ("MUON_MOMENTUMM", "MUON_MOMENTUM"),
        ("MATRIX_LRR", "MATRIX_LR"),
        ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"),
        ("EMA_DECAYY", "EMA_DECAY"),
        ("SMEAR_GATES", "SMEAR_GATE"),
        ("ITERATION", "ITERATIONS"),
        ("DATA_PAHT", "DATA_PATH"),
    ],
)
def test_misspelled_knob_is_refused_with_a_suggestion(name, suggestion):
    with pytest.raises(ConfigError) as err:
        Hyperparameters({name: "4"})
    message = str(err.value)
    assert f"unknown setting {name}=" in message
    assert f"did you mean {suggestion}?" in message


@pytest.mark.parametrize(
    "name",
    [
        "PHASED_TTT_ENABLED",
        "GPTQ_CALIB_BATCHES",
        "QAT_START_FRAC",
        "LOOPING_START_FRAC",
        "SKIP_GATES",
        "PARALLEL_RESIDUAL_START",
        "SPARSE_ATTN_GATE",
        "SLIDING_WINDOW_EVAL",
        "ADAM_WD",
    ],
)
def test_knob_of_an_unimplemented_technique_is_refused(name):
    with pytest.raises(ConfigError, match=f"unknown setting {name}="):
        Hyperparameters({name: "1"})


@pytest.mark.parametrize("name", ["NUM_LOOP", "ROW_NORMALIZE", "POLAR_EXPRESS_NS", "BETA2"])
def test_anchor_record_knob_is_refused(name):
    # Knob names of other submissions' scripts that this one does not have: refused, never ignored.
    with pytest.raises(ConfigError, match=f"unknown setting {name}="):
        Hyperparameters({name: "1"})


def test_all_unknown_settings_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Hyperparameters({"NUM_LAYER": "4", "PHASED_TTT_ENABLED": "1"})
    assert "NUM_LAYER=" in str(err.value) and "PHASED_TTT_ENABLED=" in str(err.value)


FOREIGN = {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "PATH": "/usr/bin",
    "HOME": "/root",
    "LD_LIBRARY_PATH": "/usr/lib",
    "TORCHINDUCTOR_CACHE_DIR": "/tmp/x",
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    "TORCH_LOGS": "+dynamo",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "8",
    "RANK": "0",
    "WORLD_SIZE": "8",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "GROUP_RANK": "0",
    "ROLE_RANK": "0",
    "TORCHELASTIC_RUN_ID": "none",
    "NCCL_DEBUG": "INFO",
    "PYTHONPATH": ".",
    "HF_HOME": "/tmp/hf",
    "TRITON_CACHE_DIR": "/tmp/t",
    # real torch variables holding a knob-family word (LOOP, SCALAR, WARMUP, SKIP, MODEL)
    "TORCHINDUCTOR_LOOP_ORDERING_AFTER_FUSION": "1",
    "TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS": "1",
    "TORCHINDUCTOR_DEFAULT_AUTOTUNE_WARMUP": "25",
    "PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK": "1",
    "TORCH_MODEL_ZOO": "/tmp/zoo",
}


def test_environment_of_other_programs_is_accepted():
    hp = Hyperparameters({**FOREIGN, "MODEL_DIM": "256"})
    assert hp.model_dim == 256
    assert set(hp.knobs).isdisjoint(FOREIGN)


def test_lower_case_knob_name_is_refused():
    with pytest.raises(ConfigError, match="NUM_LAYERS"):
        Hyperparameters({"num_layers": "4"})


def test_explicit_dict_ignores_process_environment(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "3")
    monkeypatch.setenv("NUM_LAYER", "3")  # would be refused if os.environ were read
    assert Hyperparameters({}).num_layers == 11


def test_no_argument_reads_process_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {"MODEL_DIM": "256", "OMP_NUM_THREADS": "2"})
    assert Hyperparameters().model_dim == 256


# ----------------------------------------------------------------------------- presets


def test_smoke_preset_applies_its_table():
    hp = Hyperparameters({"RUN_PRESET": "smoke"})
    plain = Hyperparameters({})
    assert hp.preset_name == "smoke" and hp.run_preset == "smoke"
    for name, raw in train_gpt.PRESETS["smoke"].items():
        kind = type(plain.knobs[name])
        assert hp.knobs[name] == train_gpt._parse(name, raw, kind), name
    changed = [n for n in train_gpt.PRESETS["smoke"] if hp.knobs[n] != plain.knobs[n]]
    assert "NUM_LAYERS" in changed and "DATA_PATH" in changed


def test_explicit_env_wins_over_preset():
    hp = Hyperparameters({"RUN_PRESET": "smoke", "NUM_LAYERS": "2", "XSA_LAST_N": "1"})
    assert hp.num_layers == 2 and hp.xsa_last_n == 1
    assert hp.model_dim == int(train_gpt.PRESETS["smoke"]["MODEL_DIM"])


def test_unknown_preset_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as err:
        Hyperparameters({"RUN_PRESET": "smok"})
    assert "'smok'" in str(err.value) and "smoke" in str(err.value)


@pytest.mark.parametrize("preset", sorted(train_gpt.PRESETS))
def test_every_preset_key_is_a_real_knob_and_the_preset_validates(preset):
    knobs = set(knob_names_in_source())
    assert set(train_gpt.PRESETS[preset]) <= knobs
    Hyperparameters({"RUN_PRESET": preset})


# ----------------------------------------------------------------------------- resolved lines & hash


def test_resolved_lines_are_sorted_and_complete():
    hp = Hyperparameters({"MODEL_DIM": "256", "SMEAR_GATE": "off"})
    lines = hp.resolved_lines()
    names = [line.split("=", 1)[0] for line in lines]
    assert names == sorted(names)
    assert names == sorted(knob_names_in_source())
    assert "MODEL_DIM=256" in lines and "SMEAR_GATE=False" in lines and "RUN_PRESET=" in lines


def test_hash_is_eight_hex_digits_of_the_hashed_resolved_lines():
    hp = Hyperparameters({})
    assert re.fullmatch(r"[0-9a-f]{8}", hp.hash())
    hashed = [line for line in hp.resolved_lines() if line.split("=", 1)[0] not in hp.unhashed]
    assert len(hashed) == len(hp.knobs) - len(hp.unhashed)
    assert hp.hash() == hashlib.sha256("\n".join(hashed).encode()).hexdigest()[:8]


def test_records_recomputes_the_hash_from_the_logged_lines():
    """records/logparse.py checks hp_hash against the log's hp: lines and hp_unhashed: list."""
    from records.logparse import hp_hash, parse_text

    hp = Hyperparameters({"RUN_PRESET": "smoke", "SEED": "7", "RUN_ID": "r"})
    header = [f"hp:{line}" for line in hp.resolved_lines()]
    header.append(train_gpt.kv(hp_hash=hp.hash(), hp_unhashed=",".join(hp.unhashed)))
    log = parse_text("\n".join(header))
    assert log["hp_unhashed"] == hp.unhashed and log["hp_hash"] == hp.hash()
    assert hp_hash(log["hp"], log["hp_unhashed"]) == hp.hash()


def test_hash_is_stable_and_changes_with_a_value():
    a = Hyperparameters({"MODEL_DIM": "256", "NUM_LAYERS": "4", "XSA_LAST_N": "4", "NUM_LOOPS": "0"})
    b = Hyperparameters(
        {"XSA_LAST_N": "4", "NUM_LOOPS": "0", "NUM_LAYERS": "4", "MODEL_DIM": "256", **FOREIGN}
    )
    assert a.hash() == b.hash()
    c = Hyperparameters({"MODEL_DIM": "256", "NUM_LAYERS": "4", "XSA_LAST_N": "3", "NUM_LOOPS": "0"})
    assert a.hash() != c.hash()
    assert Hyperparameters({}).hash() != Hyperparameters({"MATRIX_LR": "0.027"}).hash()


def test_hp_hash_names_the_configuration_not_the_run():
    """The seeds of one submission share hp_hash; it used to change with RUN_ID, SEED, ARTIFACT_PATH
    and IGNORE_ENV, so no two runs ever shared it."""
    base = {"RUN_PRESET": "smoke"}
    runs = [
        base,
        {**base, "RUN_ID": "seed2", "SEED": "2", "ARTIFACT_PATH": "/tmp/seed2.ptz"},
        {**base, "RUN_ID": "seed3", "SEED": "3", "LOG_DIR": "elsewhere", "ARTIFACT_DIR": "out"},
        {**base, "IGNORE_ENV": "MYCLOUD_*", "MYCLOUD_JOB": "1"},
        {**base, "EVAL_ONLY": "1", "ARTIFACT_PATH": "final_model_x.ptz"},
        {**train_gpt.PRESETS["smoke"]},  # the preset's values without its name
    ]
    assert len({Hyperparameters(env).hash() for env in runs}) == 1
    for model_change in ({"NUM_LAYERS": "3", "XSA_LAST_N": "3"}, {"MATRIX_LR": "0.02"}, {"DATA_PATH": "d"}):
        assert Hyperparameters({**base, **model_change}).hash() != Hyperparameters(base).hash()


def test_only_run_naming_and_io_knobs_are_unhashed():
    assert Hyperparameters({}).unhashed == [
        "ARTIFACT_DIR",
        "ARTIFACT_PATH",
        "EVAL_ONLY",
        "IGNORE_ENV",
        "LOG_DIR",
        "RUN_ID",
        "RUN_PRESET",
        "SEED",
    ]


def test_readme_marks_exactly_the_unhashed_knobs():
    readme = (REPO / "README.md").read_text()
    hp = Hyperparameters({})
    for name in hp.knobs:
        row = re.search(rf"^\| `{name}` \|.*$", readme, re.M).group(0)
        assert ("not in `hp_hash`" in row) == (name in hp.unhashed), name


def test_same_value_from_preset_or_env_resolves_identically():
    via_preset = Hyperparameters({"RUN_PRESET": "smoke"})
    explicit = Hyperparameters({"RUN_PRESET": "smoke", **train_gpt.PRESETS["smoke"]})
    assert via_preset.resolved_lines() == explicit.resolved_lines()


# ----------------------------------------------------------------------------- bounds & cross-knob validation


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MODEL_DIM": "100"}, "MODEL_DIM must be divisible by NUM_HEADS"),
        ({"NUM_KV_HEADS": "3"}, "NUM_HEADS must be divisible by NUM_KV_HEADS"),
        ({"ROPE_DIMS": "7"}, "ROPE_DIMS must be even"),
        ({"ROPE_DIMS": "66"}, "ROPE_DIMS must be even and at most"),
        ({"ROPE_DIMS": "-2"}, "ROPE_DIMS"),
        ({"XSA_LAST_N": "-1"}, "XSA_LAST_N must be >= 0 (got -1)"),
        ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS must be 0 (off) or >= 2"),
        ({"BIGRAM_BUCKETS": "-1"}, "BIGRAM_BUCKETS must be >= 0 (got -1)"),
        ({"VOCAB_SIZE": "65537"}, "VOCAB_SIZE must be in (0, 65536] (got 65537)"),
        ({"VOCAB_SIZE": "0"}, "VOCAB_SIZE must be in (0, 65536] (got 0)"),
        ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC must be in [0, 1] (got 1.5)"),
        ({"LR_WARMUP_FRAC": "1"}, "LR_WARMUP_FRAC must be in [0, 1) (got 1.0)"),
        ({"ITERATIONS": "0"}, "ITERATIONS must be > 0 (got 0)"),
        ({"TTT_MODE": "ttt"}, "TTT_MODE must be none, chunked, lora or phased (got 'ttt')"),
        ({"GPTQ_DAMP": "nan"}, "GPTQ_DAMP must be > 0 (got nan)"),
        ({"MATRIX_LR": "-0.02"}, "MATRIX_LR must be >= 0 (got -0.02)"),
        ({"MUON_MOMENTUM": "1"}, "MUON_MOMENTUM must be in [0, 1) (got 1.0)"),
        ({"ADAM_EPS": "0"}, "ADAM_EPS must be > 0 (got 0.0)"),
        ({"EMA_DECAY": "1.5"}, "EMA_DECAY must be in [0, 1) (got 1.5)"),
        ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY must be > 0 (got 0)"),
        ({"NUM_LOOPS": "1", "LOOP_END": "11"}, "NUM_LOOPS > 0 needs 0 <= LOOP_START <= LOOP_END"),
        ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS must be at most NUM_LAYERS"),
        ({"QUANT_INT5_LAYERS": "10,11"}, "QUANT_INT5_LAYERS must list block indices < NUM_LAYERS"),
        ({"GPTQ_CLIP_FRACS": "1.0,1.5"}, "GPTQ_CLIP_FRACS must be a comma list of fractions in (0, 1]"),
        ({"GPTQ_CLIP_FRACS": ","}, "GPTQ_CLIP_FRACS must be a comma list of fractions in (0, 1]"),
        ({"EVAL_ONLY": "1"}, "EVAL_ONLY=1 needs ARTIFACT_PATH"),
        (
            {"EXPORT_RESERVE_SECONDS": "600"},
            "EXPORT_RESERVE_SECONDS must be -1 (measured) or in [0, MAX_WALLCLOCK_SECONDS)",
        ),
        ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN"),
        ({"MICROBATCH_TOKENS": "3000"}, "MICROBATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN"),
        ({"SMEAR_GATE_INPUTS": "513"}, "SMEAR_GATE_INPUTS must be at most MODEL_DIM"),
    ],
)
def test_inconsistent_knobs_are_refused(env, fragment):
    with pytest.raises(ConfigError) as err:
        Hyperparameters(env)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "env",
    [
        {"ROPE_DIMS": "0"},
        {"ROPE_DIMS": "64"},
        {"XSA_LAST_N": "0"},
        {"XSA_LAST_N": "11"},
        {"BIGRAM_BUCKETS": "0"},
        {"BIGRAM_BUCKETS": "2"},
        {"VOCAB_SIZE": "65536"},
        {"NUM_KV_HEADS": "8"},
        {"NUM_KV_HEADS": "1"},
        {"WARMDOWN_FRAC": "0"},
        {"WARMDOWN_FRAC": "1"},
        {"SMEAR_GATE_INPUTS": "512"},
        {"LR_WARMUP_FRAC": "0.999"},
        {"QUANT_BITS": "2", "QUANT_EMBED_BITS": "8"},
        {"VOCAB_SIZE": "1"},
        {"GPTQ_DAMP": "1e-12"},
        {"TTT_EPOCHS": "0", "EVAL_SEQ_LEN": "0", "EVAL_BATCH_SEQS": "0", "TTT_FREEZE_BLOCKS": "11"},
        {"NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "10", "PARALLEL_START_LAYER": "0"},
        {"NUM_LOOPS": "0", "LOOP_START": "-1", "LOOP_END": "99"},  # the segment is never used
        {"MAX_WALLCLOCK_SECONDS": "0", "EXPORT_RESERVE_SECONDS": "-5"},  # no budget to reserve from
        {"COMPRESSOR": "lzma", "QUANT_METHOD": "rtn", "TTT_MODE": "none", "EVAL_MODE": "flat"},
    ],
)
def test_boundary_values_are_accepted(env):
    Hyperparameters(env)


BOUNDED = sorted(Hyperparameters({}).bounds.items())


def outside_values(bounds: train_gpt.Bounds, kind: type) -> list[str]:
    """Values just past each declared bound (or not among the choices)."""
    if bounds.choices:
        return ["nope", bounds.choices[0].upper()]
    step = 1 if kind is int else 0.5
    values = []
    if bounds.ge is not None or bounds.gt is not None:
        values.append(bounds.ge - step if bounds.ge is not None else bounds.gt)
    if bounds.le is not None or bounds.lt is not None:
        values.append(bounds.le + step if bounds.le is not None else bounds.lt)
    return [str(v) for v in values]


@pytest.mark.parametrize(("name", "bounds"), BOUNDED, ids=[name for name, _ in BOUNDED])
def test_value_outside_declared_bounds_names_knob_value_and_range(name, bounds):
    kind = type(Hyperparameters({}).knobs[name])
    for raw in outside_values(bounds, kind):
        with pytest.raises(ConfigError) as err:
            Hyperparameters({name: raw})
        value = train_gpt._parse(name, raw, kind)
        assert str(err.value) == f"{name} must be {bounds.describe()} (got {value!r})"


@pytest.mark.parametrize(
    "name", [n for n, b in BOUNDED if not b.choices and type(Hyperparameters({}).knobs[n]) is float]
)
def test_nan_is_outside_every_float_range(name):
    with pytest.raises(ConfigError, match=f"{name} must be .* \\(got nan\\)"):
        Hyperparameters({name: "nan"})


@pytest.mark.parametrize(
    ("bounds", "text", "inside", "outside"),
    [
        (train_gpt.Bounds(gt=0), "> 0", [1, 1e-9, float("inf")], [0, -1, float("nan")]),
        (train_gpt.Bounds(ge=0), ">= 0", [0, 3], [-1, float("nan")]),
        (train_gpt.Bounds(le=8), "<= 8", [8, -9], [9]),
        (train_gpt.Bounds(lt=1), "< 1", [0.99], [1]),
        (train_gpt.Bounds(ge=2, le=8), "in [2, 8]", [2, 8], [1, 9]),
        (train_gpt.Bounds(ge=0, lt=1), "in [0, 1)", [0, 0.5], [1, -0.1]),
        (train_gpt.Bounds(gt=0, le=65536), "in (0, 65536]", [1, 65536], [0, 65537]),
        (train_gpt.Bounds(choices=("a", "b", "c")), "a, b or c", ["a", "c"], ["d", "A", ""]),
        (train_gpt.Bounds(choices=("raw", "packed")), "raw or packed", ["raw"], ["Raw"]),
        (train_gpt.Bounds(choices=("only",)), "only", ["only"], ["other"]),
    ],
)
def test_bounds_allow_and_describe(bounds, text, inside, outside):
    assert bounds.describe() == text
    assert all(bounds.allows(v) for v in inside)
    assert not any(bounds.allows(v) for v in outside)


def test_readme_range_column_is_each_knobs_declared_bounds():
    readme = (REPO / "README.md").read_text()
    hp = Hyperparameters({})
    for name in hp.knobs:
        row = re.search(rf"^\| `{name}` \| \w+ \| `[^`]*` \| ([^|]*) \|", readme, re.M)
        assert row, f"{name} has no README row with a range column"
        bounds = hp.bounds.get(name)
        expected = f"`{bounds.describe()}`" if bounds else "any"
        if name == "RUN_PRESET":  # checked against PRESETS before any knob is read
            expected = "a preset or empty"
        assert row.group(1) == expected, name


@pytest.mark.parametrize("name", ["NUM_HEADS", "NUM_KV_HEADS", "TRAIN_SEQ_LEN"])
def test_zero_divisor_knob_is_a_config_error(name):
    with pytest.raises(ConfigError, match=name):
        Hyperparameters({name: "0"})


def test_init_runtime_refuses_batch_that_does_not_split_over_ranks(monkeypatch):
    hp = Hyperparameters({"TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "64", "MICROBATCH_TOKENS": "32"})
    monkeypatch.setenv("WORLD_SIZE", "4")  # 16 tokens per rank: less than one 32-token micro-batch
    with pytest.raises(ConfigError, match="WORLD_SIZE=4"):
        train_gpt.init_runtime(hp)


def test_init_runtime_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    hp = Hyperparameters(
        {"TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "128", "MICROBATCH_TOKENS": "32", "RUN_ID": "x"}
    )
    rt = train_gpt.init_runtime(hp)
    assert (rt.rank, rt.world_size, rt.grad_accum_steps, rt.run_id) == (0, 1, 4, "x")
    assert rt.is_main and not rt.distributed
    assert rt.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


# ----------------------------------------------------------------------------- --print-config


@pytest.mark.parametrize("env", [{"RUN_PRESET": "smoke"}, TINY_ENV], ids=["smoke", "tiny"])
def test_print_config_prints_settings_hash_and_model_params(env, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", dict(env))
    assert train_gpt.main(["--print-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    hp = Hyperparameters(env)
    assert out[:-2] == hp.resolved_lines()
    assert out[-2] == f"hp_hash:{hp.hash()} hp_unhashed:{','.join(hp.unhashed)}"
    built = train_gpt.GPT(hp)  # on CPU, as training builds it before moving it to the device
    assert out[-1] == f"model_params:{sum(p.numel() for p in built.parameters())}"
    assert os.listdir(tmp_path) == []  # no log, no artifact


def test_training_logs_model_params_as_print_config_counts():
    assert "model_params=model_params(model)" in inspect.getsource(train_gpt.run)


def test_print_config_reads_no_data_and_writes_nothing(tmp_path):
    """A fresh process in a folder without data: the smoke preset's DATA_PATH does not exist here."""
    script = str(REPO / "train_gpt.py")
    env = {k: v for k, v in os.environ.items() if not train_gpt._looks_like_ours(k, set())}
    env.update(RUN_PRESET="smoke", SEED="5", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, script, "--print-config"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "SEED=5" in lines and "NUM_LAYERS=4" in lines
    assert lines[-2].startswith(f"hp_hash:{Hyperparameters({'RUN_PRESET': 'smoke'}).hash()} ")
    assert re.fullmatch(r"model_params:\d+", lines[-1])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["--print-config", "extra"], ["--print-configs"], ["--iterations=5"]])
def test_unknown_arguments_are_still_refused(args, monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", {})
    assert train_gpt.main(args) == 2
    assert "settings are env vars" in capsys.readouterr().err


def test_print_config_refuses_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", {"QUANT_BITS": "9"})
    assert train_gpt.main(["--print-config"]) == 2
    assert "config error: QUANT_BITS must be in [2, 8] (got 9)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- environment access


def environment_reads(source: str) -> list[tuple[str, str | None]]:
    """(enclosing class/function path, constant key or None) for every os.environ / os.getenv use."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = []
    for node in ast.walk(tree):
        is_os = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
        if not (is_os and node.attr in ("environ", "getenv", "putenv", "unsetenv")):
            continue
        key, up = None, parents[node]
        if isinstance(up, ast.Attribute) and isinstance(parents[up], ast.Call):  # os.environ.get("K")
            up = parents[up]
        if isinstance(up, ast.Call) and up.args and isinstance(up.args[0], ast.Constant):  # os.getenv("K")
            key = up.args[0].value
        if isinstance(up, ast.Subscript) and isinstance(up.slice, ast.Constant):  # os.environ["K"]
            key = up.slice.value
        scope, cur = [], node
        while cur in parents:
            cur = parents[cur]
            if isinstance(cur, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                scope.append(cur.name)
        reads.append((".".join(reversed(scope)) or "<module>", key))
    return reads


def test_environment_is_read_only_by_hyperparameters_and_for_torchrun_ranks():
    reads = environment_reads(SOURCE)
    outside = sorted((scope, key) for scope, key in reads if not scope.startswith("Hyperparameters"))
    assert outside == [
        ("init_runtime", "LOCAL_RANK"),
        ("init_runtime", "RANK"),
        ("init_runtime", "WORLD_SIZE"),
    ]
    assert any(scope == "Hyperparameters.__init__" for scope, _ in reads)


def test_environment_scan_notices_a_stray_read():
    stray = SOURCE + '\n\ndef sneaky():\n    return os.environ.get("NUM_LAYERS")\n'
    reads = environment_reads(stray)
    assert ("sneaky", "NUM_LAYERS") in reads


def test_environment_is_not_imported_under_another_name():
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            pytest.fail(f"from os import {[a.name for a in node.names]} hides environment reads")
        if isinstance(node, ast.Import):
            assert all(a.asname is None for a in node.names if a.name == "os")


def test_xsa_last_n_beyond_the_depth_means_every_layer():
    small = {"NUM_LAYERS": "3", "MODEL_DIM": "128", "NUM_LOOPS": "0"}
    model = train_gpt.GPT(Hyperparameters({**small, "XSA_LAST_N": "11"}))
    assert all(block.attn.xsa for block in model.blocks)
    model = train_gpt.GPT(Hyperparameters({**small, "XSA_LAST_N": "1"}))
    assert [block.attn.xsa for block in model.blocks] == [False, False, True]


# ------------------------------------------------------------------ platform variables & IGNORE_ENV

# Set by cloud images and build tools: each once stopped every rank with a config error.
PLATFORM_ENV = [
    "FLASH_ATTENTION_SKIP_CUDA_BUILD",
    "CMAKE_BUILD_PARALLEL_LEVEL",
    "NVTE_FLASH_ATTN",
    "TRAINING_JOB_NAME",
    "SM_TRAINING_ENV",
    "MODELOPT_VERSION",
    "UV_SKIP_WHEEL_FILENAME_CHECK",
]


@pytest.mark.parametrize("name", PLATFORM_ENV)
def test_build_tool_and_platform_variables_pass(name):
    hp = Hyperparameters({name: "1", "MODEL_DIM": "256"})
    assert hp.model_dim == 256 and hp.ignored_env == []


def test_no_knob_is_mistaken_for_another_programs_variable():
    assert [n for n in Hyperparameters({}).knobs if train_gpt._owned_elsewhere(n)] == []


# Names chosen to stay unknown as knobs are added (a TTT_EPOCHS knob may land; TTT_EPOCHZ will not).
@pytest.mark.parametrize("name", ["TTT_EPOCHZ", "MUON_MOMENTUMM", "XSA_LAST", "EVAL_STRIDEE", "QAT_STRAT"])
def test_typos_and_foreign_record_knobs_are_still_refused(name):
    with pytest.raises(ConfigError, match=f"unknown setting {name}="):
        Hyperparameters({name: "1", **{p: "1" for p in PLATFORM_ENV}})


def test_ignore_env_lets_listed_names_through_and_reports_them():
    env = {"TTT_EPOCHZ": "3", "MYCLOUD_LOOP_ID": "7", "MYCLOUD_EMA": "1", "XSA_LAST": "2"}
    hp = Hyperparameters(dict(env, IGNORE_ENV="TTT_EPOCHZ, MYCLOUD_*,XSA_LAST"))
    assert hp.ignored_env == ["MYCLOUD_EMA", "MYCLOUD_LOOP_ID", "TTT_EPOCHZ", "XSA_LAST"]
    with pytest.raises(ConfigError, match="unknown setting XSA_LAST="):
        Hyperparameters(dict(env, IGNORE_ENV="TTT_EPOCHZ,MYCLOUD_*"))


def test_ignore_env_may_not_hide_a_real_knob():
    with pytest.raises(ConfigError, match=r"IGNORE_ENV lists knobs of this script \['NUM_LAYERS'\]"):
        Hyperparameters({"NUM_LAYERS": "3", "IGNORE_ENV": "NUM_LAYERS"})


def test_did_you_mean_names_only_a_close_knob():
    known = {"VOCAB_SIZE", "VAL_BATCH_TOKENS", "VAL_LOSS_EVERY", "MUON_MOMENTUM", "XSA_LAST_N", "TTT_EPOCHS"}
    assert train_gpt.did_you_mean("EVAL_STRIDE", known) is None  # plain similarity said VOCAB_SIZE
    assert train_gpt.did_you_mean("MUON_MOMENTUMM", known) == "MUON_MOMENTUM"
    assert train_gpt.did_you_mean("XSA_LAST", known) == "XSA_LAST_N"
    assert train_gpt.did_you_mean("TTT_EPOCH", known) == "TTT_EPOCHS"
    assert train_gpt.did_you_mean("ttt_epochs", known) == "TTT_EPOCHS"
