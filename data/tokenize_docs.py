"""Tokenize your own documents into challenge-format shards.

Input: JSON lines with a "text" field (plain, .gz, .xz or .zst), one document per line. Output,
in --output: fineweb_val_000000.bin ... and fineweb_train_000000.bin ..., in the exact layout of
the official shards (train_gpt.write_shard), plus manifest.json.

Like the official export: every document is written as [BOS=1] + ids with no EOS, documents run on
across shard boundaries, and validation is the first --val-docs documents of the input order.
Documents whose text is empty or only whitespace are skipped (counted in the manifest).

Train/val overlap: every document gets a content hash of its NFKC-normalised, lower-cased,
whitespace-collapsed text. A train document whose hash equals a val document's is an error that
lists the clashing lines; with --drop-overlap such documents are dropped from train instead and
counted in the manifest ("dropped_overlap").

--caseops (openai/parameter-golf PR #1729, the SP8192 CaseOps records): documents are case-transformed
(data/caseops.py) before a CaseOps tokenizer encodes them, and every val shard gets its byte
sidecar fineweb_val_bytes_NNNNNN.bin (the shard format, one uint16 per token: the ORIGINAL UTF-8
bytes the token accounts for, 0 for BOS), which train_gpt.py divides by. Each val document's
sidecar must sum to its UTF-8 length, or the run stops.

Output is deterministic: batches are encoded in parallel but always consumed in input order, so
--workers changes only the speed, never a byte of the shards.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import caseops
from data._common import (
    DEFAULT_TOKENIZER,
    add_document_arguments,
    fail,
    iter_lines,
    parse_doc,
    run_main,
    sha256_file,
    shard_files,
    text_key,
    tg,
    write_json,
)

DEFAULT_VAL_DOCS = 100  # the bundled sample: ~86k val tokens. The official export uses 50_000.
DEFAULT_SHARD_TOKENS = 100_000_000
MANIFEST_FORMAT = "parameter-golf-shards/1"
TOOL = "data.tokenize_docs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.tokenize_docs",
        description="Tokenize JSON-lines documents into challenge-format shards (BOS before each "
        "document, no EOS, val = first --val-docs documents) and write manifest.json next to them.",
    )
    add_document_arguments(parser)
    parser.add_argument("--output", required=True, type=Path, help="folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="SentencePiece .model file")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="expected vocabulary size (default: the tokenizer's); a mismatch is an error",
    )
    parser.add_argument(
        "--val-docs",
        type=int,
        default=DEFAULT_VAL_DOCS,
        help=f"the first N documents form the validation split (default {DEFAULT_VAL_DOCS}; official: 50000)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard, the last one of each split shorter (default {DEFAULT_SHARD_TOKENS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="encoding processes (default: all cores); the output does not depend on it",
    )
    parser.add_argument("--batch-docs", type=int, default=256, help="documents per work item (default 256)")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many input documents")
    parser.add_argument(
        "--drop-overlap",
        action="store_true",
        help="drop train documents that duplicate a val document (counted) instead of failing",
    )
    parser.add_argument(
        "--caseops",
        action="store_true",
        help="case-transform documents for a CaseOps tokenizer and write the val byte sidecar",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace shards in --output even if this tool did not write them (e.g. downloaded data)",
    )
    return parser


# ----------------------------------------------------------------------------- encoding (workers)


@dataclass
class Batch:
    """Raw input lines; JSON parsing happens in the workers, where it runs in parallel."""

    path: str
    linenos: list[int]
    lines: list[str]
    with_bytes: bool = False  # --caseops: the batch may hold val documents, so compute the sidecar


@dataclass
class Encoded:
    """One batch, tokenized: per-document arrays plus the concatenated [BOS]+ids stream."""

    tokens: np.ndarray  # uint16, all documents of the batch, each as [BOS] + ids
    lengths: np.ndarray  # tokens per document, BOS included
    text_bytes: np.ndarray  # len(text.encode("utf-8")) per document
    bpb_bytes: np.ndarray  # bytes val_bpb divides by per document: the byte table, or --caseops the text
    unk: np.ndarray  # <unk> tokens per document (text the tokenizer cannot represent)
    sidecar: np.ndarray | None  # --caseops: original UTF-8 bytes per token, aligned with `tokens`
    keys: list[bytes]  # content hashes for the overlap check
    where: list[str]  # "file:line" per document, for error messages
    empty: int = 0  # documents skipped because their text is blank


_STATE: dict = {}


def init_worker(tokenizer: str, vocab_size: int, text_field: str, case_ops: bool = False) -> None:
    """Load the tokenizer and byte table once per process."""
    sp = tg().load_tokenizer(tokenizer, vocab_size)
    luts = tg().build_byte_luts(sp, vocab_size)
    _STATE.update(sp=sp, luts=luts, field=text_field, unk=sp.unk_id(), caseops=case_ops)


def encode_texts(sp, texts: list[str], with_bytes: bool) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Token ids of each text and, with --caseops in a batch that may hold val documents, each
    token's original bytes (else None: train needs no sidecar)."""
    if _STATE["caseops"] and not with_bytes:
        texts = [caseops.encode(t) for t in texts]
    if not (_STATE["caseops"] and with_bytes):
        # One thread per process: parallelism comes from --workers; oversubscribing 2 cores hurts.
        return (sp.encode(texts, num_threads=1) if texts else []), None
    pairs = caseops.encode_with_bytes(sp, texts)
    return [ids for ids, _ in pairs], [np.concatenate([[0], b]) for _, b in pairs]  # BOS: 0 bytes


