"""`validate`: every check a reviewer makes on a record folder, recomputed from the files."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from . import packed, rules, scripts, summary, thirdparty
from .logparse import describe_problems, find_logs, hp_hash, hp_hash_matches, parse_log

REQUIRED_FILES = ("README.md", "submission.json", "train_gpt.py")
# Final-JSON keys the checks below read; a log without them cannot be reviewed.
REQUIRED_FINAL_KEYS = (
    "run_id",
    "seed",
    "script_sha256",
    "bytes_code",
    "steps",
    "train_time_s",
    "export_time_s",
    "eval_time_s",
    "val_loss",
    "val_bpb",
    "eval_mode",
    "scored_before_update",
    "bytes_model",
    "bytes_total",
    "ignored_env",
    "hp_hash",
)
FOLDER_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class Report:
    folder: Path
    track: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    script: bytes | None = None
    ours: bool = True  # made by `records new`; False: checked from what its logs state (thirdparty.py)
    facts: list[str] = field(default_factory=list)  # what a third-party folder's logs state
    flags: list[str] = field(default_factory=list)  # short names of the rules a third-party folder breaks
    runs: list = field(default_factory=list)  # dialects.Run of a third-party folder

    @property
    def ok(self) -> bool:
        return not self.problems

    def good_logs(self) -> list[dict]:
        return [log for log in self.logs if log["complete"]]


def _name(log: dict) -> str:
    return Path(log["path"]).name


# ---- files and logs ------------------------------------------------------------------------------


def check_files(rep: Report) -> None:
    for name in REQUIRED_FILES:
        if not (rep.folder / name).is_file():
            rep.problems.append(f"missing required file {name}")
    script = rep.folder / "train_gpt.py"
    rep.script = script.read_bytes() if script.is_file() else None
    if not FOLDER_RE.match(rep.folder.name):
        rep.warnings.append(f"folder name {rep.folder.name!r} is not YYYY-MM-DD_Name")
    parent = rep.folder.resolve().parent.name
    if parent.startswith("track_") and parent != f"track_{rep.track}":
        rep.problems.append(f"folder is under {parent}/ but is validated as track {rep.track}")
    paths = find_logs(rep.folder)
    for stray in sorted(set(rep.folder.glob("*.log")) - set(paths)):
        rep.problems.append(f"{stray.name}: .log file that is not a run log (no run_id first line)")
    if not paths:
        rep.problems.append("no run logs (*.log / *.txt starting with run_id:) in the folder")
    rep.logs = [parse_log(p) for p in paths]


def _final_eval_matches(log: dict, value) -> bool:
    return any(
        summary.matches(Decimal(repr(fe.get("val_bpb"))), value)
        for fe in log["final_evals"]
        if isinstance(fe.get("val_bpb"), float)
    )


def check_log_consistency(rep: Report, log: dict) -> None:
    """The final JSON must agree with the stable lines above it (same run, same numbers)."""
    name, final, art = _name(log), log["final"], log["artifact"] or {}
    absent = [k for k in REQUIRED_FINAL_KEYS if k not in final]
    if absent:
        rep.problems.append(f"{name}: final JSON lacks {', '.join(absent)}")
    pairs = (
        ("run_id", log["run_id"]),
        ("script_sha256", log["script_sha256"]),
        ("code_bytes_raw", log["header"].get("code_bytes_raw")),
        ("bytes_code", art.get("bytes_code")),
        ("hp_hash", log["hp_hash"]),
        ("bytes_total", art.get("bytes_total")),
        ("bytes_model", art.get("bytes_model")),
    )
    for key, line_value in pairs:
        if key in ("bytes_total", "bytes_model", "bytes_code") and line_value is None:
            continue  # a log may state the byte counts in the final JSON only
        if key in final and final[key] != line_value:
            rep.problems.append(
                f"{name}: final JSON {key}={final[key]!r} but the log line says {line_value!r}"
            )
    seed = log["hp"].get("SEED")
    if seed is not None and "seed" in final and str(final["seed"]) != seed:
        rep.problems.append(f"{name}: final JSON seed={final['seed']} but hp:SEED={seed}")
    if "val_bpb" in final and not _final_eval_matches(log, final["val_bpb"]):
        rep.problems.append(f"{name}: final val_bpb {final['val_bpb']} is not any final_eval line's val_bpb")
    if not log["steps"]:
        rep.problems.append(f"{name}: no training step lines")
    check_train_clock(rep, log)


def check_train_clock(rep: Report, log: dict) -> None:
    """The final JSON's steps/train_time_s must agree with the step lines, which the run printed as
    it went; an edited JSON (e.g. a trimmed train_time_s) shows up here."""
    final, name = log["final"], _name(log)
    points = log["steps"] + log["vals"]
    steps = final.get("steps")
    if not points or not isinstance(steps, int):
        return
    last_logged = max(p["step"] for p in points)
    if steps < last_logged:
        rep.problems.append(f"{name}: final JSON steps={steps} but step {last_logged} was logged")
    at_end = [p for p in points if p["step"] == steps and isinstance(p.get("train_time_ms"), int)]
    seconds = final.get("train_time_s")
    if at_end and isinstance(seconds, int | float) and abs(seconds * 1000 - at_end[-1]["train_time_ms"]) > 10:
        rep.problems.append(
            f"{name}: final JSON train_time_s={seconds} but the step {steps} line says "
            f"train_time_ms:{at_end[-1]['train_time_ms']}"
        )


def check_logs(rep: Report) -> None:
    for log in rep.logs:
        for problem in describe_problems(log):
            rep.problems.append(f"{_name(log)}: {problem}")
        if log["complete"]:
            check_log_consistency(rep, log)


def check_logs_agree(rep: Report) -> None:
    """All seeds of one submission must come from one script and one configuration."""
    logs = rep.good_logs()
    rep.problems.extend(disagreements(logs))


def disagreements(logs: list[dict]) -> list[str]:
    """Why these logs cannot be one submission (empty list when they can). Shared with `new`."""
    out = [
        f"{_name(log)}: hp_hash {log['hp_hash']} does not match its hp lines "
        f"({hp_hash(log['hp'], set(log.get('hp_unhashed') or ()) or rules.RUN_NAMING_HP)}): "
        "they were edited after the run"
        for log in logs
        if not hp_hash_matches(log)
    ]
    if not logs:
        return out
    first = logs[0]
    for log in logs[1:]:
        if log["script_sha256"] != first["script_sha256"]:
            out.append(f"{_name(log)}: script_sha256 differs from {_name(first)}")
        differ = differing_settings(first["hp"], log["hp"], set(first.get("hp_unhashed") or ()))
        if differ:
            shown = ", ".join(f"{k}={first['hp'].get(k)}->{log['hp'].get(k)}" for k in differ[:6])
            more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            out.append(
                f"{_name(log)}: hp_hash {log['hp_hash']} differs from {_name(first)}'s {first['hp_hash']}; "
                f"settings differ: {shown}{more}"
            )
    seeds = [log["final"].get("seed") for log in logs]
    dupes = sorted({str(s) for s in seeds if seeds.count(s) > 1})
    if dupes:
        out.append(f"seed(s) {', '.join(dupes)} appear in more than one log")
    return out


def differing_settings(a: dict[str, str], b: dict[str, str], unhashed=frozenset()) -> list[str]:
    """Names whose hp: lines differ between two logs, the run-naming knobs left out (they differ
    between seeds by design; logs that hashed them differ in hp_hash for that reason alone)."""
    names = (set(a) | set(b)) - rules.RUN_NAMING_HP - unhashed
    return sorted(k for k in names if a.get(k) != b.get(k))


# ---- rules ---------------------------------------------------------------------------------------


def check_script(rep: Report) -> None:
    """The logs were made by the script in the folder: train_gpt_source.py next to its packed form
    (CODE_BYTES_MODE=packed, see packed.py), else train_gpt.py itself or the script it unpacks to (a
    packed submission made before the source was kept beside it). code_bytes_raw is the size of the
    script that ran."""
    if rep.script is None:
        return
    source = rep.folder / packed.SOURCE_NAME
    if source.is_file():
        check_packed_source(rep, source)
        return
    sha = hashlib.sha256(rep.script).hexdigest()
    ran = {sha: len(rep.script)}
    unpacked, _ = scripts.unpack(rep.script.decode("utf-8", errors="replace"), rep.folder / "train_gpt.py")
    if unpacked.encode() != rep.script:
        ran[hashlib.sha256(unpacked.encode()).hexdigest()] = len(unpacked.encode())
    for log in rep.good_logs():
        if log["script_sha256"] not in ran:
            rep.problems.append(
                f"{_name(log)}: script_sha256 {log['script_sha256'][:12]}… does not match "
                f"train_gpt.py in the folder ({sha[:12]}…) or what it unpacks to: the logs were not "
                "made by this script"
            )
        elif log["header"].get("code_bytes_raw") != ran[log["script_sha256"]]:
            rep.problems.append(
                f"{_name(log)}: code_bytes_raw {log['header'].get('code_bytes_raw')} != the size of "
                f"the script that ran ({ran[log['script_sha256']]})"
            )


def check_packed_source(rep: Report, source: Path) -> None:
    """train_gpt_source.py made the logs, train_gpt.py is exactly its own pack_source's output, and
    the runs counted that file's size as code."""
    text = source.read_bytes()
    sha = hashlib.sha256(text).hexdigest()
    for log in rep.good_logs():
        name, final = _name(log), log["final"]
        if log["script_sha256"] != sha:
            rep.problems.append(
                f"{name}: script_sha256 {log['script_sha256'][:12]}… but {source.name} has sha256 "
                f"{sha[:12]}…: the logs were not made by this source"
            )
        elif log["header"].get("code_bytes_raw") != len(text):
            rep.problems.append(
                f"{name}: code_bytes_raw {log['header'].get('code_bytes_raw')} != the size of "
                f"{source.name} ({len(text)})"
            )
        counted = final.get("code_bytes_counted", final.get("bytes_code"))
        if counted != len(rep.script):
            rep.problems.append(
                f"{name}: code_bytes_counted {counted} != the size of train_gpt.py in the folder "
                f"({len(rep.script)}): the runs counted another file"
            )
    try:
        made = packed.packed_form(source)
    except Exception as exc:  # noqa: BLE001 (the folder's own code: any failure is a finding)
        rep.problems.append(f"{source.name}: its pack_source could not make the packed form ({exc!r})")
        return
    if made != rep.script:
        rep.problems.append(
            f"train_gpt.py ({len(rep.script):,} bytes) is not what pack_source of {source.name} makes "
            f"({len(made):,} bytes): rebuild the folder with `python -m records new`"
        )


