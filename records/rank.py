"""`rank`: one table for a whole track folder (a folder of record folders), sorted by score.

Every record folder is validated (ours or third-party, see validate.py) and its per-seed final
scores are the ones validate reads; a folder whose logs give no score falls back to
submission.json, and the table says so. Nothing is written: the table goes to stdout.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import dialects, summary, validate

COLUMNS = ("rank", "date", "name", "val_bpb", "std", "seeds", "bytes", "train_s", "eval_s", "source", "flags")


@dataclass
class Row:
    folder: str
    date: str = ""
    name: str = ""
    bpbs: list[float] = field(default_factory=list)
    bytes_max: int | None = None
    train_s: float | None = None
    eval_s: float | None = None
    source: str = "logs"
    flags: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return summary.mean_std(self.bpbs)[0] if self.bpbs else None

    @property
    def std(self) -> float | None:
        return summary.mean_std(self.bpbs)[1] if self.bpbs else None


def _max(values) -> float | None:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return max(vals) if vals else None


def _fill_ours(row: Row, rep: validate.Report) -> None:
    rows = [summary.seed_row(log) for log in rep.good_logs()]
    row.bpbs = [r["val_bpb"] for r in rows if isinstance(r["val_bpb"], float)]
    row.bytes_max = _max(r["bytes_total"] for r in rows)
    production = [log["final"].get("artifact_production_wallclock_s") for log in rep.good_logs()]
    row.train_s = _max(
        p if p is not None else r["train_export_s"] for p, r in zip(production, rows, strict=True)
    )
    row.eval_s = _max(r["eval_time_s"] for r in rows)
    if rep.problems:
        row.flags.append(f"{len(rep.problems)} problem(s)")


def _fill_third_party(row: Row, rep: validate.Report) -> None:
    claims = [run.claim() for run in rep.runs]
    row.bpbs = [c.val_bpb for c in claims if c is not None and math.isfinite(c.val_bpb)]
    row.bytes_max = _max(run.bytes_total for run in rep.runs)
    row.train_s = _max(run.production_seconds()[0] or run.train_time_s for run in rep.runs)
    row.eval_s = _max(run.eval_seconds()[0] for run in rep.runs)
    row.flags.extend(rep.flags)


def _fallback(row: Row, sub: dict | None) -> None:
    """No score in the logs: the per-seed or headline val_bpb of submission.json, marked as such."""
    if row.bpbs or not sub:
        return
    per_seed = dialects.submission_seeds(sub)
    bpbs = [dialects.number(e.get("val_bpb")) for e in per_seed.values()]
    row.bpbs = [b for b in bpbs if b is not None]
    if not row.bpbs and dialects.submission_score(sub, "val_bpb") is not None:
        row.bpbs = [dialects.submission_score(sub, "val_bpb")]
    row.source = "submission.json" if row.bpbs else "none"
    if row.bytes_max is None:
        row.bytes_max = dialects.number(sub.get("bytes_total"))


def rank_row(folder: Path, track: str) -> Row:
    rep = validate.validate_folder(folder, track)
    sub, _ = dialects.load_submission(folder)
    match = re.match(r"^(\d{4}-\d{2}-\d{2})_(.*)$", folder.name)
    row = Row(folder=folder.name)
    row.date = match[1] if match else str((sub or {}).get("date", ""))
    row.name = str((sub or {}).get("name") or (match[2] if match else folder.name))
    (_fill_ours if rep.ours else _fill_third_party)(row, rep)
    _fallback(row, sub)
    return row


def rank_folder(track_folder, track: str) -> tuple[list[Row], list[str]]:
    """(rows sorted by mean val_bpb, folders without any score last; one-line reasons)."""
    rows, skipped = [], []
    for folder in sorted(p for p in Path(track_folder).iterdir() if p.is_dir()):
        try:
            rows.append(rank_row(folder, track))
        except (OSError, UnicodeError, ValueError) as exc:
            skipped.append(f"{folder.name}: unreadable ({exc})")
    rows.sort(key=lambda r: (r.mean is None, r.mean or 0.0, r.date))
    return rows, skipped


def _cells(i: int, row: Row) -> list[str]:
    return [
        str(i),
        row.date,
        row.name,
        summary.fmt(row.mean, "{:.5f}"),
        summary.fmt(row.std, "{:.5f}"),
        str(len(row.bpbs)),
        summary.fmt(row.bytes_max, "{:,.0f}"),
        summary.fmt(row.train_s, "{:.1f}"),
        summary.fmt(row.eval_s, "{:.1f}"),
        row.source,
        " ".join(row.flags) or "ok",
    ]


def format_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i, row in enumerate(rows, start=1):
        cells = [c.replace("|", "\\|") for c in _cells(i, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i, row in enumerate(rows, start=1):
        cells = ["" if c == summary.MISSING else c for c in _cells(i, row)]
        cells[6] = cells[6].replace(",", "")  # a plain number for spreadsheets
        writer.writerow(cells)
    return out.getvalue().rstrip("\n")
