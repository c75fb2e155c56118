"""`validate` on a folder that `records new` did not make (an official record, say): the rules are
checked from whatever its logs state, and a figure the log does not state is reported as such.

Flags (short names, also shown by `rank`): train>600s, production>600s, eval>600s, bytes>16MB,
seeds<3, score!=submission, no-score. A record dated before the three-seed rule (rules.MIN_SEEDS_FROM)
with fewer seeds, or whose headline is one run's score, gets a warning instead; so does a score
equal to the logs' to within one unit of its last digit (rounding).
"""

from __future__ import annotations

import re
from pathlib import Path

from . import dialects, rules

NOT_STATED = "not stated"
# The official scripts check the clock after each step, so the last step ends a few ms past the cap;
# an overshoot below this is reported as a warning, not as a broken rule.
STEP_OVERSHOOT_S = 1.0


def is_ours(folder: Path, has_our_logs: bool) -> bool:
    """A folder `records new` made: our logs, or the submission.json fields only `new` writes."""
    if has_our_logs:
        return True
    sub, _ = dialects.load_submission(folder)
    return bool(sub) and "script_sha256" in sub and "hp_hash" in sub


def _s(value: float | None) -> str:
    return NOT_STATED if value is None else f"{value:.1f} s"


def _n(value: int | None) -> str:
    return NOT_STATED if value is None else f"{value:,}"


def _flag(rep, code: str, message: str) -> None:
    rep.problems.append(message)
    if code not in rep.flags:
        rep.flags.append(code)


def check_times(rep, run: dialects.Run) -> None:
    name, train = run.name, run.train_time_s
    over = None if train is None else train - rules.TRAIN_LIMIT_S
    if over is not None and over > STEP_OVERSHOOT_S:
        _flag(rep, "train>600s", f"{name}: training clock {train:.3f} s exceeds {rules.TRAIN_LIMIT_S:.0f} s")
    elif over is not None and over > 0:
        rep.warnings.append(f"{name}: training clock {train:.3f} s is {over:.3f} s over the cap (last step)")
    production, how = run.production_seconds()
    if production is not None and production > rules.TRAIN_LIMIT_S:
        where = f" ({run.calibration_line})" if run.calibration_line else ""
        _flag(
            rep,
            "production>600s",
            f"{name}: artifact production {production:.1f} s exceeds {rules.TRAIN_LIMIT_S:.0f} s ({how}: "
            f"training clock {_s(train)} + {_s(run.calibration_s)} of calibration/quantization after the "
            f"training clock stopped{where})",
        )
    evals, _ = run.eval_seconds()
    if evals is not None and evals > rules.EVAL_LIMIT_S:
        _flag(rep, "eval>600s", f"{name}: evaluation {evals:.1f} s exceeds {rules.EVAL_LIMIT_S:.0f} s")


def check_bytes(rep, run: dialects.Run, script_bytes: int | None) -> None:
    total = run.bytes_total
    if total is None and run.bytes_code is not None and run.bytes_model is not None:
        total = run.bytes_code + run.bytes_model
    if total is not None and total > rules.ARTIFACT_CAP_BYTES:
        _flag(
            rep,
            "bytes>16MB",
            f"{run.name}: code + model {total:,} bytes exceeds {rules.ARTIFACT_CAP_BYTES:,}",
        )
    if script_bytes is not None and run.bytes_model is not None:
        mine = script_bytes + run.bytes_model
        if mine > rules.ARTIFACT_CAP_BYTES >= (total or 0):
            rep.warnings.append(
                f"{run.name}: train_gpt.py in the folder ({script_bytes:,} bytes) + model "
                f"{run.bytes_model:,} = {mine:,} bytes is over the cap; the log counts code as "
                f"{_n(run.bytes_code)} bytes"
            )


