"""Protocol P1 ablation of the defaults: each technique switched off alone, one P1 run each.

Run from the repo root on a GPU machine (the kit as bench/p1.sh wants it):
    KIT=.gpu python3 bench/p1_ablation.py                     every ablation, then the table
    KIT=.gpu python3 bench/p1_ablation.py --only default no_lqer
    python3 bench/p1_ablation.py --dry-run                    the commands only
    python3 bench/p1_ablation.py --table                      the table from logs already written

Each run is `bash bench/p1.sh` (240 s of training on one GPU, then the export and every default
evaluation pass) with RUN_ID=p1_<name> and the ablation's knobs; it writes logs/p1_<name>.txt.
The table (markdown, for bench/RESULTS.md) reads each log's final JSON line: steps, ms/step,
val_bpb before quantisation, the quantisation gap, the final val_bpb and its difference to the
default run, and the artifact's bytes. A run that has no final JSON line shows as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

# The defaults are R0427's configuration; each entry turns one of its techniques off (or, for the
# last two, swaps a whole stage for the March stack's).
ABLATIONS: dict[str, dict[str, str]] = {
    "default": {},
    "no_two_lane": {"PARALLEL_START_LAYER": "0"},
    "no_recurrence": {"NUM_LOOPS": "0"},
    "no_sparse_gate": {"SPARSE_ATTN_GATE_ENABLED": "0"},
    "no_skip_gates": {"SKIP_GATES_ENABLED": "0"},
    "no_smear_gate": {"SMEAR_GATE": "0"},
    "no_varlen": {"VARLEN_ATTN": "0"},
    "no_polar_express": {"MUON_POLAR_EXPRESS": "0"},
    "no_min_lr": {"MIN_LR": "0"},
    "no_momentum_warmup": {"MUON_MOMENTUM_WARMUP_STEPS": "0"},
    "no_fused_kernels": {"FUSED_MLP_ENABLED": "0", "FUSED_CE_ENABLED": "0"},
    "no_class_clip": {"MLP_CLIP_SIGMAS": "0", "ATTN_CLIP_SIGMAS": "0", "EMBED_CLIP_SIGMAS": "0"},
    "no_lqer": {"LQER_ENABLED": "0"},
    "no_quant_gate": {"GATED_ATTN_QUANT_GATE": "0"},
    "ttt_chunked": {"TTT_MODE": "chunked"},
    "march": {"RUN_PRESET": "march"},
}
COLUMNS = ("run", "knobs", "steps", "ms/step", "pre-quant val_bpb", "quant gap", "val_bpb", "vs default")
COLUMNS += ("bytes",)


def run_env(name: str) -> dict[str, str]:
    return {"RUN_ID": f"p1_{name}", **ABLATIONS[name]}


def command(name: str) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in run_env(name).items())
    return f"{knobs} bash bench/p1.sh"


def final_json(log: Path) -> dict | None:
    if not log.is_file():
        return None
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def table(log_dir: Path, names: list[str]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    base = final_json(log_dir / "p1_default.txt")
    for name in names:
        knobs = " ".join(f"`{k}={v}`" for k, v in ABLATIONS[name].items()) or "defaults"
        got = final_json(log_dir / f"p1_{name}.txt")
        if got is None:
            rows.append(f"| {name} | {knobs} | missing |" + " |" * (len(COLUMNS) - 3))
            continue
        delta = f"{got['val_bpb'] - base['val_bpb']:+.4f}" if base else "n/a"
        cells = (name, knobs, got["steps"], got["step_avg_ms"], f"{got['pre_quant_val_bpb']:.4f}")
        cells += (f"{got['quant_gap']:+.4f}", f"{got['val_bpb']:.4f}", delta, f"{got['bytes_total']:,}")
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def check(names: list[str]) -> None:
    """Every ablation is a valid configuration (the script refuses unknown or inconsistent knobs)."""
    for name in names:
        tg.Hyperparameters({**run_env(name), "VOCAB_SIZE": "1024", "CASEOPS_ENABLED": "0"})


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--only", nargs="+", choices=sorted(ABLATIONS), help="these ablations only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table", action="store_true", help="only print the table from logs/p1_*.txt")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs", help="where the runs' logs are")
    args = parser.parse_args()
    names = args.only or list(ABLATIONS)
    check(names)
    if not args.table:
        for name in names:
            print(f"ablation:{name} command:{command(name)}", flush=True)
            if not args.dry_run:
                env = {**os.environ, **run_env(name)}
                subprocess.run(["bash", "bench/p1.sh"], cwd=ROOT, env=env, check=False)
    if not args.dry_run:
        print(table(args.log_dir, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
