"""Parser for the run log that train_gpt.py writes (format: docs/interfaces.md).

Everything else in this package reads logs through `parse_log` only, so a change of the log
format is absorbed here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import rules

# Stable lines a complete log must contain, keyed by the name used in `missing`.
REQUIRED_LINES = (
    "run_id",
    "script_sha256",
    "versions",
    "device",
    "preset",
    "hp",
    "hp_hash",
    "final_eval",
    "artifact_path",
    "final_json",
)
# Header lines that must appear exactly once; a second copy means two runs share one file
# (for instance a re-run that appended to logs/<RUN_ID>.txt).
SINGLE_LINES = ("run_id", "script_sha256", "versions", "device", "preset", "hp_hash", "artifact_path")

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*:")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf)$", re.IGNORECASE)


def convert(value: str):
    """int, float or the string itself; logs print numbers without units."""
    if _INT_RE.match(value):
        return int(value)
    if _FLOAT_RE.match(value):
        return float(value)
    return value


def split_pairs(line: str) -> tuple[str | None, dict[str, str]]:
    """Split `key:value key:value` into (leading bare word or None, {key: raw value}).

    A space-separated token without a colon continues the previous value, because free-text values
    such as the GPU name ("1xNVIDIA H100 80GB HBM3") or `stopping_early: wallclock_cap` contain
    spaces.
    """
    tag = None
    pairs: dict[str, str] = {}
    last = None
    for token in line.split(" "):
        if _KEY_RE.match(token):
            key, _, value = token.partition(":")
            pairs[key] = value
            last = key
        elif last is not None:
            pairs[last] = f"{pairs[last]} {token}".strip()
        elif tag is None:
            tag = token
        else:
            tag = f"{tag} {token}"
    return tag, pairs


def _typed(pairs: dict[str, str]) -> dict:
    return {k: convert(v) for k, v in pairs.items()}


def _step_fields(pairs: dict[str, str]) -> dict:
    done, _, total = pairs["step"].partition("/")
    fields = _typed({k: v for k, v in pairs.items() if k != "step"})
    fields["step"] = convert(done)
    fields["total"] = convert(total) if total else None
    return fields


def empty_log(path: str) -> dict:
    return {
        "path": path,
        "run_id": None,
        "script_sha256": None,
        "header": {},
        "versions": {},
        "preset": None,
        "hp": {},
        "hp_hash": None,
        "hp_unhashed": [],
        "steps": [],
        "vals": [],
        "final_evals": [],
        "stopping_early": None,
        "artifact": None,
        "final": None,
        "counts": {},
        "other": [],
        "errors": [],
        "missing": [],
        "truncated": False,
        "complete": False,
    }


def _parse_line(log: dict, line: str) -> None:
    """Fold one log line into `log`; unknown lines are kept in log["other"]."""
    counts = log["counts"]
    if line.startswith("{"):
        counts["final_json"] = counts.get("final_json", 0) + 1
        log["_json_line"] = line  # the last line starting with "{" is the final JSON
        return
    if line.startswith("hp:"):
        name, sep, value = line[3:].partition("=")
        if not sep:
            log["errors"].append(f"malformed hp line: {line!r}")
            return
        if name in log["hp"]:
            log["errors"].append(f"hp:{name} is logged twice")
        log["hp"][name] = value
        counts["hp"] = counts.get("hp", 0) + 1
        return
    tag, pairs = split_pairs(line)
    kind = tag if tag == "versions" else next(iter(pairs), None)
    if kind is None:
        log["other"].append(line)
        return
    if kind == "step":
        _parse_step(log, line, pairs)
        return
    handler = _HANDLERS.get(kind)
    if handler is None:
        log["other"].append(line)
        return
    counts[kind] = counts.get(kind, 0) + 1
    handler(log, pairs)


def _parse_step(log: dict, line: str, pairs: dict[str, str]) -> None:
    try:
        fields = _step_fields(pairs)
    except (KeyError, ValueError):
        log["errors"].append(f"malformed step line: {line!r}")
        return
    if "val_loss" in pairs:
        log["vals"].append(fields)
    elif "train_loss" in pairs:
        log["steps"].append(fields)
    else:
        log["other"].append(line)


def _set_run_id(log, pairs):
    log["run_id"] = pairs["run_id"]


def _set_script(log, pairs):
    log["script_sha256"] = pairs["script_sha256"]
    header = _typed(pairs)
    if "code_bytes" in header:  # the header's name for the script size before 2026-11-26
        header["code_bytes_raw"] = header.pop("code_bytes")
    log["header"].update(header)


def _set_versions(log, pairs):
    log["versions"] = dict(pairs)


def _set_device(log, pairs):
    log["header"].update(_typed(pairs))


def _set_preset(log, pairs):
    log["preset"] = pairs["preset"]


def _set_hp_hash(log, pairs):
    """hp_hash:<8 hex>, and since 2026-12 hp_unhashed:<NAME,...> (the knobs the hash leaves out)."""
    log["hp_hash"] = pairs["hp_hash"]
    log["hp_unhashed"] = [n for n in pairs.get("hp_unhashed", "").split(",") if n]


def _set_stopping(log, pairs):
    log["stopping_early"] = _step_fields(pairs) if "step" in pairs else _typed(pairs)


def _add_final_eval(log, pairs):
    fields = _typed(pairs)
    fields["stage"] = rules.pass_name(str(fields.pop("final_eval")))  # ttt -> chunked, ...
    log["final_evals"].append(fields)


def _set_artifact(log, pairs):
    """artifact_path:<file>, with the byte counts on the same line or on a line of their own."""
    log["artifact"] = {**(log["artifact"] or {}), **_typed(pairs)}
    log["artifact"]["artifact_path"] = pairs["artifact_path"]  # a path, never a number


def _merge_bytes(log, pairs):
    log["artifact"] = {**(log["artifact"] or {}), **_typed(pairs)}


_HANDLERS = {
    "run_id": _set_run_id,
    "script_sha256": _set_script,
    "versions": _set_versions,
    "device": _set_device,
    "preset": _set_preset,
    "hp_hash": _set_hp_hash,
    "stopping_early": _set_stopping,
    "final_eval": _add_final_eval,
    "artifact_path": _set_artifact,
    "bytes_code": _merge_bytes,
    "bytes_model": _merge_bytes,
    "bytes_total": _merge_bytes,
}


def _finish(log: dict) -> dict:
    """Decode the final JSON and decide whether the log is complete."""
    raw = log.pop("_json_line", None)
    if raw is not None:
        try:
            log["final"] = json.loads(raw)
        except json.JSONDecodeError as exc:
            log["errors"].append(f"final JSON line does not parse ({exc.msg} at column {exc.colno})")
        if log["final"] is not None and not isinstance(log["final"], dict):
            log["errors"].append("final JSON line is not an object")
            log["final"] = None
        if log["final"] is not None:
            add_current_names(log["final"])
    counts = log["counts"]
    log["missing"] = [name for name in REQUIRED_LINES if not counts.get(name)]
    if log["final"] is None and "final_json" not in log["missing"]:
        log["missing"].append("final_json")
    for name in SINGLE_LINES:
        if counts.get(name, 0) > 1:
            log["errors"].append(
                f"{name} line appears {counts[name]} times: the file holds more than one run"
            )
    # A log cut short loses its tail first, so a missing final JSON or final_eval/artifact line is
    # the signature of truncation (crash, kill, or a partial copy).
    log["truncated"] = bool(log["missing"])
    log["complete"] = not log["missing"] and not log["errors"]
    return log


def add_current_names(final: dict) -> None:
    """Give a final JSON written before the pass renaming its current keys too (val_bpb_flat for
    post_quant_val_bpb, val_bpb_chunked for val_bpb_ttt, ...); the keys as logged stay."""
    if "post_quant_val_bpb" in final:
        final.setdefault("val_bpb_flat", final["post_quant_val_bpb"])
    for key in list(final):
        name = key.removeprefix("val_bpb_")
        if key.startswith("val_bpb_") and name in rules.FORMER_PASS_NAMES:
            final.setdefault(f"val_bpb_{rules.pass_name(name)}", final[key])


def parse_text(text: str, path: str = "<text>") -> dict:
    """Parse the text of a run log; see parse_log."""
    log = empty_log(path)
    for line in text.splitlines():
        line = line.rstrip()
        if line:
            _parse_line(log, line)
    return _finish(log)


def parse_log(path) -> dict:
    """Parse one run log file into a dict.

    Keys: path, run_id, script_sha256, header (code_bytes_raw = script size, script, device, gpus, ...),
    versions, preset, hp {NAME: raw string}, hp_hash, hp_unhashed [NAME, ...], steps (train lines),
    vals (validation lines), final_evals, stopping_early, artifact, final (the final JSON object or
    None), other (unrecognised lines), errors, missing (required stable lines absent), truncated,
    complete.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    return parse_text(text, str(path))