def facts(run: dialects.Run) -> list[str]:
    claim = run.claim()
    score = (
        f"val_bpb {claim.val_bpb} / val_loss {claim.val_loss} nats ({dialects.score_source(run)})"
        if claim
        else NOT_STATED
    )
    production, how = run.production_seconds()
    evals, ehow = run.eval_seconds()
    total = NOT_STATED if run.bytes_total is None else f"{run.bytes_total:,}"
    lines = [
        f"{run.name}: read as {run.dialect}; seed {run.seed if run.seed is not None else NOT_STATED}",
        f"  score: {score}",
        f"  training clock: {_s(run.train_time_s)}"
        + (f" ({run.train_time_source})" if run.train_time_source else "")
        + f"; after it: {_s(run.calibration_s)}"
        + (f" ({run.calibration_line})" if run.calibration_line else ""),
        f"  artifact production: {_s(production)} ({how}); evaluation: {_s(evals)} ({ehow})",
        f"  bytes: total {total} (code {_n(run.bytes_code)}, model {_n(run.bytes_model)})",
    ]
    lines.extend(f"  note: {n}" for n in run.notes)
    return lines


def record_date(folder: Path, sub: dict | None) -> str | None:
    """YYYY-MM-DD of a record: its folder name's, else submission.json's date; None if neither."""
    for text in (folder.name, str((sub or {}).get("date", ""))):
        match = re.match(r"^(\d{4}-\d{2}-\d{2})", text)
        if match:
            return match[1]
    return None


def before_seed_rule(date: str | None) -> bool:
    return date is not None and date < rules.MIN_SEEDS_FROM


def check_seeds(rep, runs: list[dialects.Run], date: str | None) -> None:
    seeds = {r.seed for r in runs}
    if rep.track != rules.RECORD_TRACK or len(seeds) >= rules.MIN_SEEDS:
        return
    message = f"{len(seeds)} seed(s); a record claim needs {rules.MIN_SEEDS}"
    if before_seed_rule(date):
        rep.warnings.append(
            f"{message} from {rules.MIN_SEEDS_FROM} on; this record is dated {date}, when the challenge "
            "README asked for a train log"
        )
    else:
        _flag(rep, "seeds<3", message)


def cross_check(rep, runs: list[dialects.Run], sub: dict, date: str | None) -> None:
    """submission.json's numbers against the scores the logs claim, to the digits printed. Rounding
    is a note; so is a headline that is one run's score in a record from before the three-seed rule
    (it stood on that run)."""
    for found in dialects.disagreements(runs, sub):
        if found.kind == "rounding":
            rep.warnings.append(found.message)
        elif found.kind == "one_run" and before_seed_rule(date):
            rep.warnings.append(f"{found.message}; this record is dated {date}, before the three-seed rule")
        else:
            _flag(rep, "score!=submission", found.message)
    for seed in sorted(set(dialects.submission_seeds(sub)) - {str(r.seed) for r in runs}):
        rep.warnings.append(f"submission.json has seed {seed} with no log in the folder")


def validate(rep) -> None:
    """Fill `rep` (a validate.Report) for a third-party folder."""
    folder = rep.folder
    script = folder / "train_gpt.py"
    rep.script = script.read_bytes() if script.is_file() else None
    if rep.script is None:
        rep.problems.append("missing train_gpt.py (the code cannot be counted)")
    for name in ("README.md", "submission.json"):
        if not (folder / name).is_file():
            rep.warnings.append(f"missing {name}")
    runs, notes = dialects.folder_runs(folder)
    rep.runs = runs
    rep.warnings.extend(notes)
    read = set(dialects.find_run_files(folder)) | set(folder.glob("logs/*"))
    for stray in sorted(set(folder.glob("*.log")) - read):
        rep.warnings.append(f"{stray.name}: not a run log in any known dialect (no step or final eval lines)")
    if not runs:
        rep.problems.append("no run logs in any known dialect (*.log / *.txt with step or final eval lines)")
    for run in runs:
        rep.facts.extend(facts(run))
        if run.claim() is None:
            _flag(rep, "no-score", f"{run.name}: no final evaluation line, so no score")
        check_times(rep, run)
        check_bytes(rep, run, None if rep.script is None else len(rep.script))
    sub, why = dialects.load_submission(folder)
    date = record_date(folder, sub)
    check_seeds(rep, runs, date)
    if sub is None:
        rep.warnings.append(f"submission.json: {why}")
        return
    missing = [k for k in rules.OFFICIAL_FIELDS if sub.get(k) in (None, "")]
    if "val_loss" in missing and dialects.submission_score(sub, "val_loss") is not None:
        missing.remove("val_loss")
    if missing:
        rep.warnings.append(f"submission.json lacks optional metadata: {', '.join(missing)}")
    cross_check(rep, runs, sub, date)
