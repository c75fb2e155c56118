"""`diff`: what changed between two runs, as code (unified diff of train_gpt.py) and as the
configuration that actually ran (the logged `hp:` lines), so a changed default is visible too."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from . import packed, scripts
from .logparse import describe_problems, find_logs, looks_like_log, parse_log


@dataclass
class Side:
    label: str
    script: Path | None = None
    logs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str | None = None  # the script's text, unpacked when it is a self-extracting wrapper
    defaults: dict[str, str] = field(default_factory=dict)  # from its os.environ.get reads


def _read_script(side: Side) -> None:
    raw = side.script.read_text(encoding="utf-8", errors="replace")
    side.source, notes = scripts.unpack(raw, side.script)
    side.notes.extend(notes)
    try:
        side.defaults = scripts.default_config(side.source)
    except (SyntaxError, ValueError) as exc:
        side.defaults = scripts.default_config_by_pattern(side.source)
        side.notes.append(
            f"{side.script.name}: does not parse on this Python ({exc.__class__.__name__}); "
            f"{len(side.defaults)} environment reads found by pattern instead"
        )


def folder_script(folder: Path, notes: list[str]) -> Path | None:
    """The readable source of a packed submission (train_gpt_source.py, the script its logs name),
    else train_gpt.py, else the one train_gpt*.py some records ship instead (e.g. train_gpt_v5.py)."""
    for name in (packed.SOURCE_NAME, "train_gpt.py"):
        if (folder / name).is_file():
            return folder / name
    others = sorted(folder.glob("train_gpt*.py"))
    if len(others) == 1:
        notes.append(f"no train_gpt.py; using {others[0].name}")
        return others[0]
    return None


def load_side(raw: str) -> Side:
    """A record folder (script + logs), a bare script (code only) or one run log (config only)."""
    path = Path(raw)
    side = Side(label=raw)
    if path.is_dir():
        side.script = folder_script(path, side.notes)
        side.logs = [parse_log(p) for p in find_logs(path)]
    elif path.is_file() and looks_like_log(path):
        side.logs = [parse_log(path)]
    elif path.is_file():
        side.script = path
    else:
        raise FileNotFoundError(f"{raw}: no such file or folder")
    if side.script is not None:
        _read_script(side)
    for log in side.logs:
        for problem in describe_problems(log):
            side.notes.append(f"{Path(log['path']).name}: {problem}")
    if side.script is not None and side.logs:
        sha = hashlib.sha256(side.script.read_bytes()).hexdigest()
        if any(log["script_sha256"] != sha for log in side.logs):
            side.notes.append(
                f"the logs were not produced by this {side.script.name} (script_sha256 differs)"
            )
    return side


def code_diff(a: Side, b: Side, context: int = 3) -> str:
    if a.script is None or b.script is None:
        missing = a.label if a.script is None else b.label
        return f"(no code diff: no train_gpt.py for {missing})"
    left = a.source.splitlines(keepends=True)
    right = b.source.splitlines(keepends=True)
    lines = difflib.unified_diff(left, right, fromfile=str(a.script), tofile=str(b.script), n=context)
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    return text or "(scripts are identical)"


def merged_config(logs: list[dict]) -> dict[str, str]:
    """NAME -> value over all the side's logs; a setting that varies between seeds shows every value."""
    values: dict[str, list[str]] = {}
    for log in logs:
        for name, value in log["hp"].items():
            values.setdefault(name, [])
            if value not in values[name]:
                values[name].append(value)
    for log in logs:  # a name missing from some logs is a difference too
        for name in set(values) - set(log["hp"]):
            if "<unset>" not in values[name]:
                values[name].append("<unset>")
    return {name: vals[0] if len(vals) == 1 else "{" + ", ".join(vals) + "}" for name, vals in values.items()}


def side_config(side: Side) -> tuple[dict[str, str], str]:
    """The logged resolved settings when the side has our logs, else the script's defaults."""
    if side.logs:
        return merged_config(side.logs), "logged hp: lines"
    if side.script is not None:
        return side.defaults, "script defaults from its environment reads"
    return {}, "nothing"


def config_diff(a: Side, b: Side) -> str:
    if bool(a.logs) != bool(b.logs):  # resolved settings against bare defaults would mislead
        missing = a.label if not a.logs else b.label
        return f"(no config diff: no logged config for {missing}; its settings are the script's defaults)"
    (left, how_a), (right, how_b) = side_config(a), side_config(b)
    if not left or not right:
        missing = a.label if not left else b.label
        return f"(no config diff: neither logged settings nor environment reads for {missing})"
    names = sorted(set(left) | set(right))
    changed = [n for n in names if left.get(n) != right.get(n)]
    if not changed:
        return f"(identical settings, {len(names)} names; A: {how_a}, B: {how_b})"
    width = max(len(n) for n in changed + ["NAME"])
    out = [f"A = {a.label} ({how_a})", f"B = {b.label} ({how_b})", f"{'NAME':<{width}}  A  ->  B"]
    for name in changed:
        out.append(f"{name:<{width}}  {left.get(name, '<absent>')}  ->  {right.get(name, '<absent>')}")
    return "\n".join(out)


def format_diff(a: Side, b: Side, show_code: bool = True, show_config: bool = True, context: int = 3) -> str:
    parts = []
    for side in (a, b):
        parts.extend(f"note ({side.label}): {n}" for n in side.notes)
    if show_code:
        parts += ["== code diff (train_gpt.py) ==", code_diff(a, b, context).rstrip("\n")]
    if show_config:
        parts += ["== config diff (logged hp: settings, else script defaults) ==", config_diff(a, b)]
    return "\n".join(parts)