def encode_batch(batch: Batch) -> Encoded:
    sp, luts, unk_id, bos = _STATE["sp"], _STATE["luts"], _STATE["unk"], tg().BOS_ID
    texts, where, empty = [], [], 0
    for lineno, line in zip(batch.linenos, batch.lines, strict=True):
        text = parse_doc(line, batch.path, lineno, _STATE["field"])
        if not text.strip():
            empty += 1
            continue
        texts.append(text)
        where.append(f"{batch.path}:{lineno}")
    ids_list, side = encode_texts(sp, texts, batch.with_bytes)
    docs = [np.array([bos, *ids], dtype=np.int64) for ids in ids_list]
    if side is not None:
        bpb_bytes = [int(b.sum()) for b in side]
    elif _STATE["caseops"]:  # train: what a sidecar would sum to, the original text's bytes
        bpb_bytes = [len(t.encode("utf-8")) for t in texts]
    else:
        bpb_bytes = [tg().count_target_bytes(d, luts) for d in docs]
    return Encoded(
        tokens=np.concatenate(docs).astype(np.uint16) if docs else np.zeros(0, np.uint16),
        lengths=np.array([d.size for d in docs], dtype=np.int64),
        text_bytes=np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
        bpb_bytes=np.array(bpb_bytes, dtype=np.int64),
        unk=np.array([int((d == unk_id).sum()) for d in docs], dtype=np.int64),
        sidecar=(np.concatenate(side) if side else np.zeros(0, np.int64)) if side is not None else None,
        keys=[text_key(t) for t in texts],
        where=where,
        empty=empty,
    )


def read_batches(
    paths: Sequence[Path], batch_docs: int, max_docs: int | None, val_open=lambda: False
) -> Iterator[Batch]:
    """Group input lines into batches that never span two files (so errors can name the file).
    `val_open()`, asked as each batch is handed out, says whether val may still take documents."""
    batch, seen = None, 0
    for path, lineno, line in iter_lines(paths):
        if max_docs is not None and seen >= max_docs:
            break
        seen += 1
        if batch is not None and (batch.path != path or len(batch.lines) >= batch_docs):
            batch.with_bytes = val_open()
            yield batch
            batch = None
        if batch is None:
            batch = Batch(path, [], [])
        batch.linenos.append(lineno)
        batch.lines.append(line)
    if batch is not None:
        batch.with_bytes = val_open()
        yield batch


def ordered_map(batches: Iterator[Batch], workers: int, init_args: tuple) -> Iterator[Encoded]:
    """Encode batches in parallel, yielding results strictly in input order.

    A bounded window of pending jobs (instead of Pool.imap, which drains the whole input into
    its queue) keeps memory flat on inputs of any size.
    """
    if workers <= 1:
        init_worker(*init_args)
        yield from map(encode_batch, batches)
        return
    # fork: workers inherit the imported modules instead of re-importing torch (seconds each).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing (main process)


