"""bench/throughput.py stays runnable on CPU (the smoke model, a few steps, per-step lines as it
goes) and counts FLOPs right."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_hp

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_benchmark_prints_every_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    env.update(RUN_PRESET="smoke", NUM_LAYERS="2", TRAIN_BATCH_TOKENS="1024", MICROBATCH_TOKENS="512")
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(BENCH), "--warmup", "1", "--steps", "2"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(item.split(":", 1) for line in proc.stdout.splitlines() for item in line.split())
    for key in ("ms_per_step", "tokens_per_s", "peak_mem_mib", "fwd_bwd_ms", "optimizer_ms", "ema_ms"):
        assert float(fields[key]) > 0, key
    assert fields["mfu"] == "n/a" and fields["device"] == "cpu"  # no GPU peak to divide by
    assert fields["batch_tokens"] == "1024" and fields["timed_steps"] == "2"
    assert not list(tmp_path.iterdir())  # writes nothing
    # one line per step, in order, before the totals: a run cut short shows how far it got
    steps = [line.split()[0] for line in proc.stdout.splitlines() if "step_ms:" in line]
    assert steps == ["warmup_step:1/1", "timed_step:1/2", "timed_step:2/2"]
    lines = proc.stdout.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("timed_step:2/2"))) < lines.index(
        next(x for x in lines if x.startswith("warmup_steps:"))
    )


def test_flops_per_token_counts_repeated_blocks_and_attention():
    bench = load_bench()
    hp = make_hp(MODEL_DIM=64, NUM_LAYERS=3, NUM_LOOPS=2, LOOP_START=1, LOOP_END=1)
    model = tg.GPT(hp)
    plain = bench.flops_per_token(model, hp)
    model.looping = True  # block 1 runs 2 more times
    block = sum(m.weight.numel() for m in model.blocks[1].modules() if isinstance(m, tg.CastedLinear))
    attention = 6 * hp.train_seq_len * hp.model_dim
    assert bench.flops_per_token(model, hp) - plain == 2 * (6 * block + attention)
    assert plain > 6 * hp.vocab_size * hp.model_dim  # the tied output head is counted


def test_parallel_muon_benchmark_runs_on_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    env.update(RUN_PRESET="smoke", NUM_LAYERS="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / "parallel_muon.py"), "--warmup", "1", "--steps", "1"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(item.split(":", 1) for line in proc.stdout.splitlines() for item in line.split())
    assert fields["world_size"] == "1" and int(fields["matrices"]) == 12 and float(fields["muon_step_ms"]) > 0
