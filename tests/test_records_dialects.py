"""records/ on folders in the official log dialects (fixtures: tests/fixtures/records_official)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from records import cli, dialects, scripts
from records.logparse import parse_log

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "records_official" / "track_10min_16mb"
OURS = FIXTURES / "records" / "baseline"


@pytest.fixture()
def track(tmp_path) -> Path:
    """A copy of the synthetic track with the scripts under their real name."""
    dest = tmp_path / "track_10min_16mb"
    shutil.copytree(OFFICIAL, dest)
    for txt in dest.glob("*/train_gpt.py.txt"):
        txt.rename(txt.with_suffix(""))
    return dest


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_march_dialect_claims_last_ttt_and_states_calibration(track):
    run = dialects.read_run(track / "2026-01-01_V1Dialect" / "train_seed2.log")
    assert run.dialect.startswith("official-2026-03")
    claim = run.claim()
    assert (claim.label, claim.val_loss, claim.val_bpb) == ("legal_ttt_exact", 1.891, 1.1196)
    assert claim.text.startswith("legal_ttt_exact") and claim.line_no == 25
    assert (run.seed, run.world_size, run.train_time_s, run.calibration_s) == (2, 8, 600.05, 190.5)
    assert run.production_seconds()[0] == pytest.approx(790.55)
    assert run.eval_seconds()[0] == pytest.approx(510.0)  # round trip + sliding + TTT eval times
    assert (run.bytes_model, run.bytes_code, run.bytes_total) == (15_800_000, 90_000, 15_890_000)


def test_april_dialect_with_unix_time_prefix(track):
    plain = dialects.read_run(track / "2026-01-02_V2Dialect" / "train_seed7.log")
    stamped = dialects.read_run(track / "2026-01-02_V2Dialect" / "train_seed9.log")
    assert plain.dialect.startswith("official-2026-04") and "unix-time" not in plain.dialect
    assert stamped.dialect.endswith("unix-time prefixed")
    for run, loss in ((plain, 1.87), (stamped, 1.8695)):
        assert run.claim().label == "quantized_ttt_phased" and run.claim().val_loss == loss
        assert run.train_time_s == 588.0 and run.calibration_s == 3.5
        assert run.eval_seconds() == (450.0, "stated total_eval_time")
        assert run.bytes_code == 31_000  # the compressed code is what the total counts
    assert plain.config["XSA_LAST_N"] == "11" and plain.seed == 7


def test_first_baseline_dialect_and_our_own(track):
    old = dialects.read_run(track / "2026-04-03_OneSeedOverCap" / "train.log")
    assert old.claim().label == "final_int8_zlib_roundtrip_exact"
    assert old.train_time_s == 599.9 and old.production_seconds()[0] is None  # not stated
    ours = dialects.read_run(OURS / "smoke_base_s1.txt")
    assert ours.dialect.startswith("ours")
    final = json.loads((OURS / "smoke_base_s1.txt").read_text().splitlines()[-1])
    assert ours.claim().val_bpb == pytest.approx(final["val_bpb"])


def test_compare_across_official_dialects(track, capsys):
    code, out = run_cli(
        capsys,
        "compare",
        "--baseline",
        track / "2026-01-01_V1Dialect",
        "--candidate",
        track / "2026-01-02_V2Dialect",
    )
    assert code == 0 and "verdict: RECORD" in out
    assert "train_seed1.log:25 legal_ttt_exact" in out
    assert "train_seed9.log:24 quantized_ttt_phased" in out
    assert "delta (baseline - candidate): +0.01993 nats" in out


def test_compare_ours_against_official(track, capsys):
    code, out = run_cli(
        capsys,
        "compare",
        "--baseline",
        *sorted(OURS.glob("*.txt")),
        "--candidate",
        track / "2026-01-02_V2Dialect",
    )
    assert code == 0 and "smoke_base_s1.txt" in out and "train_seed7.log:" in out


def test_compare_side_without_per_seed_numbers(track, capsys):
    empty = track / "2026-01-09_NoSeeds"
    empty.mkdir()
    (empty / "submission.json").write_text('{"val_bpb": 1.2}')
    code, out = run_cli(capsys, "compare", "--baseline", empty, "--candidate", track / "2026-01-02_V2Dialect")
    assert code == 2 and "no per-seed numbers" in out


def test_validate_flags_calibration_after_the_training_cap(track, capsys):
    before = snapshot(track)
    code, out = run_cli(capsys, "validate", track / "2026-01-01_V1Dialect")
    assert code == 1
    assert "artifact production 790.5 s exceeds 600 s" in out
    assert "gptq:generated 64 sequences in 190.5s" in out
    assert "0.050 s over the cap" in out  # a last-step overshoot is a warning only
    assert snapshot(track) == before  # nothing written into the folder being read


def test_validate_third_party_ok_and_not_stated(track, capsys):
    code, out = run_cli(capsys, "validate", track / "2026-01-02_V2Dialect")
    assert code == 0 and out.startswith("OK")
    assert "submission.json lacks optional metadata" in out  # a warning for a folder not ours
    code, out = run_cli(capsys, "validate", track / "2026-04-03_OneSeedOverCap")
    assert code == 1
    assert "artifact production: not stated" in out
    assert "code + model 16,037,000 bytes exceeds 16,000,000" in out
    assert "1 seed(s); a record claim needs 3" in out
    assert (
        "submission.json val_bpb is 1.2244 but the mean of the logs' final scores (1 seed(s)) is 1.22757690"
        in out
    )


def test_unreadable_files_get_one_line(track, capsys):
    folder = track / "2026-01-02_V2Dialect"
    (folder / "submission.json").write_text("{not json")
    (folder / "notes.log").write_bytes(b"\x00\xff\xfe binary")
    code, out = run_cli(capsys, "validate", folder)
    assert "submission.json does not parse" in out
    assert "notes.log: not a run log in any known dialect" in out
    code, out = run_cli(capsys, "rank", track)
    assert code == 0


def test_diff_unpacks_and_reads_defaults_without_executing(track, capsys, monkeypatch):
    monkeypatch.chdir(track)
    code, out = run_cli(capsys, "diff", track / "2026-01-01_V1Dialect", track / "2026-01-02_V2Dialect")
    assert code == 0
    assert "unpacked a self-extracting wrapper" in out
    assert '+XSA_LAST_N = _e("XSA_LAST_N", 11, int)' in out  # the code diff is of the unpacked text
    assert "XSA_LAST_N   4  ->  11" in out and "MATRIX_LR    0.025  ->  0.022" in out
    assert not list(track.rglob("EXECUTED_BY_RECORDS")) and not (track / "EXECUTED_BY_RECORDS").exists()


def test_default_config_by_pattern_for_newer_python():
    text = 'X = f"{a["k"]}"\nN = int(os.environ.get("NUM_LAYERS", 11))\nL = os.getenv("LR")\n'
    assert scripts.default_config_by_pattern(text) == {"NUM_LAYERS": "11", "LR": "<unset>"}


def test_rank_markdown_and_csv(track, capsys):
    code, out = run_cli(capsys, "rank", track)
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert code == 0 and "V2 dialect record" in lines[1] and "V1 dialect record" in lines[2]
    assert "1.10813 | 0.00051 | 3 | 15,931,000 | 591.5 | 450.0 | logs | ok" in lines[1]
    assert "production>600s" in lines[2]
    assert "bytes>16MB seeds<3 score!=submission" in lines[3]
    code, out = run_cli(capsys, "rank", track, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["date"] for r in rows] == ["2026-01-02", "2026-01-01", "2026-04-03"]
    assert rows[0]["bytes"] == "15931000" and rows[2]["flags"] == "bytes>16MB seeds<3 score!=submission"
    assert rows[2]["std"] == ""  # one seed: no std, an empty cell rather than a dash


def test_missing_metadata_is_an_error_for_our_folders_only(track, capsys, tmp_path):
    third = track / "2026-01-02_V2Dialect"
    code, out = run_cli(capsys, "validate", third)
    assert code == 0 and "lacks optional metadata: blurb" in out  # a warning
    ours = tmp_path / "ours"
    ours.mkdir()
    for log in sorted(OURS.glob("*.txt")):
        shutil.copy(log, ours / log.name)
    sub = {"name": "x", "script_sha256": "0" * 64, "hp_hash": "00000000"}  # fields only `new` writes
    (ours / "submission.json").write_text(json.dumps(sub))
    code, out = run_cli(capsys, "validate", ours, "--track", "non_record_16mb")
    assert code == 1 and "submission.json: missing or empty 'blurb'" in out


def test_per_seed_disagreement_names_the_line(track, capsys):
    folder = track / "2026-01-01_V1Dialect"
    sub = json.loads((folder / "submission.json").read_text())
    sub["seed_results"]["2"]["val_bpb"] = 1.1290
    (folder / "submission.json").write_text(json.dumps(sub))
    code, out = run_cli(capsys, "validate", folder)
    assert "submission.json seed 2 val_bpb is 1.129 but train_seed2.log:25 legal_ttt_exact says 1.1196" in out


@pytest.mark.parametrize(
    ("label", "stage"),
    [
        ("final_int8_zlib_roundtrip_exact", dialects.ROUNDTRIP),
        ("final_ternary_roundtrip", dialects.ROUNDTRIP),
        ("quantized", dialects.ROUNDTRIP),
        ("diagnostic quantized", dialects.ROUNDTRIP),
        ("final_eval:post_quant", dialects.ROUNDTRIP),
        ("final_int6_sliding_window_exact", dialects.SLIDING),
        ("final_sliding_window_eval_exact", dialects.SLIDING),
        ("quantized_sliding_window", dialects.SLIDING),
        ("pre_ttt_sliding", dialects.SLIDING),
        ("legal_ttt_exact", dialects.TTT),
        ("final_ttt_lora", dialects.TTT),
        ("quantized_ttt_phased", dialects.TTT),
        ("pre-quantization post-ema", dialects.PRE_QUANT),
        ("diagnostic pre-quantization post-ema", dialects.PRE_QUANT),
        ("DIAGNOSTIC post_ema", dialects.PRE_QUANT),
    ],
)
def test_stage_table(label, stage, tmp_path):
    log = tmp_path / "train_seed1.log"
    name = label.removeprefix("final_eval:")
    log.write_text(f"seed:1\n{name} val_loss:2.0 val_bpb:1.2 eval_time:1000ms\n")
    run = dialects.read_run(log)
    assert [e.stage for e in run.evals] == [stage]


def test_our_byte_counts_on_their_own_line_or_on_the_artifact_path_line(tmp_path):
    """train_gpt.py prints `artifact_path:<file>` alone and the byte counts on the next line; a log
    with both on one line reads the same."""
    src = (OURS / "smoke_base_s1.txt").read_text()
    final = json.loads(src.splitlines()[-1])
    joined = re.sub(r"^(artifact_path:\S+)\n(bytes_code:.*)$", r"\1 \2", src, flags=re.M)
    assert joined != src
    for text in (src, joined):
        path = tmp_path / "smoke.txt"
        path.write_text(text)
        log = parse_log(path)
        assert log["complete"] and log["artifact"]["bytes_total"] == final["bytes_total"]
        assert log["artifact"]["artifact_path"] == final["artifact_path"]


def test_plot_reads_official_dialects_and_ours(track, tmp_path, capsys):
    """plot takes official record folders (both step-line dialects) beside our own logs."""
    out_png = tmp_path / "curves.png"
    v1, v2 = track / "2026-01-01_V1Dialect", track / "2026-01-02_V2Dialect"
    code, out = run_cli(capsys, "plot", v1, v2, OURS / "smoke_base_s1.txt", "--out", out_png)
    assert code == 0 and "7 run(s)" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_official_curve_points(track):
    from records.plot import official_log

    log = official_log(track / "2026-01-02_V2Dialect" / "train_seed7.log")
    assert [(p["step"], p["val_bpb"]) for p in log["vals"]] == [(0, 4.1159), (4600, 1.0757)]
    # the April val line states no time: it carries the latest stated one (9.7 min)
    assert log["vals"][-1]["train_time_ms"] == pytest.approx(9.7 * 60_000)
    assert [p["train_loss"] for p in log["steps"]] == [9.0089, 2.2830]
    assert log["final"]["val_bpb"] == 1.108  # the phased TTT line, the score the run stands on
    v1 = official_log(track / "2026-01-01_V1Dialect" / "train_seed1.log")
    assert [p["train_time_ms"] for p in v1["steps"]] == [90.0, 599000.0]


@pytest.mark.parametrize(
    "line",
    ["    seed: 1234", "\tseed: 1234", "1776142360.714     seed: 1234", "  seed: 1234  "],
    ids=["four_spaces", "tab", "unix_time_then_spaces", "two_spaces"],
)
def test_seed_line_with_leading_spaces(tmp_path, line):
    """A Hyperparameters block may indent `seed:` by more than two spaces (or a tab); the seed is
    read from the line, not guessed from the file name (train.log names none)."""
    log = tmp_path / "train.log"
    lines = (
        "Hyperparameters:",
        line,
        "    world_size: 8",
        "    seed: int = 7",
        "quantized val_loss:2.0 val_bpb:1.2",
    )
    log.write_text("\n".join(lines) + "\n")
    run = dialects.read_run(log)
    assert (run.seed, run.world_size) == (1234, 8)
    assert not run.notes


def test_dumped_script_lines_set_no_seed(tmp_path):
    log = tmp_path / "train.log"
    lines = (
        '    seed = int(os.environ.get("SEED", 1337))',
        "    seed: int = 7",
        "quantized val_loss:2.0 val_bpb:1.2",
    )
    log.write_text("\n".join(lines) + "\n")
    assert dialects.read_run(log).seed is None


def set_total(log: Path, total: int, model: int | None = None) -> None:
    """The V2 dialect's stated byte counts: total (and the compressed model)."""
    text = log.read_text()
    text, n = re.subn(
        r"Total submission size quantized\+brotli: \d+ bytes",
        f"Total submission size quantized+brotli: {total} bytes",
        text,
    )
    assert n == 1
    if model is not None:
        text, n = re.subn(
            r"Serialized model quantized\+brotli: \d+ bytes",
            f"Serialized model quantized+brotli: {model} bytes",
            text,
        )
        assert n == 1
    log.write_text(text)


