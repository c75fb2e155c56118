"""Training-loop behaviour: schedule, EMA, distributed equivalence and the end-to-end smoke run."""

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "sample" / "sample_1024_bpe.model"
SAMPLE = ROOT / "data" / "sample" / "sample_wiki.jsonl.xz"

# A model small enough that a few optimizer steps take well under a second on 2 CPU cores.
TINY = {
    **tg.MARCH_STACK,  # written for the March stack (the defaults run R0427's)
    "NUM_LAYERS": "3",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "XSA_LAST_N": "3",
    "BIGRAM_BUCKETS": "256",
    "BIGRAM_DIM": "16",
    "TRAIN_SEQ_LEN": "64",
    "VAL_BATCH_TOKENS": "4096",
    "WARMUP_STEPS": "0",
    "TRAIN_LOG_EVERY": "1",
    "BYTE_CHECK_DOCS": "8",
    "GPTQ_CALIB_TOKENS": "2048",
    # No eval-budget fallback on a slow machine: which passes run must not depend on its load.
    "EVAL_BUDGET_S": "1000000",
}


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> Path:
    """Real-text shards from the bundled sample: 20 val documents, 200 train documents."""
    out = tmp_path_factory.mktemp("shards")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(220), f, strict=False)]

    def stream(texts):
        return np.concatenate([np.array([tg.BOS_ID, *ids], dtype=np.uint16) for ids in sp.encode(texts)])

    tg.write_shard(out / "fineweb_val_000000.bin", stream(docs[:20]))
    tg.write_shard(out / "fineweb_train_000000.bin", stream(docs[20:120]))
    tg.write_shard(out / "fineweb_train_000001.bin", stream(docs[120:]))
    return out


