"""The packed script (`python train_gpt.py --pack OUT`): comments and docstrings stripped line for
line, compressed (lzma or brotli, the smaller), and run, counted and unpacked like the readable one."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_training import sample_shards, tiny_env  # noqa: F401 (sample_shards: a fixture)

import train_gpt as tg
from records import scripts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"

SOURCE = textwrap.dedent(
    '''\
    """Module docstring: kept, --help prints it."""
    import sys  # a comment after code


    class Empty(Exception):
        """Only a docstring: the body becomes `pass`."""


    def one_liner(): "docstring on the def line"; return 1


    def f(x):
        """Docstring with non-ASCII text … ending mid-line."""  # and a comment
        # a comment line
        text = """trailing spaces inside a string stay\x20\x20
    # not a comment"""
        return (x,  # a comment inside brackets
                "#", text)


    def fail():
        raise ValueError("the traceback names this line")


    if __name__ == "__main__":
        print(one_liner(), f(1), __doc__)
        fail()
    '''
)

# Indentation becomes tabs, except where a line starts inside a string (its spaces are a value).
STRIPPED = (
    '"""Module docstring: kept, --help prints it."""\n'
    "import sys\n"
    "\n\n"
    "class Empty(Exception):\n"
    "\tpass\n"
    "\n\n"
    "def one_liner(): pass; return 1\n"
    "\n\n"
    "def f(x):\n"
    "\n\n"
    '\ttext = """trailing spaces inside a string stay  \n'
    '# not a comment"""\n'
    "\treturn (x,\n"
    '\t\t\t"#", text)\n'
    "\n\n"
    "def fail():\n"
    '\traise ValueError("the traceback names this line")\n'
    "\n\n"
    'if __name__ == "__main__":\n'
    "\tprint(one_liner(), f(1), __doc__)\n"
    "\tfail()\n"
)


def untabbed(row: str) -> str:
    """A stripped row with its leading tabs read back as four spaces each."""
    body = row.lstrip("\t")
    return "    " * (len(row) - len(body)) + body


def statement_lines(tree: ast.Module) -> list[tuple[str, int, int]]:
    """(kind, line, column) of every statement but docstrings and the `pass` that replaces them."""
    skip = {id(node.body[0]) for node in tg.documented(tree)}
    return [
        (type(node).__name__, node.lineno, node.col_offset)
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt) and id(node) not in skip and not isinstance(node, ast.Pass)
    ]


def test_strip_removes_comments_and_docstrings_line_for_line():
    assert tg.strip_source(SOURCE) == STRIPPED


def test_stripped_script_keeps_every_code_line_at_its_line_number():
    """What a traceback from the packed script points at is the readable script's line: same line
    count, every statement at its line and column, every kept line a prefix of the original."""
    source = SCRIPT.read_text(encoding="utf-8")
    stripped = tg.strip_source(source)
    assert stripped.count("\n") == source.count("\n")
    untabbed_text = "\n".join(untabbed(row) for row in stripped.split("\n"))
    assert statement_lines(ast.parse(untabbed_text)) == statement_lines(ast.parse(source))
    for old, new in zip(source.split("\n"), stripped.split("\n"), strict=True):
        assert old.startswith(untabbed(new)) or new.strip() == "pass", (old, new)
    assert len(stripped.encode()) < 0.8 * len(source.encode())


def test_packed_traceback_names_the_readable_line(tmp_path):
    packed = tmp_path / "packed.py"
    packed.write_text(tg.pack_source(SOURCE), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(packed)], capture_output=True, text=True)
    line = SOURCE.split("\n").index('    raise ValueError("the traceback names this line")') + 1
    assert proc.returncode == 1 and f'File "<string>", line {line}, in fail' in proc.stderr
    assert proc.stdout.startswith("1 (1, '#', 'trailing spaces inside a string stay  \\n# not a comment')")
    assert "Module docstring: kept" in proc.stdout


def test_strip_refuses_a_change_of_program(monkeypatch):
    """Should stripping ever change the syntax tree (a construct it does not handle), packing stops
    with a clear error instead of counting and submitting a different program."""
    monkeypatch.setattr(tg, "strip_edits", lambda source, tree: [(0, 0, "x = 1\n")])
    with pytest.raises(tg.ConfigError, match="CODE_BYTES_MODE=raw"):
        tg.strip_source(SOURCE)


def test_packing_picks_the_smaller_compressor_and_is_deterministic():
    forms = tg.packed_forms(SCRIPT.read_text(encoding="utf-8"))
    assert set(forms) == {"lzma", "brotli"}
    winner = min(forms, key=lambda method: len(forms[method]))
    packed = tg.pack_source(SCRIPT.read_text(encoding="utf-8"))  # packed again: the same bytes
    assert packed == forms[winner] and packed.startswith(tg.PACKED_PREFIX.format(winner))
    assert tg.is_packed(packed) and tg.pack_source(packed) == packed
    # Stripping comments and docstrings is worth more than any compressor setting: the packed form
    # is under a quarter of the readable script (a plain lzma wrapper of it is about a third).
    assert len(packed.encode()) < 0.25 * SCRIPT.stat().st_size


@pytest.mark.parametrize("method", ["lzma", "brotli"])
def test_records_unpack_reads_both_wrappers(method, tmp_path):
    """`python -m records diff/validate` read the packed script as the stripped source, whichever
    compressor won, by evaluating only whitelisted decoding calls."""
    form = tg.packed_forms(SOURCE)[method]
    assert form.startswith(f"import base64,{method};exec({method}.decompress(")
    text, notes = scripts.unpack(form, tmp_path / "train_gpt.py")
    assert text == STRIPPED and "unpacked a self-extracting wrapper" in notes[0]


def test_code_bytes_counts_the_packed_form_by_default(tmp_path):
    assert tg.Hyperparameters({}).code_bytes_mode == "packed"
    readable, packed = tmp_path / "readable.py", tmp_path / "packed.py"
    readable.write_text(SOURCE, encoding="utf-8")
    packed.write_text(tg.pack_source(SOURCE), encoding="utf-8")
    raw, counted = len(SOURCE.encode()), packed.stat().st_size
    assert tg.code_bytes(readable, "packed") == (raw, counted)
    assert tg.code_bytes(packed, "packed") == (counted, counted)  # a packed script counts itself
    assert tg.code_bytes(readable, "raw") == (raw, raw)


def run(script: Path, env: dict[str, str], tmp_path: Path, keep: Path) -> tuple[dict, list[str]]:
    """(final JSON, log lines) of one run of `script` in tmp_path/run, then moved to `keep`: both
    runs see the same paths, so their settings (and hp_hash) are the same."""
    folder = tmp_path / "run"
    folder.mkdir()
    full = {k: v for k, v in os.environ.items() if not tg._looks_like_ours(k, set())}
    full.update(env, LOG_DIR=str(folder / "logs"), ARTIFACT_DIR=str(folder / "art"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=full, cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (folder / "logs" / f"{env['RUN_ID']}.txt").read_text().splitlines()
    folder.rename(keep)
    return json.loads(lines[-1]), lines


# What names the script itself, and measured times, differ between the two runs; nothing else may.
SCRIPT_KEYS = {"script_sha256", "code_bytes_raw"}


def timed(key: str) -> bool:
    return key.endswith(("_ms", "_s")) or key in {"tokens_per_s", "peak_mem_mib", "eval_phases"}


def untimed(line: str) -> str:
    pairs = [pair for pair in line.split() if ":" in pair]
    return " ".join(p for p in pairs if not timed(p.split(":")[0]) and p.split(":")[0] not in SCRIPT_KEYS)


def test_packed_script_runs_exactly_as_the_readable_one(tmp_path, sample_shards):  # noqa: F811
    packed = tmp_path / "packed" / "train_gpt.py"  # the same name: the header logs it
    packed.parent.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--pack", str(packed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "code_bytes_stripped:" in proc.stdout and "code_bytes_brotli:" in proc.stdout
    env = tiny_env(
        sample_shards,
        RUN_ID="same",
        ITERATIONS="2",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="1536",
        MICROBATCH_TOKENS="256",
        EVAL_MODE="flat",
        TTT_MODE="none",
    )
    readable, readable_log = run(SCRIPT, env, tmp_path, tmp_path / "readable_run")
    ran_packed, packed_log = run(packed, env, tmp_path, tmp_path / "packed_run")
    assert readable["code_bytes_raw"] == SCRIPT.stat().st_size
    assert ran_packed["code_bytes_raw"] == packed.stat().st_size == readable["bytes_code"]
    assert ran_packed["script_sha256"] == tg.file_sha256(packed)
    differ = {k for k in readable if readable[k] != ran_packed[k]}
    assert differ - SCRIPT_KEYS == {k for k in differ if timed(k)}, differ
    assert [untimed(line) for line in readable_log[:-1]] == [untimed(line) for line in packed_log[:-1]]
