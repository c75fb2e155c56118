"""bench/eval_speed.py: it times every evaluation pass train_gpt.py has (phased TTT, document scoring and
the n-gram tilt included) and projects each to the full val set on 8 GPUs by train_gpt.py's own cost
model, so the phased pass's global phases, capped by PHASED_TTT_PREFIX_DOCS, do not scale with tokens."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ENV, make_hp

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "eval_speed.py"
ALL_PASSES = "flat,sliding,doc,chunked,lora,phased,ngram_tilt,ngram_mix"
PHASED = dict(TTT_LORA_DOCS=2, TTT_LORA_CHUNK=8, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=2)
TILT = dict(NGRAM_TILT_MIN_ORDER=1, NGRAM_TILT_MAX_ORDER=3, NGRAM_TILT_ORDER_STRIDE=1)
SMALL = dict(EVAL_SEQ_LEN=32, EVAL_STRIDE=16, TTT_CHUNK_TOKENS=64, GLOBAL_TTT_CHUNK_TOKENS=32)


def load_bench():
    spec = importlib.util.spec_from_file_location("eval_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_projection_scales_each_pass_by_its_work(bench):
    """Ten times the documents of the same length: ten times the work for each pass (sliding: its
    first window scores all its positions)."""
    hp = make_hp(**PHASED, **SMALL)
    here, there = bench.projection_stream(8 * 32, 32), bench.projection_stream(80 * 32, 32)
    known = bench.passes(hp)
    for name in ("flat", "doc", "lora", "ngram_tilt", "ngram_mix"):
        assert bench.work_scale(known[name], here, there, hp) == pytest.approx(10.0, rel=1e-9), name
    windows = [len(tg.window_plan(n, 32, 16)[0]) for n in (8 * 32, 80 * 32)]
    assert bench.work_scale(known["sliding"], here, there, hp) == pytest.approx(windows[1] / windows[0])


def test_global_phases_project_to_the_prefix_documents_not_the_val_set(bench):
    """PHASED_TTT_PREFIX_DOCS=4 over 2 phases: the phases train on 2 then 4 documents however many
    the val set has, at the seconds per trained token measured here."""
    hp = make_hp(**PHASED, **SMALL)
    phases = bench.PhaseLog(lambda _: None)
    phases("ttt_phase:1 phases:2 docs:2 tokens:64 seconds:1.5")
    phases("ttt_phase:2 phases:2 docs:4 tokens:128 seconds:3.0")
    assert (phases.tokens, phases.seconds) == (192, 4.5)
    for docs in (8, 80, 800):
        there = bench.projection_stream(docs * 32, 32)
        assert bench.phase_seconds_there(phases, there, hp) == pytest.approx(4.5 / 192 * (2 + 4) * 32)
    assert bench.phase_seconds_there(bench.PhaseLog(print), there, hp) is None  # nothing trained here


def test_projected_seconds_divide_by_gpus_except_the_ngram_passes(bench):
    known = bench.passes(make_hp())
    assert bench.projected_seconds(known["phased"], 2.0, 0.0, 30.0, 1, 8) == 7.5
    assert bench.projected_seconds(known["doc"], 2.0, 4.0, 30.0, 2, 8) == 19.0  # setup once, not scaled
    for name in ("ngram_tilt", "ngram_mix"):  # every rank runs the whole stream
        assert bench.projected_seconds(known[name], 2.0, 0.0, 30.0, 1, 8) == 60.0


def test_projection_stream_needs_no_memory_per_position(bench):
    stream = bench.projection_stream(62_021_632, 1240)
    assert stream.n == 62_021_632 and stream.tokens.dtype == torch.uint16
    assert stream.target_bytes.stride() == (0,)  # a view of one element
    assert int((stream.tokens[:2481] == tg.BOS_ID).sum()) == 3


def test_eval_speed_times_and_projects_every_pass_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    knobs = {**TINY_ENV, **PHASED, **TILT, **SMALL}
    env.update({k: str(v) for k, v in knobs.items()}, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(BENCH), "--tokens", "400", "--doc-tokens", "40", "--passes", ALL_PASSES]
    cmd += ["--project-tokens", "40000", "--project-docs", "1000"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {
        fields["bench_pass"]: fields
        for line in proc.stdout.splitlines()
        if line.startswith("bench_pass:")
        for fields in [dict(item.split(":", 1) for item in line.split())]
    }
    assert list(lines) == ["ngram_tilt_hints", *ALL_PASSES.split(",")]
    for name in ALL_PASSES.split(","):
        fields = lines[name]
        assert fields["projected_for"] == "40000_tokens_1000_docs_on_8_gpus" and fields["tokens"] == "400"
        assert float(fields["projected_s"]) >= 0 and float(fields["seconds"]) >= 0, name  # 2 decimals
        assert float(fields["setup_s"]) >= 0, name
    assert float(lines["lora"]["work_scale"]) == pytest.approx(100.0)
    assert lines["phased"]["work_scale"] == lines["lora"]["work_scale"]  # its per-document part
    phased = lines["phased"]
    assert int(phased["phase_tokens"]) > 0 and float(phased["projected_phase_s"]) > 0
    assert float(phased["projected_s"]) >= float(phased["projected_phase_s"])
    assert "ttt_phase:2" in proc.stdout  # both global phases ran
    assert not list(tmp_path.iterdir())  # writes nothing