def run_script(env: dict[str, str], tmp_path: Path, nproc: int = 1, timeout: int = 600) -> tuple[dict, str]:
    """Runs train_gpt.py in a subprocess (torchrun for nproc > 1); returns (final JSON, log text)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    full.update(env, LOG_DIR=str(tmp_path / "logs"), ARTIFACT_DIR=str(tmp_path / "art"), OMP_NUM_THREADS="1")
    script = str(ROOT / "train_gpt.py")
    cmd = [sys.executable, script]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
        ]
    proc = subprocess.run(cmd, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "logs" / f"{env['RUN_ID']}.txt").read_text()
    final = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    return final, log


def run_raw(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """train_gpt.py with extra env vars and arguments, for runs expected to stop early."""
    full = dict(os.environ, LOG_DIR=str(tmp_path / "logs"), **env)
    cmd = [sys.executable, str(ROOT / "train_gpt.py"), *args]
    return subprocess.run(cmd, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_lr_schedule_shape():
    hp = tg.Hyperparameters({"WARMDOWN_FRAC": "0.5", "LR_WARMUP_FRAC": "0.1", "MIN_LR": "0"})
    assert tg.lr_multiplier(0.0, hp) == 0.0
    assert tg.lr_multiplier(0.05, hp) == pytest.approx(0.5)
    assert tg.lr_multiplier(0.3, hp) == 1.0
    assert tg.lr_multiplier(0.75, hp) == pytest.approx(0.5)
    assert tg.lr_multiplier(1.0, hp) == 0.0
    floor = tg.Hyperparameters({"WARMDOWN_FRAC": "0.5", "MIN_LR": "0.1"})
    assert tg.lr_multiplier(0.99, floor) == pytest.approx(0.1)


def test_warmdown_starts_at_one_minus_its_fraction():
    """WARMDOWN_FRAC=0.3: warmdown covers [0.7, 1]; a start at 0.3 (frac for 1-frac) would show."""
    hp = tg.Hyperparameters({"WARMDOWN_FRAC": "0.3", "MIN_LR": "0"})
    assert tg.lr_multiplier(0.5, hp) == 1.0
    assert tg.lr_multiplier(0.69, hp) == 1.0
    assert tg.lr_multiplier(0.85, hp) == pytest.approx(0.5)
    assert tg.lr_multiplier(0.94, hp) == pytest.approx(0.2)


def test_loader_resumes_across_a_shard_boundary(tmp_path):
    """Saved in the first shard, restored after the stream moved to the second (prime_compile's
    case): the restored stream must reload the first shard and give the same tokens again."""
    files = [tmp_path / f"fineweb_train_00000{i}.bin" for i in range(2)]
    for i, path in enumerate(files):
        tg.write_shard(path, np.arange(100) + 100 * i)
    stream = tg.TokenStream(files)
    stream.take(90)
    saved = stream.state_dict()
    first = stream.take(30)  # 90..119: crosses into the second shard
    assert stream.state_dict()["file_idx"] == 1
    stream.load_state_dict(saved)
    np.testing.assert_array_equal(stream.take(30), first)
    np.testing.assert_array_equal(first, np.arange(90, 120))


def test_progress_follows_the_wallclock_and_finishes_warmdown_at_the_cut():
    """A run cut by the clock must have finished its warmdown: the fraction is time-based."""
    hp = tg.Hyperparameters(
        {
            **tg.MARCH_STACK,
            "MAX_WALLCLOCK_SECONDS": "101",
            "EXPORT_RESERVE_SECONDS": "1",
            "ITERATIONS": "1000000",
        }
    )
    assert tg.train_budget_ms(hp) == 100_000  # the export reserve is not training time
    half = tg.TrainState(step=10, train_ms=50_000)
    assert tg.progress(half, hp) == pytest.approx(0.5)
    cut = tg.TrainState(step=20, train_ms=100_000)
    assert tg.progress(cut, hp) == 1.0
    assert tg.lr_multiplier(tg.progress(cut, hp), hp) == 0.0
    steps_only = tg.Hyperparameters({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "40"})
    assert tg.progress(tg.TrainState(step=10, train_ms=1e9), steps_only) == pytest.approx(0.25)


def test_muon_momentum_warmup():
    hp = tg.Hyperparameters({**tg.MARCH_STACK, "MUON_MOMENTUM_WARMUP_FRAC": "0.2"})
    assert tg.muon_momentum(0.0, hp) == pytest.approx(0.92)
    assert tg.muon_momentum(0.1, hp) == pytest.approx(0.955)
    assert tg.muon_momentum(0.5, hp) == pytest.approx(0.99)


def test_ema_forgets_the_initial_weights_on_short_runs():
    model = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = tg.EMA(model, decay=0.997, window_frac=0.05)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update(model, expected_steps=100_000)
    # A plain 0.997 EMA would still hold 0.997**100 = 74% of the zero init here.
    torch.testing.assert_close(ema.shadow["weight"], torch.ones(4, 4))
    target = torch.nn.Linear(4, 4, bias=False)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])


def test_ema_tracks_with_full_decay_late_in_the_run():
    model = torch.nn.Linear(2, 2, bias=False)
    ema = tg.EMA(model, decay=0.9, window_frac=0.05)
    ema.updates = 10_000
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, expected_steps=100_000)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.1)


def test_ema_horizon_is_a_fraction_of_the_run():
    ema = tg.EMA(torch.nn.Linear(2, 2), decay=0.997, window_frac=0.05)
    ema.updates = 500
    assert ema.decay_at(expected_steps=1000) == pytest.approx(0.98)  # 1-GPU, 4-minute run
    assert ema.decay_at(expected_steps=7000) == pytest.approx(0.997)  # 8-GPU, 10-minute run: capped
    assert tg.EMA(torch.nn.Linear(2, 2), 0.997, window_frac=0.0).decay_at(1000) == 0.0  # EMA off


def test_expected_steps_extrapolates_the_schedule():
    hp = tg.Hyperparameters(
        {"MAX_WALLCLOCK_SECONDS": "100", "EXPORT_RESERVE_SECONDS": "0", "ITERATIONS": "1000000"}
    )
    assert tg.expected_steps(tg.TrainState(step=50, train_ms=25_000), hp) == pytest.approx(200)
    assert tg.expected_steps(tg.TrainState(), hp) == 1_000_000


def test_loader_spans_are_disjoint_and_resumable(sample_shards):
    files = tg.find_shards(str(sample_shards), "train")
    rts = [tg.Runtime(r, 2, r, torch.device("cpu"), 1, "t") for r in range(2)]
    loaders = [tg.DistributedTokenLoader(files, rt) for rt in rts]
    (x0, y0), (x1, y1) = (ld.next_batch(256, 64) for ld in loaders)
    single = tg.DistributedTokenLoader(files, tg.Runtime(0, 1, 0, torch.device("cpu"), 2, "t"))
    a, b = single.next_batch(256, 64), single.next_batch(256, 64)
    torch.testing.assert_close(x0, a[0])
    torch.testing.assert_close(x1, b[0])
    torch.testing.assert_close(y1, b[1])
    state = single.stream.state_dict()
    nxt = single.next_batch(256, 64)
    single.stream.load_state_dict(state)
    torch.testing.assert_close(single.next_batch(256, 64)[0], nxt[0])


def tiny_env(shards: Path, **overrides: str) -> dict[str, str]:
    """TINY on the sample shards, validating only at the end."""
    return dict(TINY, DATA_PATH=str(shards), TOKENIZER_PATH=str(TOKENIZER), VAL_LOSS_EVERY="0", **overrides)


def test_two_process_gloo_run_matches_one_process_with_accumulation(sample_shards, tmp_path):
    common = tiny_env(
        sample_shards,
        ITERATIONS="4",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="1024",
        MICROBATCH_TOKENS="512",
    )
    one, _ = run_script(dict(common, RUN_ID="one"), tmp_path / "one")
    two, log = run_script(dict(common, RUN_ID="two"), tmp_path / "two", nproc=2)
    assert "world_size:2 grad_accum_steps:1" in log
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two["raw_val_bpb"] == pytest.approx(one["raw_val_bpb"], rel=1e-4)


SKEWED_CLOCK_RUN = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import train_gpt as tg

hp = tg.Hyperparameters(json.loads(sys.argv[2]))
rt = tg.init_runtime(hp)
# Deterministic clocks that disagree: each reading advances rank 0's by 0.1 s and rank 1's by 0.3 s,
# as if rank 1's steps took 3x longer. The step count then depends on no machine's load.
readings = [0]
def skewed_clock(per_reading=0.3 if rt.rank == 1 else 0.1):
    readings[0] += 1
    return readings[0] * per_reading
time.perf_counter = skewed_clock
torch.manual_seed(hp.seed)
model, train_model, _ = tg.build_model(hp, rt)
loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), rt)
optimizers = tg.build_optimizers(model, hp, rt)
ema = tg.EMA(model, hp.ema_decay, hp.ema_window_frac)
state = tg.train(model, train_model, optimizers, loader, None, ema, hp, rt, tg.Logger(None))
torch.save({"steps": state.step, "weights": model.state_dict()}, f"{sys.argv[3]}/rank{rt.rank}.pt")
torch.distributed.destroy_process_group()
tg.exit_without_finalization(0)  # as train_gpt.main ends a distributed rank
"""


