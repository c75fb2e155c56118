"""Repository hygiene: lint/format clean, README documents every knob, import has no side effects."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by requirements.txt")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_clean(args):
    proc = subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_documents_every_knob_with_its_default():
    readme = (ROOT / "README.md").read_text()
    for name, value in tg.Hyperparameters({}).knobs.items():
        row = re.search(rf"^\| `{name}` \| \w+ \| `([^`]*)` \|", readme, re.M)
        assert row, f"{name} missing from README settings"
        assert ast.literal_eval(row.group(1)) == value, f"README default of {name} differs from the script"


def test_readme_starts_with_the_two_commands_ci_uses():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert "RUN_PRESET=smoke python3 train_gpt.py" in blocks[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].split("&&")[-1].strip() == ci.strip().splitlines()[-1]


def test_import_has_no_side_effects(tmp_path):
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); import train_gpt; print(sorted(os.listdir('.')))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
