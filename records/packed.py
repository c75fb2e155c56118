"""Packed submissions: a run that counted the self-extracting form of its script
(CODE_BYTES_MODE=packed) submits that form as `train_gpt.py` (the bytes the 16 MB cap counts) and
the readable script beside it as `train_gpt_source.py` (what the logs' script_sha256 names; it is
not run). The packed form is whatever the source's own `pack_source` makes of it, so the packing can
change (strip comments and docstrings first, say) without changing this package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOURCE_NAME = "train_gpt_source.py"
_MODULE = "records_submitted_train_gpt"


def pack_source_of(script: Path):
    """The script's own `pack_source`, loaded by importing the script as a module (train_gpt.py's top
    level only defines; `main` runs under `if __name__ == "__main__"`). No bytecode cache is written
    next to it, so a record folder being validated is left as it was."""
    spec = importlib.util.spec_from_file_location(_MODULE, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module  # its dataclasses look their module up while it executes
    cache = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = cache
        del sys.modules[_MODULE]
    pack = getattr(module, "pack_source", None)
    if not callable(pack):
        raise AttributeError(f"{script.name} defines no pack_source(source) function")
    return pack


def packed_form(script: Path) -> bytes:
    """What the script's own pack_source makes of the script's text: the file to submit."""
    text = script.read_bytes().decode("utf-8")
    return pack_source_of(script)(text).encode("utf-8")
