"""The bench scripts stay runnable on CPU: throughput.py (the smoke model, a few steps, per-step
lines as it goes, FLOPs counted right) and gpu_evidence.sh (its CPU rehearsal, and a stage cut by
its timeout keeping what it printed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from conftest import make_hp

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "throughput.py"


def load_script(path: Path):
    """A bench script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script(BENCH)


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


EVIDENCE = ROOT / "bench" / "gpu_evidence.sh"


def evidence_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment (no train_gpt knobs, no bench settings) plus the test's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not tg._looks_like_ours(k, set()) and not k.startswith("EVIDENCE_") and k not in ("OUT", "PYTHON")
    }
    env.update(OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"), EVIDENCE_WORK=str(tmp_path / "work"), **extra)
    return env


def check_out_folder(out: Path) -> None:
    """What the device tool brings back: at most 8 plain files, names of letters, digits, . _ -."""
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files), files


def test_gpu_evidence_smoke_prints_results_and_keeps_them_in_out(tmp_path):
    # EVIDENCE_VAL_DOCS looks like a train_gpt knob (VAL): the run only passes if the script unsets it
    assert tg._looks_like_ours("EVIDENCE_VAL_DOCS", set())
    env = evidence_env(tmp_path, EVIDENCE_SMOKE="1", EVIDENCE_VAL_DOCS="4", PYTHON=sys.executable)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    cmd = ["bash", str(EVIDENCE)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    log = (out / "evidence.log").read_text()
    summary = (out / "summary.txt").read_text()
    expected = [
        "stage:tokenize rc:0",
        "data:sample val_docs:4",
        "step:1/6",
        "bytes_total:",
        "final_eval:flat",
        "final_eval:sliding",
        "stage:train rc:0",
        "timed_step:2/2",
        "ms_per_step:",
        "stage:throughput rc:0",
        "evidence:done",
    ]
    per_step = ("timed_step:2/2",)  # step lines stay out of the summary
    for text, keys in (
        (proc.stdout, expected),
        (log, expected),
        (summary, [k for k in expected if k not in per_step]),
    ):
        positions = [text.find(key) for key in keys]
        assert -1 not in positions and positions == sorted(positions), list(zip(keys, positions, strict=True))
        assert re.search(r"^final_eval:(chunked|ttt) ", text, re.M)  # the default TTT pass ran
    assert all(line in proc.stdout for line in log.splitlines())  # every logged line was printed
    assert summary.splitlines()[-1].startswith("{")  # the final JSON
    assert len(list(out.glob("final_model_*.ptz"))) == 1 and len(list(out.glob("evidence_p1_*.txt"))) == 1
    assert (out / "manifest.json").is_file()
    check_out_folder(out)
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before  # nothing written into the repository


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: canned version lines, and a train_gpt.py that prints, then hangs
case "$1" in
  -c) echo "python:fake torch:none cuda:None"; echo "gpus:0 gpu:none"; echo "compressors:lzma" ;;
  train_gpt.py)
    echo "step:1/20000 train_loss:6.9 train_time_ms:900"
    echo "bytes_code:1 bytes_model:2 bytes_total:3 headroom:4"
    echo "final_eval:flat val_loss:6.0 val_bpb:3.5"
    exec sleep 600 ;;
  *) echo "unexpected: $*" >&2; exit 9 ;;