def test_ranks_keep_identical_weights_when_their_clocks_disagree(sample_shards, tmp_path):
    """The schedule is wallclock-based; every rank must read the same clock, or each applies its
    own LR (and looping switch) to the same averaged gradient and the replicas drift apart."""
    env = tiny_env(
        sample_shards,
        ITERATIONS="100000",
        MAX_WALLCLOCK_SECONDS="3",  # about 60 steps on the fake clocks below, whatever the load
        EXPORT_RESERVE_SECONDS="0",
        TRAIN_BATCH_TOKENS="1024",
        MICROBATCH_TOKENS="512",
        NUM_LOOPS="1",
        LOOP_START="1",
        LOOP_END="1",
    )
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_CLOCK_RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), str(ROOT), json.dumps(env), str(tmp_path)]
    full = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] > 2
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], value, rtol=0, atol=0, msg=name)


def test_wallclock_cut_stops_the_run_with_warmdown_done(sample_shards, tmp_path):
    env = tiny_env(
        sample_shards,
        RUN_ID="cut",
        ITERATIONS="100000",
        MAX_WALLCLOCK_SECONDS="5",
        EXPORT_RESERVE_SECONDS="1",
        TRAIN_BATCH_TOKENS="512",
        MICROBATCH_TOKENS="512",
    )
    final, log = run_script(env, tmp_path)
    assert final["stopped_by_clock"] is True
    assert "stopping_early:wallclock_cap" in log
    # No overrun and a finished warmdown depend on real step times here (a loaded machine makes
    # one step slower than the last); tests/test_step_syncs.py checks both on a deterministic clock.


