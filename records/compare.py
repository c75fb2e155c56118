"""`compare`: the record rule. A candidate is a record when its mean final val_loss beats the
baseline's by more than 0.005 nats at p < 0.01 (one-sided Welch t-test over per-seed losses)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

from . import dialects
from .logparse import describe_problems, find_logs, looks_like_log, parse_log


class InputError(Exception):
    """A side of the comparison could not be read."""


@dataclass
class Side:
    label: str
    runs: list[dict] = field(default_factory=list)  # {run, seed, val_loss, val_bpb, val_tokens, source}
    notes: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.runs]


def _run_from_log(path: Path) -> dict:
    log = parse_log(path)
    problems = describe_problems(log)
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    final = log["final"]
    for key in ("val_loss", "val_bpb"):
        value = final.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{path}: final JSON {key} is {value!r}, not a finite number (diverged run?)")
    return {
        "run": final.get("run_id") or str(path.resolve()),
        "seed": final.get("seed"),
        "val_loss": float(final["val_loss"]),
        "val_bpb": float(final["val_bpb"]),
        "val_tokens": final.get("val_tokens"),
        "source": path.name,
    }


def _runs_from_submission(folder: Path) -> list[dict]:
    """Per-seed losses from submission.json seed_results, for baselines (e.g. official records) whose
    logs are not in our format. Only val_loss/val_bpb are read."""
    sub, _ = dialects.load_submission(folder)
    if sub is None:
        return []
    path = folder / "submission.json"
    results = dialects.submission_seeds(sub)
    runs = []
    for seed, entry in results.items():
        if not isinstance(entry, dict) or "val_loss" not in entry:
            raise InputError(
                f"{path}: the per-seed results give no val_loss for seed {seed}; cannot test in nats"
            )
        bpb = entry.get("val_bpb")
        runs.append(
            {
                "run": f"{folder.resolve()} seed {seed}",
                "seed": seed,
                "val_loss": float(entry["val_loss"]),
                "val_bpb": math.nan if bpb is None else float(bpb),
                "val_tokens": None,
                "source": "submission.json",
            }
        )
    return runs


def _run_from_official(run: dialects.Run) -> dict:
    """A log of another dialect: its claimed score (the last evaluation of the highest stage)."""
    claim = run.claim()
    if claim is None:
        raise InputError(
            f"{run.path}: read as {run.dialect} but it has no final evaluation line "
            "(val_loss/val_bpb after quantization), so it gives no per-seed score"
        )
    if not (math.isfinite(claim.val_loss) and math.isfinite(claim.val_bpb)):
        raise InputError(f"{run.path}: final evaluation is not a finite number ({claim.text})")
    return {
        "run": str(run.path.resolve()),
        "seed": run.seed,
        "val_loss": claim.val_loss,
        "val_bpb": claim.val_bpb,
        "val_tokens": run.val_tokens,
        "source": dialects.score_source(run),
    }


def _load_folder(side: Side, path: Path) -> None:
    logs = find_logs(path)
    if logs:
        side.runs.extend(_run_from_log(p) for p in logs)
        return
    runs, notes = dialects.folder_runs(path)
    if runs:
        side.runs.extend(_run_from_official(r) for r in runs)
        dialect_names = sorted({r.dialect for r in runs})
        side.notes.append(f"{path.name}: logs read as {'; '.join(dialect_names)}")
        side.notes.extend(f"{path.name}: {n}" for n in notes)
        sub, _ = dialects.load_submission(path)
        if sub is not None:
            side.notes.extend(f"{path.name}: {d.message}" for d in dialects.disagreements(runs, sub))
        return
    subs = _runs_from_submission(path)
    if not subs:
        raise InputError(
            f"{path}: no run logs and no per-seed val_loss in submission.json; this side has no "
            "per-seed numbers to test"
        )
    side.notes.append(f"{path}: per-seed values read from submission.json (no run logs found)")
    side.runs.extend(subs)


def load_side(label: str, paths) -> Side:
    side = Side(label=label)
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            _load_folder(side, path)
        elif path.is_file() and looks_like_log(path):
            side.runs.append(_run_from_log(path))
        elif path.is_file():
            run = dialects.read_run(path)
            side.runs.append(_run_from_official(run))
            side.notes.append(f"{path.name}: read as {run.dialect}")
        else:
            raise InputError(f"{path}: no such file or folder")
    sources: dict[str, str] = {}
    for run in side.runs:  # a run given twice (a log and its copy in a folder) would count twice
        if run["run"] in sources:
            raise InputError(
                f"{label}: run {run['run']} is given twice ({sources[run['run']]} and {run['source']})"
            )
        sources[run["run"]] = run["source"]
    return side


@dataclass
class Verdict:
    record: bool
    delta_nats: float
    delta_bpb: float
    t: float
    df: float
    p: float
    reason: str


def welch_test(a: list[float], b: list[float], shift: float) -> tuple[float, float, float]:
    """(t, df, p) of the one-sided Welch test H1: mean(a) - mean(b) > shift; all nan when both
    samples have zero variance (the standard error is 0 and the test is undefined).

    Computed from the sample statistics rather than by shifting the data: subtracting `shift`
    from each value would add rounding noise to a zero-variance sample and turn an undefined
    test into t ~ 1e14, p ~ 0.
    """
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return math.nan, math.nan, math.nan
    t = (statistics.fmean(a) - statistics.fmean(b) - shift) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, float(stats.t.sf(t, df))


def decide(base: Side, cand: Side, min_delta: float, alpha: float) -> Verdict:
    b, c = base.values("val_loss"), cand.values("val_loss")
    delta = statistics.fmean(b) - statistics.fmean(c)
    delta_bpb = statistics.fmean(base.values("val_bpb")) - statistics.fmean(cand.values("val_bpb"))
    if len(b) < 2 or len(c) < 2:
        reason = "each side needs at least 2 seeds for a Welch test"
        return Verdict(False, delta, delta_bpb, math.nan, math.nan, math.nan, reason)
    # H0: mean(b) - mean(c) <= min_delta against H1: mean(b) - mean(c) > min_delta.
    t, df, p = welch_test(b, c, min_delta)
    if math.isnan(p):
        reason = "test undefined (zero variance on both sides)"
        return Verdict(False, delta, delta_bpb, t, df, p, reason)
    record = p < alpha
    cmp = "<" if record else ">="
    reason = f"improvement {delta:+.5f} nats vs required > {min_delta} nats: p = {p:.3g} {cmp} {alpha}"
    return Verdict(record, delta, delta_bpb, t, df, p, reason)


def _side_table(side: Side) -> list[str]:
    lines = [
        f"{side.label} ({len(side.runs)} run(s))",
        f"  {'seed':>8}  {'val_loss':>12}  {'val_bpb':>12}  source",
    ]
    for r in side.runs:
        lines.append(f"  {str(r['seed']):>8}  {r['val_loss']:12.8f}  {r['val_bpb']:12.8f}  {r['source']}")
    for name, fn in (("mean", statistics.fmean), ("std", statistics.stdev)):
        if name == "std" and len(side.runs) < 2:
            continue
        loss, bpb = fn(side.values("val_loss")), fn(side.values("val_bpb"))
        lines.append(f"  {name:>8}  {loss:12.8f}  {bpb:12.8f}")
    lines.extend(f"  note: {n}" for n in side.notes)
    return lines


def tokenisation_warning(base: Side, cand: Side) -> str | None:
    """val_loss is nats per token: only comparable when both sides scored the same tokens."""
    tokens = {r["val_tokens"] for r in base.runs + cand.runs if r["val_tokens"] is not None}
    if len(tokens) > 1:
        return f"warning: val_tokens differ between runs ({sorted(tokens)}); nats/token are not comparable"
    return None


def format_comparison(base: Side, cand: Side, v: Verdict, min_delta: float, alpha: float) -> str:
    lines = _side_table(base) + [""] + _side_table(cand) + [""]
    lines.append(f"delta (baseline - candidate): {v.delta_nats:+.5f} nats, {v.delta_bpb:+.5f} bpb")
    lines.append(
        f"one-sided Welch t-test, H1: mean(baseline) - mean(candidate) > {min_delta} nats: "
        f"t = {v.t:.3f}, df = {v.df:.2f}, p = {v.p:.3g}"
    )
    warning = tokenisation_warning(base, cand)
    if warning:
        lines.append(warning)
    verdict = "RECORD" if v.record else "NOT A RECORD"
    lines.append(f"verdict: {verdict} ({v.reason})")
    return "\n".join(lines)