class ShardWriter:
    """Cuts one split's token stream into fixed-size shards; documents run on across shards."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.parts: list[np.ndarray] = []
        self.fill = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(self.shard_tokens - self.fill, tokens.size)
            self.parts.append(tokens[:take])
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
        tg().write_shard(self.folder / name, np.concatenate(self.parts))
        self.files.append({"name": name, "tokens": self.fill})
        self.parts, self.fill = [], 0


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bpb_bytes: int = 0
    unk_tokens: int = 0
    files: list[dict] = field(default_factory=list)

    def add(self, enc: Encoded, i: int) -> None:
        self.documents += 1
        self.tokens += int(enc.lengths[i])
        self.bytes += int(enc.text_bytes[i])
        self.bpb_bytes += int(enc.bpb_bytes[i])
        self.unk_tokens += int(enc.unk[i])

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bytes_per_token": round(self.bytes / self.tokens, 4) if self.tokens else None,
            "bpb_bytes": self.bpb_bytes,
            "unk_tokens": self.unk_tokens,
            "files": self.files,
        }


@dataclass
class Splitter:
    """Routes documents, in input order, to val (first N) or train, checking for overlap."""

    val_docs: int
    writers: dict[str, ShardWriter]
    drop_overlap: bool
    caseops: bool = False
    stats: dict[str, SplitStats] = field(default_factory=lambda: {"val": SplitStats(), "train": SplitStats()})
    val_keys: dict[bytes, str] = field(default_factory=dict)
    overlaps: list[str] = field(default_factory=list)
    empty: int = 0

    def consume(self, enc: Encoded) -> None:
        self.empty += enc.empty
        starts = np.concatenate([[0], np.cumsum(enc.lengths)])
        for i, key in enumerate(enc.keys):
            split = "val" if self.stats["val"].documents < self.val_docs else "train"
            if split == "val":
                self.val_keys.setdefault(key, enc.where[i])
            elif key in self.val_keys:
                self.overlaps.append(f"{enc.where[i]} duplicates val document {self.val_keys[key]}")
                continue
            self.stats[split].add(enc, i)
            self.writers[split].add(enc.tokens[starts[i] : starts[i + 1]])
            if split == "val" and self.caseops:
                if enc.sidecar is None:
                    fail(f"{enc.where[i]}: internal error, a val document was encoded without its bytes")
                self.writers["val_bytes"].add(enc.sidecar[starts[i] : starts[i + 1]])


# ----------------------------------------------------------------------------- driver


def open_tokenizer(path: Path, vocab_size: int | None, case_ops: bool = False) -> int:
    """Check the tokenizer the way train_gpt will load it; return its vocabulary size."""
    import sentencepiece as spm

    if not Path(path).is_file():
        fail(f"{path}: tokenizer not found (train one with python -m data.train_tokenizer, or download it)")
    actual = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    sp = tg().load_tokenizer(str(path), vocab_size if vocab_size is not None else actual)
    if sp.bos_id() != tg().BOS_ID:
        fail(f"{path}: tokenizer bos_id is {sp.bos_id()}, the shards need {tg().BOS_ID}")
    if actual > 65536:
        fail(f"{path}: vocabulary of {actual} does not fit uint16 shards (max 65536)")
    if case_ops != tg().is_caseops(sp):
        fail(
            f"{path}: a CaseOps tokenizer needs --caseops (and --caseops a CaseOps tokenizer, made with "
            "`python -m data.train_tokenizer --caseops`)"
        )
    if case_ops:
        warn_if_normalising(path, sp)
    return actual


def warn_if_normalising(path: Path, sp) -> None:
    """A CaseOps tokenizer that normalises (the records' nmt_nfkc) cannot decode every document back."""
    from data.verify import RETRAIN_FIX, normaliser

    if normaliser(sp) != "identity":
        print(
            f"warning: {path} normalises text ({normaliser(sp)}): documents it changes will not decode to "
            f"their original text and data.verify --input will fail on them; to make it exact, {RETRAIN_FIX}",
            file=sys.stderr,
        )


def written_by_us(folder: Path) -> bool:
    """True when folder/manifest.json is one this tool wrote (unreadable counts as not)."""
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return False
    return isinstance(manifest, dict) and manifest.get("tool") == TOOL


def prepare_output(out: Path, force: bool) -> Path:
    """Refuse to clobber shards this tool did not write; return a fresh temporary folder."""
    existing = shard_files(out, "train") + shard_files(out, "val")
    if existing and not written_by_us(out) and not force:
        fail(
            f"{out}: already holds shards not written by {TOOL} (downloaded data?); "
            "use another --output or --force"
        )
    tmp = out / f".tmp-tokenize-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def install_output(tmp: Path, out: Path) -> None:
    """Replace the old shards with the new ones (temporary folder -> final names by rename)."""
    sidecars = sorted(out.glob("fineweb_val_bytes_*.bin"))
    for old in [*shard_files(out, "train"), *shard_files(out, "val"), *sidecars, out / "manifest.json"]:
        old.unlink(missing_ok=True)
    for new in sorted(tmp.iterdir()):
        os.replace(new, out / new.name)
    tmp.rmdir()


def fingerprint(files: list[dict]) -> str:
    """sha256 over the sorted (shard name, shard sha256) list: one id for the whole dataset."""
    lines = "".join(f"{f['name']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["name"]))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_args(args: argparse.Namespace) -> None:
    if args.val_docs < 1:
        fail("--val-docs must be at least 1: the validation split cannot be empty")
    if args.shard_tokens < 1 or args.batch_docs < 1 or args.workers < 1:
        fail("--shard-tokens, --batch-docs and --workers must be positive")
    for path in args.input:
        if not path.is_file():
            fail(f"{path}: input file not found")


def tokenize(args: argparse.Namespace) -> dict:
    """Run the whole pipeline; return the manifest that was written."""
    check_args(args)
    vocab = open_tokenizer(args.tokenizer, args.vocab_size, args.caseops)
    tmp = prepare_output(args.output, args.force)
    try:
        writers = {s: ShardWriter(tmp, s, args.shard_tokens) for s in ("val", "train", "val_bytes")}
        splitter = Splitter(args.val_docs, writers, args.drop_overlap, args.caseops)
        val_open = lambda: splitter.stats["val"].documents < args.val_docs  # noqa: E731
        batches = read_batches(args.input, args.batch_docs, args.max_docs, val_open)
        init_args = (str(args.tokenizer), vocab, args.text_field, args.caseops)
        for enc in ordered_map(batches, args.workers, init_args):
            splitter.consume(enc)
        for writer in writers.values():
            writer.flush()
        check_result(splitter, args)
        manifest = build_manifest(args, vocab, splitter, tmp)
        write_json(tmp / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_output(tmp, args.output)
    return manifest


def check_result(splitter: Splitter, args: argparse.Namespace) -> None:
    if splitter.overlaps and not args.drop_overlap:
        shown = "\n  ".join(splitter.overlaps[:10])
        fail(
            f"{len(splitter.overlaps)} train document(s) duplicate val documents (same normalised text):\n"
            f"  {shown}\nremove them from the input, or pass --drop-overlap to drop them from train"
        )
    val, train = splitter.stats["val"].documents, splitter.stats["train"].documents
    stats = splitter.stats["val"]
    if args.caseops and stats.bpb_bytes != stats.bytes:
        fail(
            f"the val byte sidecar sums to {stats.bpb_bytes} bytes, the val documents have {stats.bytes}: "
            "some text is not covered by any token (a document the tokenizer encodes to nothing?)"
        )
    if val < args.val_docs or train == 0:
        fail(
            f"only {val + train} non-empty documents for --val-docs {args.val_docs}: "
            "both splits need documents; lower --val-docs or add input"
        )


def build_manifest(args: argparse.Namespace, vocab: int, splitter: Splitter, folder: Path) -> dict:
    for split, stats in splitter.stats.items():
        stats.files = splitter.writers[split].files
        for entry in stats.files:
            entry["sha256"] = sha256_file(folder / entry["name"])
    sidecars = splitter.writers["val_bytes"].files
    for entry in sidecars:
        entry["sha256"] = sha256_file(folder / entry["name"])
    all_files = splitter.stats["val"].files + splitter.stats["train"].files + sidecars
    splits = {s: splitter.stats[s].summary() for s in ("val", "train")}
    if args.caseops:
        splits["val"]["byte_files"] = sidecars
    extra = {"text_transform": caseops.TEXT_TRANSFORM} if args.caseops else {}
    return {
        "format": MANIFEST_FORMAT,
        "tool": TOOL,
        "fingerprint": fingerprint(all_files),
        "tokenizer": {
            "path": str(args.tokenizer),
            "sha256": sha256_file(args.tokenizer),
            "vocab_size": vocab,
        },
        "bos_id": tg().BOS_ID,
        "append_eos": False,
        "val_docs": args.val_docs,
        "shard_tokens": args.shard_tokens,
        "inputs": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in args.input],
        "skipped_empty": splitter.empty,
        "dropped_overlap": len(splitter.overlaps),
        "overlap_key": "blake2b-128 of NFKC, lower-cased, whitespace-collapsed text",
        "splits": splits,
        **extra,
    }


def report(manifest: dict, out: Path, seconds: float) -> None:
    for split, s in manifest["splits"].items():
        print(
            f"{split}: documents:{s['documents']} tokens:{s['tokens']} bytes:{s['bytes']} "
            f"bytes_per_token:{s['bytes_per_token']} bpb_bytes:{s['bpb_bytes']} files:{len(s['files'])}"
        )
    extra = f" dropped_overlap:{manifest['dropped_overlap']}" if manifest["dropped_overlap"] else ""
    print(f"skipped_empty:{manifest['skipped_empty']}{extra} fingerprint:{manifest['fingerprint']}")
    print(f"wrote {out}/manifest.json in {seconds:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    manifest = tokenize(args)
    report(manifest, args.output, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