def test_smoke_run_end_to_end(sample_shards, tmp_path):
    """The smoke preset trains, validates (val_bpb falls), saves the artifact and logs the JSON."""
    env = {"RUN_PRESET": "smoke", "DATA_PATH": str(sample_shards), "TOKENIZER_PATH": str(TOKENIZER)}
    env.update(RUN_ID="smoke", ITERATIONS="40", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="20")
    env.update(EVAL_BUDGET_S="1000000")  # the same passes run whatever the machine's load
    final, log = run_script(env, tmp_path)
    vals = [
        float(line.split("val_bpb:")[1].split()[0])
        for line in log.splitlines()
        if line.startswith("step:") and "val_bpb:" in line
    ]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3
    assert "preset:smoke" in log and "hp:RUN_PRESET=smoke" in log
    for key in (
        "run_id",
        "seed",
        "script_sha256",
        "world_size",
        "steps",
        "train_time_s",
        "step_avg_ms",
        "tokens_per_s",
        "val_bpb",
        "val_loss",
    ):
        assert key in final
    assert final["steps"] == 40 and final["val_bpb"] < vals[0]
    artifact = Path(final["artifact_path"])
    assert f"artifact_path:{artifact}" in log.splitlines()
    assert artifact.stat().st_size == final["bytes_model"]
    assert final["bytes_total"] == final["bytes_model"] + final["bytes_code"] <= 16_000_000
    assert final["headroom"] == 16_000_000 - final["bytes_total"]
    assert "post_quant_val_bpb" not in final  # one name: val_bpb_flat is the artifact's flat score
    assert final["eval_mode"] == "chunked+ngram_mix" and final["val_bpb"] == final["val_bpb_ngram_mix"]
    assert final["quant_gap"] == pytest.approx(final["val_bpb_flat"] - final["pre_quant_val_bpb"])
    assert 0 <= final["gptq_time_s"] <= final["export_time_s"]
    assert final["artifact_production_wallclock_s"] == pytest.approx(
        final["train_time_s"] + final["export_time_s"]
    )
    # A fresh process rebuilds the model from the artifact alone and gets the same number.
    again, eval_log = run_script(
        dict(
            env, RUN_ID="smoke_eval", EVAL_ONLY="1", ARTIFACT_PATH=str(artifact), DATA_PATH=str(sample_shards)
        ),
        tmp_path,
    )
    assert again["eval_only"] is True and "step:" not in eval_log
    assert abs(again["val_bpb_flat"] - final["val_bpb_flat"]) < 1e-6
    assert abs(again["val_bpb"] - final["val_bpb"]) < 1e-6 and again["eval_mode"] == final["eval_mode"]
    assert again["bytes_model"] == final["bytes_model"]
    assert final["script_sha256"] == tg.file_sha256(ROOT / "train_gpt.py")
    # The records tool reads today's log format: make a (non-record) submission and validate it.
    folder = tmp_path / "record"
    cmd = [sys.executable, "-m", "records", "new", str(tmp_path / "logs" / "smoke.txt"), "--name", "Smoke"]
    cmd += ["--author", "ci", "--github-id", "ci", "--blurb", "smoke", "--out", str(folder)]
    cmd += ["--track", "non_record_16mb", "--script", str(ROOT / "train_gpt.py")]
    made = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    # packed code bytes (the default): the packed form is submitted, the readable source beside it
    packed = tg.pack_source((ROOT / "train_gpt.py").read_text())
    assert (folder / "train_gpt.py").read_bytes() == packed.encode()
    assert (folder / "train_gpt_source.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()


def test_missing_data_stops_with_the_command_to_build_it(tmp_path):
    env = dict(TINY, RUN_ID="nodata", DATA_PATH=str(tmp_path / "nowhere"), TOKENIZER_PATH=str(TOKENIZER))
    proc = run_raw(env, tmp_path)
    assert proc.returncode == 3
    assert "nowhere/fineweb_val_*.bin" in proc.stdout and "python3 -m data.tokenize_docs" in proc.stdout
    assert "data error" in (tmp_path / "logs" / "nodata.txt").read_text()


def test_unknown_knob_stops_before_any_work(tmp_path):
    proc = run_raw({"PHASED_TTT_ENABLED": "1"}, tmp_path)
    assert proc.returncode == 2
    assert "PHASED_TTT_ENABLED" in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_model_traces_as_one_graph_for_torch_compile():
    """GPU runs compile with fullgraph=True; dynamo's eager backend finds graph breaks on CPU."""
    env = dict(
        TINY, NUM_LAYERS="4", NUM_LOOPS="1", LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_LAST_N="1"
    )
    model = tg.GPT(tg.Hyperparameters(env))
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(0, 1024, (2, 64))
    for looping in (False, True):  # both graphs the schedule uses
        model.looping = looping
        loss = compiled(ids, ids)
        loss.backward()
        torch.testing.assert_close(loss, model(ids, ids))


def test_ema_is_the_running_mean_until_its_window_fills():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = tg.EMA(model, decay=0.997, window_frac=0.05)
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, expected_steps=10_000)
    assert ema.shadow["weight"].item() == pytest.approx(3.0)