def check_bytes(rep: Report) -> None:
    """bytes_total recomputed from the submitted script and the logged model size."""
    code = len(rep.script) if rep.script is not None else None
    for log in rep.good_logs():
        final, name = log["final"], _name(log)
        model = final.get("bytes_model")
        if "bytes_model" in final and not _is_count(model):
            rep.problems.append(f"{name}: bytes_model {model!r} is not a byte count")
        if code is None or not _is_count(model):
            continue
        total = code + model
        if total > rules.ARTIFACT_CAP_BYTES:
            rep.problems.append(
                f"{name}: artifact {total:,} bytes (code {code:,} + model {model:,}) exceeds "
                f"{rules.ARTIFACT_CAP_BYTES:,}"
            )
        if final.get("bytes_total") != total:
            rep.problems.append(
                f"{name}: logged bytes_total {final.get('bytes_total')} != recomputed {total}"
            )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_seconds(value) -> bool:
    """A finite, non-negative number (JSON also admits NaN and -Infinity, which compare as passing)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


TIME_KEYS = ("train_time_s", "export_time_s", "eval_time_s")
# Training start to artifact on disk, GPTQ calibration included, as train_gpt.py logs it; when the log
# states it, it is the figure the 600 s rule is checked on.
PRODUCTION_KEY = "artifact_production_wallclock_s"


def check_time(rep: Report) -> None:
    """Time fields must be real durations on every track; the 600 s limits apply on the record track."""
    for log in rep.good_logs():
        final, name = log["final"], _name(log)
        bad = [key for key in (*TIME_KEYS, PRODUCTION_KEY) if key in final and not _is_seconds(final[key])]
        for key in bad:
            rep.problems.append(f"{name}: {key} {final[key]!r} is not a duration in seconds")
        if bad or rep.track != rules.RECORD_TRACK or any(key not in final for key in TIME_KEYS):
            continue
        train = final["train_time_s"] + final["export_time_s"]
        if train > rules.TRAIN_LIMIT_S:
            rep.problems.append(
                f"{name}: training + export {train:.1f} s exceeds {rules.TRAIN_LIMIT_S:.0f} s "
                f"(train_time_s {final['train_time_s']}, export_time_s {final['export_time_s']})"
            )
        production = final.get(PRODUCTION_KEY)
        if production is not None and production > rules.TRAIN_LIMIT_S:
            rep.problems.append(
                f"{name}: {PRODUCTION_KEY} {production:.1f} exceeds {rules.TRAIN_LIMIT_S:.0f} s "
                "(training start to artifact on disk, calibration included)"
            )
        if final["eval_time_s"] > rules.EVAL_LIMIT_S:
            rep.problems.append(
                f"{name}: eval_time_s {final['eval_time_s']:.1f} exceeds {rules.EVAL_LIMIT_S:.0f} s"
            )


def check_hardware(rep: Report) -> None:
    """Record timings only count on 8xH100; a CPU or 1-GPU log cannot back a record claim."""
    if rep.track != rules.RECORD_TRACK:
        return
    for log in rep.good_logs():
        head = log["header"]
        gpus, world = str(head.get("gpus", "")), head.get("world_size")
        if head.get("device") != "cuda" or world != 8 or "H100" not in gpus:
            rep.problems.append(
                f"{_name(log)}: record runs must be 8xH100 (log: device:{head.get('device')} "
                f"gpus:{gpus} world_size:{world}); use --track {rules.NON_RECORD_TRACK} otherwise"
            )


def check_legality(rep: Report) -> None:
    for log in rep.good_logs():
        final, name = log["final"], _name(log)
        mode = final.get("eval_mode")
        if rules.eval_passes(mode) is None:
            rep.problems.append(
                f"{name}: eval_mode {mode!r} is not a legal one (one or more of "
                f"{', '.join(rules.EVAL_PASSES)} joined by +)"
            )
        if final.get("scored_before_update") is not True:
            rep.problems.append(f"{name}: scored_before_update is {final.get('scored_before_update')!r}")
        ignored = final.get("ignored_env")
        if ignored != []:
            rep.problems.append(f"{name}: ignored_env is {ignored!r} (unknown env vars were set)")


def check_seed_count(rep: Report) -> None:
    n = len(rep.good_logs())
    if rep.track == rules.RECORD_TRACK and 0 < n < rules.MIN_SEEDS:
        rep.warnings.append(f"only {n} seed(s); the p < 0.01 record claim normally needs {rules.MIN_SEEDS}")


# ---- submission.json and README agree with the logs ------------------------------------------


def _compare(rep: Report, where: str, printed, actual) -> None:
    """Add a problem unless `printed` (as written in the file) equals `actual` to its precision."""
    if isinstance(printed, bool) or not isinstance(printed, int | Decimal | type(None)):
        rep.problems.append(f"{where}: {printed!r} is not a number (logs say {actual})")
        return
    if isinstance(printed, int) and isinstance(actual, int):
        ok = printed == actual
    else:
        ok = summary.matches(None if printed is None else Decimal(printed), actual)
    if not ok:
        rep.problems.append(f"{where} is {printed} but the logs give {actual}")


def _load_submission(rep: Report) -> dict | None:
    path = rep.folder / "submission.json"
    if not path.is_file():
        return None
    try:
        # Decimal keeps the digits as written, so "to the printed precision" is well defined.
        sub = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        rep.problems.append(f"submission.json does not parse: {exc}")
        return None
    if not isinstance(sub, dict):
        rep.problems.append("submission.json is not a JSON object")
        return None
    return sub


SEED_RESULT_KEYS = {
    "val_loss": "val_loss",
    "val_bpb": "val_bpb",
    "pre_quant_val_bpb": "pre_quant_val_bpb",
    "val_bpb_flat": "val_bpb_flat",
    "post_quant_val_bpb": "val_bpb_flat",  # its name in folders made before the pass renaming
    "artifact_bytes": "bytes_total",
    "steps": "steps",
    "step_avg_ms": "step_avg_ms",
    "train_time_s": "train_time_s",
    "export_time_s": "export_time_s",
    "eval_time_s": "eval_time_s",
}


def check_submission(rep: Report, rows: list[dict], agg: dict) -> None:
    sub = _load_submission(rep)
    if sub is None:
        return
    for key in rules.OFFICIAL_FIELDS:
        if key not in sub or sub[key] in ("", None):
            rep.problems.append(f"submission.json: missing or empty {key!r}")
    track = sub.get("track")
    if track is not None and track != rep.track:
        rep.problems.append(
            f"submission.json track is {track!r} but validating as {rep.track!r} (see --track)"
        )
    _check_date(rep, sub.get("date"))
    if not rows:
        return
    for key in ("val_loss", "val_bpb"):
        _check_score_precision(rep, f"submission.json {key}", sub.get(key))
    for key, actual in (
        ("val_loss", agg["val_loss"][0]),
        ("val_bpb", agg["val_bpb"][0]),
        ("val_loss_std", agg["val_loss"][1]),
        ("val_bpb_std", agg["val_bpb"][1]),
        ("bytes_total", agg["bytes_total_max"]),
        ("bytes_code", None if rep.script is None else len(rep.script)),
        ("artifact_bytes_max", agg["bytes_total_max"]),
    ):
        if key in sub:
            _compare(rep, f"submission.json {key}", sub[key], actual)
    _check_seed_results(rep, sub, rows)
    _check_compliance(rep, sub)


def _check_score_precision(rep: Report, where: str, printed) -> None:
    if isinstance(printed, int | Decimal) and summary.decimals(Decimal(printed)) < rules.MIN_SCORE_DECIMALS:
        rep.problems.append(f"{where} {printed} has fewer than {rules.MIN_SCORE_DECIMALS} decimals")


def _check_date(rep: Report, date) -> None:
    match = FOLDER_RE.match(rep.folder.name)
    if match and isinstance(date, str) and not date.startswith(match.group(1)):
        rep.warnings.append(f"submission.json date {date} differs from the folder's date {match.group(1)}")


def _check_seed_results(rep: Report, sub: dict, rows: list[dict]) -> None:
    by_seed = {str(r["seed"]): r for r in rows}
    if "seeds" in sub and sorted(map(str, sub["seeds"])) != sorted(by_seed):
        rep.problems.append(f"submission.json seeds {sub['seeds']} != seeds in the logs {sorted(by_seed)}")
    results = sub.get("seed_results")
    if not isinstance(results, dict):
        return
    for seed in sorted(set(results) - set(by_seed)):
        rep.problems.append(f"submission.json seed_results has seed {seed} with no log in the folder")
    for seed in sorted(set(by_seed) - set(results)):
        rep.problems.append(f"submission.json seed_results lacks seed {seed}")
    for seed, entry in results.items():
        if seed not in by_seed or not isinstance(entry, dict):
            continue
        for key, row_key in SEED_RESULT_KEYS.items():
            if key in entry:
                _compare(
                    rep, f"submission.json seed_results[{seed}].{key}", entry[key], by_seed[seed][row_key]
                )


def _check_compliance(rep: Report, sub: dict) -> None:
    claimed = sub.get("compliance")
    if not isinstance(claimed, dict):
        return
    actual = summary.compliance(rep.good_logs(), None if rep.script is None else len(rep.script))
    for key, value in claimed.items():
        if key in actual and value is True and actual[key] is not True:
            rep.problems.append(f"submission.json compliance.{key} is true but the logs say otherwise")


def check_readme(rep: Report, rows: list[dict], agg: dict) -> None:
    path = rep.folder / "README.md"
    if not path.is_file() or not rows:
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if "TODO" in text:
        rep.warnings.append("README.md still has TODO placeholders (the skeleton from `new`)")
    block = summary.parse_results_block(text)
    if block is None:
        rep.problems.append("README.md has no generated results block (see `python -m records new`)")
        return
    _check_headline(rep, block["headline"], agg)
    by_seed = {str(r["seed"]): r for r in rows}
    seen = set()
    for cells in block["rows"]:
        label = cells.get("Seed", "").replace("*", "").strip()
        if label in ("Mean", "Std"):
            which = 0 if label == "Mean" else 1  # aggregate() keeps (mean, std) per column
            values = {k: v[which] for k, v in agg.items() if isinstance(v, tuple)}
            _check_cells(rep, f"README {label} row", cells, values)
        elif label in by_seed:
            seen.add(label)
            _check_cells(rep, f"README seed {label} row", cells, by_seed[label])
        else:
            rep.problems.append(f"README results row {label!r} matches no log")
    for seed in sorted(set(by_seed) - seen):
        rep.problems.append(f"README results table lacks seed {seed}")


def _check_headline(rep: Report, head: dict | None, agg: dict) -> None:
    if head is None:
        rep.problems.append("README results block lacks the '**val_bpb: X** (N-seed mean, std Y)' line")
        return
    expected = (
        ("bpb", agg["val_bpb"][0]),
        ("std", agg["val_bpb"][1]),
        ("loss", agg["val_loss"][0]),
        ("bytes", agg["bytes_total_max"]),
    )
    for key, actual in expected:
        if head.get(key) is None:
            continue
        value, ok = summary.printed_number(head[key])
        if not ok or not summary.matches(value, actual):
            rep.problems.append(f"README headline {key} is {head[key]} but the logs give {actual}")
        elif key == "bpb":
            _check_score_precision(rep, "README headline val_bpb", value)
    if int(head["n"]) != agg["n"]:
        rep.problems.append(f"README headline says {head['n']}-seed mean but there are {agg['n']} logs")


def _check_cells(rep: Report, where: str, cells: dict, values: dict) -> None:
    for header, key, *_ in summary.COLUMNS[1:]:
        if header not in cells or key not in values or cells[header] == "":
            continue
        printed, ok = summary.printed_number(cells[header])
        if not ok or not summary.matches(printed, values[key]):
            rep.problems.append(f"{where}: {header} is {cells[header]!r} but the logs give {values[key]}")


# ---- entry point ---------------------------------------------------------------------------------


def validate_folder(folder, track: str = rules.RECORD_TRACK) -> Report:
    rep = Report(folder=Path(folder), track=track)
    if not rep.folder.is_dir():
        rep.problems.append(f"{folder} is not a directory")
        return rep
    rep.ours = thirdparty.is_ours(rep.folder, bool(find_logs(rep.folder)))
    if not rep.ours:
        try:
            thirdparty.validate(rep)
        except OSError as exc:  # e.g. a file that cannot be opened: one line, not a traceback
            rep.problems.append(f"unreadable: {exc}")
        return rep
    check_files(rep)
    check_logs(rep)
    check_logs_agree(rep)
    check_script(rep)
    check_bytes(rep)
    check_time(rep)
    check_hardware(rep)
    check_legality(rep)
    check_seed_count(rep)
    rows = [summary.seed_row(log) for log in rep.good_logs()]
    agg = summary.aggregate(rows) if rows else {}
    check_submission(rep, rows, agg)
    check_readme(rep, rows, agg)
    return rep


def format_report(rep: Report) -> str:
    lines = []
    if not rep.ours:
        verdict = "OK" if rep.ok else f"FAILED ({len(rep.problems)} problem(s))"
        lines.append(
            f"{verdict} {rep.folder} [{rep.track}], not made by `records new`: "
            "checked from what its logs state"
        )
        lines.extend(f"  {f}" for f in rep.facts)
        if rep.problems:
            lines.append("problems:")
            lines.extend(f"  - {p}" for p in rep.problems)
    elif rep.ok:
        lines.append(f"OK {rep.folder} [{rep.track}]: {ok_summary(rep)}")
    else:
        lines.append(f"FAILED {rep.folder} [{rep.track}]: {len(rep.problems)} problem(s)")
        lines.extend(f"  - {p}" for p in rep.problems)
    if rep.warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in rep.warnings)
    return "\n".join(lines)


def ok_summary(rep: Report) -> str:
    rows = [summary.seed_row(log) for log in rep.good_logs()]
    agg = summary.aggregate(rows)
    mean, std = agg["val_bpb"]
    train = max(r["train_export_s"] for r in rows)
    evals = max(r["eval_time_s"] for r in rows)
    return (
        f"{agg['n']} seed(s), val_bpb {summary.fmt(mean, '{:.5f}')} ± {summary.fmt(std, '{:.5f}')}, "
        f"val_loss {summary.fmt(agg['val_loss'][0], '{:.5f}')}, "
        f"max bytes_total {agg['bytes_total_max']:,} / {rules.ARTIFACT_CAP_BYTES:,}, "
        f"max train+export {train:.1f} s, max eval {evals:.1f} s, eval_mode {rows[0]['eval_mode']}"
    )