@pytest.mark.parametrize(("total", "legal"), [(16_000_000, True), (16_000_001, False)])
def test_official_cap_is_inclusive(track, capsys, total, legal):
    """Exactly 16,000,000 bytes is legal (the cap is `>`-exclusive), one byte more is not."""
    folder = track / "2026-01-02_V2Dialect"
    set_total(folder / "train_seed7.log", total)
    code, out = run_cli(capsys, "validate", folder)
    assert (code == 0) == legal
    assert ("exceeds 16,000,000" in out) == (not legal)
    code, out = run_cli(capsys, "rank", track, "--format", "csv")
    flags = {r["name"]: r["flags"] for r in csv.DictReader(io.StringIO(out))}
    assert ("bytes>16MB" in flags["V2 dialect record"]) == (not legal)


@pytest.mark.parametrize(("mine", "warned"), [(16_000_000, False), (16_000_001, True)])
def test_folder_script_plus_model_cap_is_inclusive(track, capsys, mine, warned):
    """The folder's train_gpt.py + the logged model at exactly the cap is no warning; one byte over is
    (the log counted its code as fewer bytes than the file in the folder)."""
    folder = track / "2026-01-02_V2Dialect"
    script = folder / "train_gpt.py"
    script.write_bytes(script.read_bytes() + b"#" * 99_000 + b"\n")  # larger than the 31,000 counted
    model = mine - len(script.read_bytes())
    set_total(folder / "train_seed7.log", 31_000 + model, model)
    code, out = run_cli(capsys, "validate", folder)
    assert code == 0
    assert ("train_seed7.log: train_gpt.py in the folder" in out) == warned