def test_a_reused_run_id_never_touches_the_old_log(tmp_path):
    old = tmp_path / "logs" / "dup.txt"
    old.parent.mkdir()
    old.write_text("an earlier run\n")
    proc = run_raw({"RUN_ID": "dup"}, tmp_path)
    assert proc.returncode == 2 and "RUN_ID=dup" in proc.stderr
    assert old.read_text() == "an earlier run\n"


def test_depth_recurrence_switches_on_by_schedule_position(sample_shards, tmp_path):
    env = tiny_env(
        sample_shards,
        RUN_ID="loops",
        NUM_LOOPS="1",
        LOOP_START="1",
        LOOP_END="1",
        ENABLE_LOOPING_AT="0.5",
        QAT_START_LR_SCALE="0.5",
        QUANT_REPORT_RTN="1",
        PARALLEL_RESIDUAL_LAST_N="1",
        ITERATIONS="6",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="512",
        MICROBATCH_TOKENS="512",
    )
    final, log = run_script(env, tmp_path)
    lines = log.splitlines()
    switch = next(i for i, line in enumerate(lines) if line.startswith("looping:on"))
    assert "progress:0.500000" in lines[switch]
    assert lines[switch - 1].startswith("step:3/6")  # on from the 4th step (frac 3/6) to the end
    # Late QAT by schedule position: lr_scale = (1 - 4/6) / 0.72 = 0.46 < 0.5 first at step 4.
    qat = next(i for i, line in enumerate(lines) if line.startswith("qat:on"))
    assert lines[qat - 1].startswith("step:4/6") and "lr_scale:0.46" in lines[qat]
    rtn = next(line for line in lines if line.startswith("final_eval:rtn"))
    rtn_bpb = float(rtn.split("val_bpb:")[1].split()[0])
    assert final["rtn_quant_gap"] == pytest.approx(rtn_bpb - final["pre_quant_val_bpb"], abs=1e-4)
    assert final["steps"] == 6


def test_help_prints_the_resolved_settings_and_runs_nothing(tmp_path):
    proc = run_raw({"RUN_PRESET": "smoke", "MODEL_DIM": "96"}, tmp_path, "--help")
    assert proc.returncode == 0
    assert "MODEL_DIM=96" in proc.stdout.splitlines() and "NUM_LAYERS=4" in proc.stdout.splitlines()
    assert not (tmp_path / "logs").exists()
    stray = run_raw({}, tmp_path, "--iterations=5")
    assert stray.returncode == 2 and "settings are env vars" in stray.stderr