esac
"""


def test_gpu_evidence_timeout_keeps_printed_lines(tmp_path):
    """A stage cut by its timeout: its lines stay in the log and the summary, the script goes on to
    the summary within its budget and fails with the timeout's status; no throughput without time."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "fineweb_val_000000.bin").write_bytes(b"")
    env = evidence_env(
        tmp_path, EVIDENCE_SMOKE="1", EVIDENCE_SHARDS=str(shards), EVIDENCE_BUDGET_S="25", PYTHON=str(fake)
    )
    proc = subprocess.run(
        ["bash", str(EVIDENCE)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 124, proc.stdout + proc.stderr
    out = tmp_path / "out"
    for text in (proc.stdout, (out / "evidence.log").read_text(), (out / "summary.txt").read_text()):
        for key in (
            "step:1/20000",
            "bytes_total:3",
            "final_eval:flat",
            "timed_out:yes",
            "evidence:incomplete",
        ):
            assert key in text, key
        assert "NOTE !!! zstandard/brotli not importable" in text  # the lzma fallback is loud
        assert "stage:throughput skipped" in text
    assert re.search(r"^stage:train rc:124 ", proc.stdout, re.M)
    check_out_folder(out)


def test_bench_scripts_never_call_bare_python():
    """A bare GPU image may have only python3: shell scripts use ${PYTHON:-python3}, usage lines
    python3, Python code sys.executable."""
    bare = re.compile(r"(^|[\s;&|(`$])python(?![\w.])(?!:)")
    for path in sorted((ROOT / "bench").glob("*.sh")) + sorted((ROOT / "bench").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not bare.search(line), f"{path.name}:{n}: {line}"


def test_p1_knobs_agree_between_scripts():
    """bench/p1.sh and bench/gpu_evidence.sh run the same protocol."""
    p1 = (ROOT / "bench" / "p1.sh").read_text()
    evidence = EVIDENCE.read_text()
    for knob in ("MAX_WALLCLOCK_SECONDS=240", "TRAIN_BATCH_TOKENS=196608", "fineweb_1024_bpe.model"):
        assert knob in p1 and knob in evidence, knob
    assert "--val-docs 4194" in p1 and "VAL_DOCS:-4194" in evidence


def load_ablation():
    return load_script(ROOT / "bench" / "p1_ablation.py")


FRONTIER = ROOT / "bench" / "frontier_quant.py"


def load_frontier():
    return load_script(FRONTIER)


def test_p1_ablation_dry_run_prints_one_valid_p1_command_per_ablation():
    proc = subprocess.run(
        [sys.executable, "bench/p1_ablation.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ablation = load_ablation()
    assert len(lines) == len(ablation.ABLATIONS)
    assert "ablation:no_lqer command:RUN_ID=p1_no_lqer LQER_ENABLED=0 bash bench/p1.sh" in lines


def test_p1_ablation_refuses_a_knob_the_script_does_not_know(monkeypatch):
    ablation = load_ablation()
    monkeypatch.setitem(ablation.ABLATIONS, "typo", {"LQER_ENABLE": "0"})
    try:
        ablation.check(["typo"])
    except tg.ConfigError as err:
        assert "LQER_ENABLE" in str(err)
    else:
        raise AssertionError("an unknown knob passed")


def test_p1_ablation_table_compares_each_run_with_the_default(tmp_path):
    ablation = load_ablation()
    for name, bpb in (("default", 1.25), ("no_lqer", 1.2625)):
        final = dict(steps=900, step_avg_ms=266.1, pre_quant_val_bpb=1.24, quant_gap=0.01, val_bpb=bpb)
        (tmp_path / f"p1_{name}.txt").write_text("step:1\n" + json.dumps(dict(final, bytes_total=15_900_000)))
    rows = ablation.table(tmp_path, ["default", "no_lqer", "no_varlen"]).splitlines()
    assert rows[2].startswith("| default | defaults | 900 | 266.1 | 1.2400 | +0.0100 | 1.2500 | +0.0000 |")
    assert "| 1.2625 | +0.0125 | 15,900,000 |" in rows[3]
    assert rows[4].startswith("| no_varlen | `VARLEN_ATTN=0` | missing |")


def test_frontier_quant_preset_keeps_its_shape_and_each_variant_starts_from_the_base(monkeypatch):
    for name in [k for k in os.environ if tg._looks_like_ours(k, set())]:
        monkeypatch.delenv(name)
    bench = load_frontier()
    record = tg.Hyperparameters({"RUN_PRESET": "record_0427"})
    base = bench.variant_hp({}, "record_0427")
    for knob in ("VOCAB_SIZE", "MLP_MULT", "NUM_LOOPS", "PARALLEL_START_LAYER", "SPARSE_ATTN_GATE_ENABLED"):
        assert base.knobs[knob] == record.knobs[knob], knob
    assert base.quant_embed_bits == 8 and not base.quant_embed_gptq and base.gptq_sdclip_k == 0
    assert not (base.lqer_enabled or base.gated_attn_quant_gate or base.awq_lite_enabled)
    # the stack is every quantisation knob R0427's preset sets, nothing more
    stack = bench.variant_hp(bench.VARIANTS["r0427_stack"], "record_0427")
    for knob in {**bench.BASE, **bench.VARIANTS["r0427_stack"]}:
        assert stack.knobs[knob] == record.knobs[knob], knob


def test_frontier_quant_calibrated_run_at_a_tiny_record_shape(tmp_path, shard_dir):
    env = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    env.update(
        OMP_NUM_THREADS="1", MODEL_DIM="64", ROPE_DIMS="8", TRAIN_SEQ_LEN="64", MICROBATCH_TOKENS="128"
    )
    env.update(DATA_PATH=str(shard_dir), COMPRESSOR="lzma", COMPRESS_THREADS="2", VARLEN_ATTN="0")
    env.update(FUSED_MLP_ENABLED="0", FUSED_CE_ENABLED="0")
    cmd = [sys.executable, str(FRONTIER), "--preset", "record_0427", "--calib-tokens", "256"]
    cmd += ["--variants", "lqer_asym,r0427_stack", "--containers"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [dict(item.split(":", 1) for item in line.split()) for line in proc.stdout.splitlines()]
    head, code = rows[0], int(rows[1]["bytes_code"])
    assert head["preset"] == "record_0427" and head["stand_in"] == "trained_like_calibrated_256"
    variants = [r for r in rows if "export_cpu_s" in r]
    assert [r["variant"] for r in variants] == ["baseline", "lqer_asym", "r0427_stack"]
    for r in variants:
        assert int(r["bytes_total"]) == int(r["bytes_model"]) + code
        spent = float(head["calib_cpu_s"]) + float(r["gptq_cpu_s"]) + float(r["compress_cpu_s"])
        assert abs(float(r["export_cpu_s"]) - spent) < 0.2  # each part rounded to 0.1 s
        assert float(r["compress_job_max_s"]) <= float(r["compress_cpu_s"])
    lqer, stack = variants[1], variants[2]
    assert len(lqer["lqer_tensors"].split(",")) == 3 and float(lqer["lqer_err_ratio"]) < 1
    assert float(lqer["gptq_new_cpu_s"]) < float(lqer["gptq_cpu_s"])  # the baseline's tensors reused
    assert int(variants[0]["compress_jobs_reused"]) == 0 < int(lqer["compress_jobs_reused"])
    assert int(lqer["compress_jobs_reused"]) < int(lqer["compress_jobs"])  # LQER's own stream is new
    assert float(stack["gate_max_abs_err"]) > 0  # R0427's sparse gates, drawn non-zero, stored int8
    # the containers the variants did not use, compressed again: format 2 the same bytes at any thread count
    for name, row in (("baseline", variants[0]), ("r0427_stack", stack)):
        sizes = {
            (r["compress_streams"], r["compress_threads"]): r["bytes_model"]
            for r in rows
            if r.get("variant") == name and "compress_streams" in r
        }
        assert sizes.keys() == {("0", "1"), ("1", "1")}  # ("1", "2") is the variant's own row
        assert sizes["1", "1"] == row["bytes_model"] != sizes["0", "1"]


def test_frontier_quant_compress_memo_gives_the_same_body_and_counts_reused_jobs():
    bench = load_frontier()
    hp = make_hp(COMPRESSOR="lzma")
    state, hessians = bench.stand_in(hp)
    model = bench.shape_model(hp)
    model.load_state_dict(state)
    qz = tg.Quantizer(model, hessians, hp)
    payload = qz.payload(qz.qstate())
    memo = bench.CompressMemo(reuse=True)
    first, _, jobs = bench.compressed(payload, hp, True, 2, memo)
    again, _, reused = bench.compressed(payload, hp, True, 1, memo)
    assert first == again == tg.compress_streams(payload, ["lzma"], 1)[1] and tg.compress is memo.real
    assert sorted(reused) == sorted(jobs) and len(memo.done) == len(
        jobs
    )  # nothing compressed twice, seconds carried


def test_frontier_quant_memo_gives_every_variant_the_tensors_it_would_compute_alone():
    bench = load_frontier()
    hps = {name: make_hp(MODEL_DIM=64, **{**bench.BASE, **knobs}) for name, knobs in bench.VARIANTS.items()}
    state, hessians = bench.stand_in(hps["baseline"])
    memo = bench.TensorMemo()
    for name, hp in hps.items():  # one memo across the variants, as the bench runs them
        model = bench.shape_model(hp)
        model.load_state_dict(state)
        alone = tg.Quantizer(model, hessians, hp).qstate()
        with memo.install():
            shared = tg.Quantizer(model, hessians, hp).qstate()
        assert tg.quantize_tensor is memo.real
        assert tg.build_payload(shared, {}, "bytes") == tg.build_payload(alone, {}, "bytes"), name
    assert 0 < len(memo.done) < sum(len(tg.quant_plan(bench.shape_model(hp), hp)) for hp in hps.values())