def write_submission(folder: Path, **changes) -> None:
    path = folder / "submission.json"
    sub = json.loads(path.read_text())
    sub.update(changes)
    path.write_text(json.dumps(sub))


@pytest.mark.parametrize(
    ("headline", "verdict"),
    [
        ("1.1081", "ok"),
        ("1.1082", "rounding"),
        ("1.10814", "rounding"),
        ("1.10815", "problem"),
        ("1.1083", "problem"),
        ("1.12", "problem"),
    ],
)
def test_headline_one_unit_off_is_a_rounding_note(track, capsys, headline, verdict):
    """The logs' mean is 1.10813333: a headline one unit of its last (4th or later) digit away is a
    rounding note (a mean of rounded per-seed values, as 2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2
    states 1.08563 for a mean of 1.08562480); further away, or too coarse to tell, it is a problem."""
    folder = track / "2026-01-02_V2Dialect"
    text = (folder / "submission.json").read_text().replace('"val_bpb": 1.1081,', f'"val_bpb": {headline},')
    (folder / "submission.json").write_text(text)
    code, out = run_cli(capsys, "validate", folder)
    assert (code == 0) == (verdict != "problem")
    assert ("equal to within one unit of its last digit (rounding)" in out) == (verdict == "rounding")
    assert ("score!=submission" in run_cli(capsys, "rank", track)[1].splitlines()[2]) == (
        verdict == "problem"
    )


