"""Helpers shared by the data tools: reading document files, hashing, atomic writes, CLI errors."""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = Path("data/sample/sample_1024_bpe.model")


@functools.cache
def tg():
    """Import train_gpt lazily, so `--help` stays fast (it pulls in torch).

    The shard format, tokenizer checks and byte tables must come from train_gpt.py, never from a
    copy here. The repository root goes on sys.path only when the tool runs from elsewhere.
    """
    try:
        import train_gpt
    except ModuleNotFoundError as exc:
        if exc.name != "train_gpt":
            raise
        sys.path.insert(0, str(REPO_ROOT))
        import train_gpt
    return train_gpt


def fail(message: str) -> NoReturn:
    """Raise train_gpt.DataError, the one error type every data tool reports cleanly."""
    raise tg().DataError(message)


def open_text(path: Path) -> io.TextIOBase:
    """Open plain, .gz, .xz or .zst text as UTF-8, choosing the codec from the file name."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: input file not found (give an existing .jsonl, .jsonl.gz, .jsonl.xz or .jsonl.zst)")
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(paths: Sequence[Path]) -> Iterator[tuple[str, int, str]]:
    """Yield (file name, 1-based line number, line) for every non-blank line, files in order."""
    for path in paths:
        try:
            with open_text(path) as handle:
                for lineno, line in enumerate(handle, start=1):
                    if line.strip():
                        yield str(path), lineno, line
        except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as exc:
            fail(f"{path}: cannot read ({exc}); is it valid UTF-8 text with the right compression suffix?")


def parse_doc(line: str, path: str, lineno: int, field: str = "text") -> str:
    """Return the document text of one JSON line; errors name the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        fail(f"{path}:{lineno}: bad JSON ({exc.msg} at column {exc.colno}); each line must be one object")
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        fail(f"{path}:{lineno}: expected an object with a string field {field!r}")
    return record[field]


def iter_docs(paths: Sequence[Path], field: str = "text") -> Iterator[tuple[str, int, str]]:
    """Yield (file name, line number, text) for every document of the inputs."""
    for path, lineno, line in iter_lines(paths):
        yield path, lineno, parse_doc(line, path, lineno, field)


def text_key(text: str) -> bytes:
    """Content hash used for the train/val overlap check.

    NFKC (what the tokenizer's nmt_nfkc rule applies), lower case and collapsed whitespace, so
    copies that differ only in case or spacing still count as the same document.
    """
    norm = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def add_document_arguments(parser: argparse.ArgumentParser) -> None:
    """--input and --text-field, read the same way (iter_docs) by every tool that takes documents."""
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        metavar="FILE",
        help="JSON-lines files with a 'text' field; .gz/.xz/.zst are decompressed; read in the order given",
    )
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default 'text')")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def shard_files(folder: Path, split: str) -> list[Path]:
    """Shards of one split in name order, by train_gpt.py's own rule."""
    return tg().list_shards(folder, split)


def expected_tokens(manifest: dict, stats: dict, split: str, index: int) -> int | None:
    """Token count of shard `index` per a hub manifest: full `shard_size` shards, the last holds the rest."""
    size, files, tokens = (
        manifest.get("shard_size"),
        stats.get(f"files_{split}"),
        stats.get(f"tokens_{split}"),
    )
    if not size or files is None or tokens is None:
        return None
    last = int(tokens) - (int(files) - 1) * int(size)
    if not 0 < last <= int(size):
        return None  # the manifest does not describe fixed-size shards; rely on the header alone
    return int(size) if index < int(files) - 1 else last


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a tool's main and turn DataError into one readable line and exit status 1."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if "train_gpt" in sys.modules and isinstance(exc, sys.modules["train_gpt"].DataError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
