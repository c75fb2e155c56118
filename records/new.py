"""`new`: build a record folder from the logs of a run (one per seed) and the script that made them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
from pathlib import Path

from . import packed, rules, summary
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


def submitted_script(script: Path, data: bytes, logs: list[dict]) -> bytes | None:
    """The packed form to submit as train_gpt.py, or None when the runs counted the script itself.
    A run with CODE_BYTES_MODE=packed counted the output of the script's own pack_source (see
    packed.py); it is made here the same way and checked against the bytes the runs counted."""
    counted = {log["final"].get("code_bytes_counted", log["final"].get("bytes_code")) for log in logs}
    if counted == {len(data)}:
        return None
    form = packed.packed_form(script)
    if counted != {len(form)}:
        raise RefusedError(
            f"the runs counted {sorted(counted, key=str)} bytes of code, but {script} is {len(data)} "
            f"bytes and its packed form {len(form)}: the logs do not say which file to submit"
        )
    return form


def render_readme(meta: dict, logs: list[dict], rows: list[dict], packed_form: bool = False) -> str:
    first = logs[0]
    sha = first["script_sha256"]
    script = (
        "the self-extracting form of the script, made by its own `pack_source` (CODE_BYTES_MODE=packed): "
        f"the file that runs and that the 16,000,000-byte cap counts\n- `{packed.SOURCE_NAME}`: its "
        f"readable source, the script the logs name (sha256 `{sha}`); it is not run, it is here to be "
        "read and diffed (`python -m records diff` reads it)"
        if packed_form
        else f"the exact script that produced the logs (sha256 `{sha}`)"
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
    source = check_script(Path(args.script), logs)
    form = submitted_script(Path(args.script), source, logs)
    data = source if form is None else form
    date = record_date(args.date)
    for log in logs:
        log["dest"] = f"train_seed{log['final']['seed']}.log"
    extras = [Path(e) for e in args.extra or []]
    own = {"train_gpt.py", packed.SOURCE_NAME, "submission.json", "README.md", *(log["dest"] for log in logs)}
    check_extras(extras, own)
    slug = slugify(args.slug or args.name)
    root = Path(args.root) / f"track_{args.track}"
    folder = Path(args.out) if args.out else root / f"{date}_{slug}"
    if folder.exists() and any(folder.iterdir()) and not args.force:
        raise RefusedError(f"{folder} already exists and is not empty (use --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_bytes(data)
    if form is not None:
        (folder / packed.SOURCE_NAME).write_bytes(source)
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
    (folder / "README.md").write_text(render_readme(meta, logs, rows, form is not None), encoding="utf-8")
    return folder