def one_seed_copy(track: Path, name: str) -> Path:
    """The V2 record with seed 7 only, under another folder name (its date)."""
    folder = track / name
    shutil.copytree(track / "2026-01-02_V2Dialect", folder)
    for log in ("train_seed8.log", "train_seed9.log"):
        (folder / log).unlink()
    sub = json.loads((folder / "submission.json").read_text())
    write_submission(folder, val_bpb=1.108, seeds={"7": sub["seeds"]["7"]})
    return folder


@pytest.mark.parametrize(("date", "legal"), [("2026-03-19", True), ("2026-03-20", False)])
def test_single_seed_before_the_three_seed_rule_is_a_warning(track, capsys, date, legal):
    """The challenge README asked for 3 runs from 2026-03-19 on (openai/parameter-golf d2bd760); a
    record dated up to that day with one seed followed the rules of its day."""
    folder = one_seed_copy(track, f"{date}_OneSeed")
    code, out = run_cli(capsys, "validate", folder)
    assert (code == 0) == legal
    assert "1 seed(s); a record claim needs 3" in out
    problems = out.split("warnings:")[0]
    assert ("1 seed(s); a record claim needs 3" in problems) == (not legal)


@pytest.mark.parametrize(("date", "legal"), [("2026-03-18", True), ("2026-03-20", False)])
def test_headline_of_one_run_before_the_three_seed_rule_is_a_warning(track, capsys, date, legal):
    """Before the rule a submission stood on one run (2026-03-18_LongContextSeq2048's headline is its
    train.log's score, with two more seeds beside it); after it the headline is the mean."""
    folder = track / f"{date}_ThreeSeeds"
    shutil.copytree(track / "2026-01-02_V2Dialect", folder)
    write_submission(folder, val_bpb=1.1087)  # seed 8's score, not the 1.10813 mean
    code, out = run_cli(capsys, "validate", folder)
    assert "(it is train_seed8.log's score alone)" in out
    assert (code == 0) == legal


def test_repeated_runs_of_one_seed_use_the_one_the_headline_states(track, capsys):
    """Several logs of one seed and no per-seed results (2026-03-17_LoRA_TTT: four runs of seed 1337):
    the run whose score is the headline is used; the others are named, not called unreadable."""
    folder = one_seed_copy(track, "2026-01-05_Repeats")
    second = folder / "train_v2.log"
    second.write_text(
        (folder / "train_seed7.log").read_text().replace("val_bpb:1.10800000", "val_bpb:1.10500000")
    )
    (folder / "train_seed7.log").rename(folder / "train_v1.log")
    write_submission(folder, val_bpb=1.105, seeds=None)
    code, out = run_cli(capsys, "validate", folder)
    assert code == 0, out
    assert "train_v1.log also state(s) this seed; train_v2.log is used (its score agrees" in out
    assert "not a run log" not in out
