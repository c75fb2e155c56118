"""Train a SentencePiece BPE tokenizer with the settings of the challenge's published tokenizers.

The trainer options copy the official export (openai/parameter-golf, data/download_hf_docs_and_tokenize.py):
BPE, character_coverage 0.999, byte_fallback, split_digits, nmt_nfkc normalisation, no dummy
prefix, ids pad=0 bos=1 eos=2 unk=3, hard_vocab_limit off, and SentencePiece's default
max_sentence_length (4192 bytes: longer documents are left out of training, as officially).
Documents are fed whole, NUL replaced by a space and stripped; blank ones are skipped.

--caseops trains a CaseOps tokenizer (data/caseops.py; openai/parameter-golf PR #1729): documents
are fed case-transformed and the four case operators are user-defined pieces, as the records'
tokenizer_specs_export_caseops_v1_reserved_only.json asks (`reserve_text_transform_controls`).
Unlike the records' tokenizer it normalises nothing (CASEOPS_SETTINGS: rule `identity`, whitespace
kept): the records train with nmt_nfkc, which folds characters (NFKC: "ﬁ" -> "fi", "½" -> "1⁄2")
and collapses whitespace runs and newlines into one space, so decoding their ids does not give the
original text back although the byte sidecar charges its original bytes. With `identity` and byte
fallback, decode followed by the inverse case transform gives every document back exactly (only a
literal U+2581 cannot: SentencePiece reads it as a space), which `data.verify --input` proves.

Note: the bundled data/sample/fineweb_1024_bpe.model has no byte-fallback pieces (its trainer
spec says byte_fallback=false), so text it cannot cover becomes <unk>. Tokenizers trained here
have the 256 <0xNN> pieces and never emit <unk>.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from data import caseops
from data._common import add_document_arguments, fail, iter_docs, run_main

# Official trainer settings; everything not listed keeps SentencePiece's default, as officially.
TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# --caseops: a bijective tokenizer, so that val_bpb, charged to the original bytes, is the code
# length of the original text (the records' nmt_nfkc tokenizer scores the normalised text instead).
CASEOPS_SETTINGS = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}
SP_DEFAULT_MAX_SENTENCE_LENGTH = 4192
CASEOPS_NAME = "lossless_caps_caseops_v1_reserved"  # the records' tokenizer and dataset suffix


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.train_tokenizer",
        description="Train a SentencePiece BPE tokenizer (byte fallback, official challenge settings) "
        "on JSON-lines documents; writes PREFIX.model and PREFIX.vocab.",
    )
    add_document_arguments(parser)
    parser.add_argument(
        "--vocab-size", type=int, default=1024, help="pieces, e.g. 1024, 4096, 8192 (default 1024)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output prefix (default data/tokenizers/fineweb_{V}_bpe, with --caseops "
        "fineweb_{V}_bpe_lossless_caps_caseops_v1_reserved -> .model and .vocab); "
        "a trailing .model is dropped",
    )
    parser.add_argument(
        "--caseops",
        action="store_true",
        help="CaseOps tokenizer: train on case-transformed text, the case operators as user-defined pieces, "
        "no normalisation (decoding gives every document back)",
    )
    parser.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    parser.add_argument(
        "--skip-docs",
        type=int,
        default=0,
        help="skip the first N non-blank documents (N = --val-docs of tokenize_docs keeps its val unseen)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="trainer threads")
    parser.add_argument(
        "--max-sentence-length",
        type=int,
        default=SP_DEFAULT_MAX_SENTENCE_LENGTH,
        help="documents longer than this many bytes are ignored by the trainer (SentencePiece default 4192, "
        "which the official tokenizers used)",
    )
    return parser


class DocFeed:
    """Iterator over training texts that also counts what it fed, for the summary."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.docs = 0
        self.too_long = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        # SentencePiece wraps exceptions raised inside the iterator in an unreadable RuntimeError,
        # so a bad input line ends the feed and is raised again after training returns.
        try:
            yield from self._texts()
        except Exception as exc:  # re-raised by train()
            self.error = exc

    def _texts(self) -> Iterator[str]:
        args, skipped = self.args, 0
        for _path, _lineno, text in iter_docs(args.input, args.text_field):
            if not text.strip():
                continue  # blank: tokenize_docs leaves it out of val too, so it is not counted
            if skipped < args.skip_docs:
                skipped += 1
                continue
            if args.max_docs is not None and self.docs >= args.max_docs:
                return
            text = text.replace("\x00", " ").strip()
            if not text:
                continue
            if args.caseops:
                text = caseops.encode(text)
            self.docs += 1
            self.too_long += len(text.encode("utf-8")) > args.max_sentence_length
            yield text


def trainer_settings(case_ops: bool) -> dict:
    """The official settings; --caseops adds the operator pieces and the round-tripping normaliser."""
    if not case_ops:
        return dict(TRAINER_SETTINGS)
    return TRAINER_SETTINGS | CASEOPS_SETTINGS | {"user_defined_symbols": list(caseops.OPERATORS)}


def train(args: argparse.Namespace) -> Path:
    """Train into a temporary prefix next to the output, then rename: no half-written models."""
    import sentencepiece as spm

    for path in args.input:
        if not path.is_file():
            fail(f"{path}: input file not found")
    if not 260 < args.vocab_size <= 65536:
        fail(f"--vocab-size {args.vocab_size}: must exceed 260 (4 specials + 256 byte pieces) and fit uint16")
    suffix = f"_{CASEOPS_NAME}" if args.caseops else ""
    prefix = args.output or Path(f"data/tokenizers/fineweb_{args.vocab_size}_bpe{suffix}")
    prefix = prefix.with_name(prefix.name.removesuffix(".model"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    feed = DocFeed(args)
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".train_tokenizer-") as tmp:
        tmp_prefix = Path(tmp) / prefix.name
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(feed),
                model_prefix=str(tmp_prefix),
                vocab_size=args.vocab_size,
                num_threads=args.threads,
                max_sentence_length=args.max_sentence_length,
                minloglevel=2,
                **trainer_settings(args.caseops),
            )
        except RuntimeError as exc:
            if feed.error is None:
                fail(f"SentencePiece training failed after {feed.docs} documents: {exc}")
        if feed.error is not None:
            raise feed.error
        for suffix in (".model", ".vocab"):  # SentencePiece appends these; with_suffix would cut "v1.5"
            os.replace(f"{tmp_prefix}{suffix}", f"{prefix}{suffix}")
    model = Path(f"{prefix}.model")
    report(model, args, feed)
    return model


def report(model: Path, args: argparse.Namespace, feed: DocFeed) -> None:
    """Summarise the model and flag what would break train_gpt (vocab size, missing boundary piece)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    size = sp.vocab_size()
    byte_pieces = sum(sp.is_byte(i) for i in range(size))
    print(
        f"wrote {model} and {model.with_suffix('.vocab')}: vocab_size:{size} byte_pieces:{byte_pieces} "
        f"docs:{feed.docs} docs_over_max_sentence_length:{feed.too_long} caseops:{int(args.caseops)} "
        f"normalization:{trainer_settings(args.caseops)['normalization_rule_name']}"
    )
    if size != args.vocab_size:
        print(
            f"warning: only {size} pieces (asked {args.vocab_size}): too little text for this vocabulary; "
            f"use more documents, or set VOCAB_SIZE={size}",
            file=sys.stderr,
        )
    if sp.piece_to_id("\u2581") == sp.unk_id():
        print("warning: no standalone '\u2581' piece; the BPB byte rules expect one", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    train(args)
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