def looks_like_log(path) -> bool:
    """True when the file starts with the run_id line every run log opens with."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.startswith("run_id:")
    except OSError:
        return False
    return False


def find_logs(folder) -> list[Path]:
    """Run logs at the top level of a record folder (*.log / *.txt files that open with run_id)."""
    folder = Path(folder)
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".log", ".txt"))
    return [p for p in candidates if looks_like_log(p)]


def hp_hash(hp: dict[str, str], leave_out=frozenset()) -> str:
    """train_gpt.py's hp_hash: sha256 of the sorted `NAME=value` lines joined by newlines, 8 hex,
    without the names in `leave_out`. Recomputing it shows the hp lines were not edited after the run."""
    lines = "\n".join(f"{name}={value}" for name, value in sorted(hp.items()) if name not in leave_out)
    return hashlib.sha256(lines.encode()).hexdigest()[:8]


def hp_hash_matches(log: dict) -> bool:
    """The logged hp_hash is the hash of the log's hp lines: without the knobs its `hp_unhashed` line
    lists, or without the run-naming knobs, or over every line as older logs did."""
    listed = set(log.get("hp_unhashed") or ())  # logged by the script since it left knobs out
    candidates = [hp_hash(log["hp"], listed)] if listed else []
    return log["hp_hash"] in (*candidates, hp_hash(log["hp"], rules.RUN_NAMING_HP), hp_hash(log["hp"]))


def describe_problems(log: dict) -> list[str]:
    """Human-readable reasons a log is not complete (empty when it is)."""
    problems = list(log["errors"])
    if log["missing"]:
        problems.append("truncated or incomplete: missing " + ", ".join(log["missing"]))
    return problems
