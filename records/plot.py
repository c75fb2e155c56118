"""`plot`: validation bpb and training loss against wallclock and step, for READMEs and reviews."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and the GPU boxes have no display
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from . import dialects  # noqa: E402
from .logparse import find_logs, parse_log  # noqa: E402


def official_log(path: Path) -> dict:
    """A log in an official record's dialect, in the shape parse_log gives ours: its step-line
    points (April val lines carry the latest stated time) and the score it stands on."""
    run = dialects.read_official_text(path.read_text(encoding="utf-8", errors="replace"), path)
    claim = run.claim()
    return dict(
        run_id=f"{path.parent.name[:28]}/{path.stem}",
        path=str(path),
        truncated=False,
        vals=[p for p in run.curve if "val_bpb" in p],
        steps=[p for p in run.curve if "train_loss" in p],
        final={"val_bpb": claim.val_bpb} if claim is not None else {},
    )


def read_any(path: Path) -> dict:
    return parse_log(path) if dialects.first_line(path).startswith("run_id:") else official_log(path)


def collect_logs(paths) -> list[dict]:
    """Parse every log named directly or found in a record folder, ours or an official record's.
    Truncated logs are still plotted (a crashed run's curve is worth seeing), so completeness is
    not required here."""
    logs = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = find_logs(path) or dialects.find_run_files(path)
            if not found:
                raise FileNotFoundError(f"{path}: no run logs in this folder (ours or an official dialect)")
            logs.extend(read_any(p) for p in found)
        elif path.is_file():
            logs.append(read_any(path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return logs


def _label(log: dict) -> str:
    run = log["run_id"] or Path(log["path"]).stem
    return f"{run} (truncated)" if log["truncated"] else run


def plot_runs(logs: list[dict], out: Path, title: str | None = None) -> Path:
    """2x2 grid: val_bpb and train_loss (rows) against wallclock seconds and step (columns)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    series = (("vals", "val_bpb", "val_bpb"), ("steps", "train_loss", "train loss (nats)"))
    for row, (kind, key, ylabel) in enumerate(series):
        for log in logs:
            points = [p for p in log[kind] if key in p]
            seconds = [p["train_time_ms"] / 1000.0 for p in points]
            steps = [p["step"] for p in points]
            ys = [p[key] for p in points]
            style = "o-" if kind == "vals" else "-"
            axes[row][0].plot(seconds, ys, style, markersize=3, label=_label(log))
            axes[row][1].plot(steps, ys, style, markersize=3, label=_label(log))
        for col, xlabel in enumerate(("train wallclock (s)", "step")):
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].set_ylabel(ylabel)
            axes[row][col].grid(True, alpha=0.3)
    _mark_final(axes[0][0], axes[0][1], logs)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "val_bpb (x: final score after export) and train loss")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mark_final(ax_time, ax_step, logs: list[dict]) -> None:
    """The final score (after export/quantisation/eval) as a cross at the end of each curve."""
    for log in logs:
        final = log["final"] or {}
        if final.get("val_bpb") is None or not log["steps"]:
            continue
        last = log["steps"][-1]
        ax_time.plot([last["train_time_ms"] / 1000.0], [final["val_bpb"]], "kx")
        ax_step.plot([last["step"]], [final["val_bpb"]], "kx")
