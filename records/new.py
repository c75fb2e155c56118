"""`new`: build a record folder from the logs of a run (one per seed) and the script that made them."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from . import rules, summary
from .logparse import describe_problems, parse_log
from .validate import disagreements


class RefusedError(Exception):
    """The inputs cannot make an honest record folder; the message says why."""


def slugify(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")
    return slug or "Run"


def load_logs(paths) -> list[dict]:
    """Parse the logs and refuse incomplete or mutually inconsistent ones; sorted by seed."""
    logs = [parse_log(p) for p in paths]
    bad = [f"{log['path']}: {p}" for log in logs for p in describe_problems(log)]
    if bad:
        raise RefusedError("incomplete logs:\n  " + "\n  ".join(bad))
    problems = disagreements(logs)
    if problems:
        raise RefusedError(
            "the logs disagree, so they are not seeds of one submission:\n  " + "\n  ".join(problems)
        )
    return sorted(logs, key=lambda log: seed_key(log["final"].get("seed")))


def seed_key(seed):
    """Numeric seeds in numeric order (2 before 10), anything else after them."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def check_script(script: Path, logs: list[dict]) -> bytes:
    """The script bytes, after proving they are the ones the logs were produced with."""
    if not script.is_file():
        raise RefusedError(f"script {script} not found (give it with --script)")
    data = script.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    logged = logs[0]["script_sha256"]
    if sha != logged:
        raise RefusedError(
            f"{script} has sha256 {sha[:12]}… but the logs were made by a script with {logged[:12]}…; "
            "pass the exact script with --script (e.g. from the commit the runs used)"
        )
    return data


def submitted_script(script: Path, data: bytes, logs: list[dict]) -> bytes:
    """What goes in the folder as train_gpt.py: the script itself, or, when the runs counted its
    self-extracting form (CODE_BYTES_MODE=packed), that form, made by the script's own pack_source
    (importing train_gpt has no side effects) and checked against the bytes the runs counted."""
    counted = {log["final"].get("bytes_code") for log in logs}
    if counted == {len(data)}:
        return data
    name = "records_submitted_train_gpt"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        packed = module.pack_source(data.decode("utf-8")).encode()
    finally:
        del sys.modules[name]
    if counted != {len(packed)}:
        raise RefusedError(
            f"the runs counted {sorted(counted)} bytes of code, but {script} is {len(data)} bytes and "
            f"its packed form {len(packed)}: the logs do not say which file to submit"
        )
    return packed


def render_readme(meta: dict, logs: list[dict], rows: list[dict], packed: bool = False) -> str:
    first = logs[0]
    script = (
        "the self-extracting (lzma + base85) form of the script that produced the logs, as the runs "
        f"counted it (CODE_BYTES_MODE=packed); it unpacks to sha256 `{first['script_sha256']}`, and "
        "`python -m records diff` reads it unpacked"
        if packed
        else f"the exact script that produced the logs (sha256 `{first['script_sha256']}`)"
    )
    block = summary.render_results_block(rows, rows[0]["eval_mode"], summary.hardware(first))
    files = "\n".join(f"- `{log['dest']}`: run log, seed {log['final']['seed']}" for log in logs)
    preset = first["preset"]
    run_env = f"RUN_PRESET={preset} " if preset not in (None, "none") else ""
    world = first["header"].get("world_size") or 1
    launcher = f"torchrun --standalone --nproc_per_node={world}" if world > 1 else "python"
    settings = "\n".join(f"{k}={v}" for k, v in sorted(first["hp"].items()) if k not in rules.RUN_NAMING_HP)
    return f"""# {meta["name"]}

{meta["blurb"]}

## Results

{block}

Numbers above are generated from the logs by `python -m records new` and checked by
`python -m records validate`; do not edit them by hand. val_loss is in nats, val_bpb in bits per byte.

## What changed

TODO: describe the changes against the baseline and why they help.

## Run command

```bash
{run_env}SEED=<seed> {launcher} train_gpt.py
```

<details><summary>Resolved settings (hp lines of the logs, identical for every seed)</summary>

```
{settings}
```
</details>

## Files

- `train_gpt.py`: {script}
- `submission.json`: metadata and per-seed results
{files}
"""


def record_date(text: str | None) -> str:
    """--date as YYYY-MM-DD (default today); anything else would put slashes or junk in the path."""
    if text is None:
        return dt.date.today().isoformat()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:  # e.g. 2026-02-30
            pass
    raise RefusedError(f"--date {text!r}: expected a date as YYYY-MM-DD")


def check_extras(extras: list[Path], taken: set[str]) -> None:
    """Every --extra exists and does not overwrite a file `new` writes itself."""
    for extra in extras:
        if not extra.exists():
            raise RefusedError(f"--extra {extra}: no such file or folder")
        if extra.name in taken:
            raise RefusedError(f"--extra {extra}: would overwrite the record's own {extra.name}")


def make_record(args) -> Path:
    """Create the folder; returns its path. Raises RefusedError instead of writing anything dubious."""
    logs = load_logs(args.logs)
    data = submitted_script(Path(args.script), check_script(Path(args.script), logs), logs)
    date = record_date(args.date)
    for log in logs:
        log["dest"] = f"train_seed{log['final']['seed']}.log"
    extras = [Path(e) for e in args.extra or []]
    check_extras(extras, {"train_gpt.py", "submission.json", "README.md", *(log["dest"] for log in logs)})
    slug = slugify(args.slug or args.name)
    root = Path(args.root) / f"track_{args.track}"
    folder = Path(args.out) if args.out else root / f"{date}_{slug}"
    if folder.exists() and any(folder.iterdir()) and not args.force:
        raise RefusedError(f"{folder} already exists and is not empty (use --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_bytes(data)
    for log in logs:
        shutil.copyfile(log["path"], folder / log["dest"])
    for extra in extras:
        if extra.is_dir():  # e.g. a tokenizers/ folder the run needs
            shutil.copytree(extra, folder / extra.name, dirs_exist_ok=True)
        else:
            shutil.copy2(extra, folder / extra.name)
    rows = [summary.seed_row(log) for log in logs]
    meta = {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": date,
        "track": args.track,
    }
    sub = summary.build_submission(meta, logs, rows, len(data))
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    packed = hashlib.sha256(data).hexdigest() != logs[0]["script_sha256"]
    (folder / "README.md").write_text(render_readme(meta, logs, rows, packed), encoding="utf-8")
    return folder
