"""Check a shard folder before training on it: official downloads and tokenize_docs output alike.

Checks, each printed as `ok`, `warn` or `FAIL`:
  shards     every fineweb_{val,train}_*.bin has a valid header (train_gpt.read_shard_header),
             numbering has no gaps, each split's stream starts with BOS
  ids        every token id < vocab size (train_gpt.load_shard), no EOS (the format has none)
  manifest   token/document counts (and with --checksums sha256 + fingerprint) against
             manifest.json (tokenize_docs) or hub_manifest.json (download)
  tokenizer  sampled val documents re-encode to the same ids (shards made with this tokenizer)
  overlap    no train document has exactly the token sequence of a val document
  bytes      BPB byte table exact on sampled val documents (train_gpt.check_byte_table on the
             stored ids, decoded by the tokenizer); documents with <unk> are skipped and counted
  sidecar    with a val byte sidecar (fineweb_val_bytes_*.bin, CaseOps: openai/parameter-golf PR
             #1729) instead of the table: it pairs with the val shards, and passes train_gpt's
             self-check (check_sidecar); a CaseOps tokenizer without one fails. With --input (the
             documents tokenize_docs --caseops read), every val document is proved: its text
             round-trips through the case transform, the stored ids are the tokenization of the
             transformed text, its sidecar equals the recomputed per-token original bytes and sums
             to its UTF-8 length, and decode + inverse gives the original text back EXACTLY: a
             tokenizer that normalises (the records' nmt_nfkc: NFKC folding, whitespace runs
             collapsed) or emits <unk> fails, naming the first such document, unless
             --accept-normalised lets documents decode to their normalised form (counted apart).
             The records charge the raw document bytes (their sidecar counts the original text,
             not its NFKC form), so only a bijective tokenizer makes val_bpb a code length of the
             text it is charged to; `data.train_tokenizer --caseops` trains one
Exit status 1 and a list of the problems if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import caseops
from data._common import (
    REPO_ROOT,
    expected_tokens,
    fail,
    iter_docs,
    run_main,
    sha256_file,
    shard_files,
    tg,
)

EOS_ID = 2  # the challenge tokenizers' eos id; shards never contain it (append_eos=False)
ROUNDTRIP_MIN = 0.9  # re-encoding is exact for ~all unk-free docs with the right tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.verify",
        description="Verify a shard folder: headers, token ids, manifest counts, train/val disjointness "
        "and the BPB byte table. Exit status 1 with a list of problems on failure.",
    )
    parser.add_argument("data_dir", type=Path, help="folder with fineweb_{val,train}_*.bin")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="SentencePiece .model (default: the one named by manifest.json or hub_manifest.json)",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    parser.add_argument(
        "--sample-docs",
        type=int,
        default=200,
        help="val documents for the byte/tokenizer checks (default 200)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="train shards: headers and the first shard only (no overlap scan)",
    )
    parser.add_argument("--checksums", action="store_true", help="also compare sha256 of every shard")
    parser.add_argument(
        "--input",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE",
        help="CaseOps data: the JSON-lines documents the shards were made from, in the same order; "
        "every val document is proved against its original text",
    )
    parser.add_argument("--text-field", default="text", help="JSON field holding the text (default 'text')")
    parser.add_argument(
        "--accept-normalised",
        action="store_true",
        help="with --input: let a val document decode to the text as the tokenizer's normaliser leaves it "
        "(the records' nmt_nfkc CaseOps tokenizer) instead of failing the exact round trip",
    )
    return parser


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, message: str) -> None:
        print(f"ok    {message}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warn  {message}")

    def fail(self, message: str) -> None:
        self.problems.append(message)
        print(f"FAIL  {message}")


# ----------------------------------------------------------------------------- inputs


def load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{path}: not valid JSON ({exc})")


def find_tokenizer(args: argparse.Namespace, ours: dict | None, hub: dict | None) -> Path:
    """--tokenizer, else the manifest's tokenizer (paths as written, or from the repo root)."""
    if args.tokenizer is not None:
        return args.tokenizer
    candidates = []
    if ours:
        candidates.append(Path(ours["tokenizer"]["path"]))
    if hub:
        folder = args.data_dir.resolve()  # "." or "sub/.." name the dataset only once resolved
        entry = next((d for d in hub.get("datasets", []) if d.get("name") == folder.name), {})
        tok = next((t for t in hub.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
        if tok.get("model_path"):
            candidates.append(folder.parent.parent / tok["model_path"])
    for path in candidates:
        for option in (path, REPO_ROOT / path):
            if option.is_file():
                return option
    fail(
        f"{args.data_dir}: no tokenizer found via its manifest "
        f"(tried {[str(c) for c in candidates]}); pass --tokenizer"
    )


def doc_hash(doc: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(doc, dtype="<u2").tobytes(), digest_size=16).digest()


def iter_stream_docs(files: list[Path]) -> Iterator[tuple[np.ndarray, str]]:
    """Documents (BOS removed) of a split's stream, which may continue across shard boundaries."""
    bos_id, pending, where = tg().BOS_ID, None, ""
    for path in files:
        tokens = tg().load_shard(path)
        starts = np.flatnonzero(tokens == bos_id)
        head = int(starts[0]) if starts.size else tokens.size
        if pending is not None:
            pending.append(np.asarray(tokens[:head]))
        for j, start in enumerate(starts):
            if pending is not None:
                yield np.concatenate(pending), where
            end = int(starts[j + 1]) if j + 1 < starts.size else tokens.size
            pending, where = [np.asarray(tokens[start + 1 : end])], f"{path.name}@{start}"
    if pending is not None:
        yield np.concatenate(pending), where


# ----------------------------------------------------------------------------- checks


def check_shards(report: Report, folder: Path, quick: bool, vocab: int | None) -> dict[str, list[Path]]:
    """Headers of all shards; ids (< vocab, no EOS) of val and of train unless --quick."""
    files = {split: shard_files(folder, split) for split in ("val", "train")}
    for split, paths in files.items():
        if not paths:
            report.fail(f"no {split} shards ({folder}/fineweb_{split}_*.bin)")
        if [p.name for p in paths] != [f"fineweb_{split}_{i:06d}.bin" for i in range(len(paths))]:
            report.fail(f"{split} shards are not numbered 000000..{len(paths) - 1:06d}: a shard is missing")
    counts, bad = {}, 0
    for split, paths in files.items():
        for i, path in enumerate(paths):
            try:
                counts[path] = tg().read_shard_header(path)
                if vocab is not None and (split == "val" or not quick or i == 0):
                    check_ids(report, path, vocab, first=i == 0)
            except tg().DataError as exc:
                bad += 1
                report.fail(str(exc))
    total = {s: sum(counts.get(p, 0) for p in files[s]) for s in files}
    if not bad:
        n_val, n_train = len(files["val"]), len(files["train"])
        report.ok(
            f"shards: {n_val} val ({total['val']:,} tokens), {n_train} train ({total['train']:,} tokens); "
            "headers valid"
        )
    return files


def check_ids(report: Report, path: Path, vocab: int, first: bool) -> None:
    tokens = tg().load_shard(path, vocab)  # raises DataError on an id >= vocab
    if first and tokens.size and tokens[0] != tg().BOS_ID:
        report.fail(f"{path}: the split's stream starts with {int(tokens[0])}, not BOS={tg().BOS_ID}")
    eos = int((tokens == EOS_ID).sum())
    if eos:
        report.warn(f"{path}: {eos} EOS tokens (id {EOS_ID}); challenge shards have none")


def check_manifests(
    report: Report, files: dict[str, list[Path]], ours: dict | None, hub: dict | None, args
) -> None:
    if ours and not _written_by_tokenize_docs(ours):
        report.warn("manifest.json is not one data.tokenize_docs wrote: its counts are not cross-checked")
    elif ours:
        check_own_manifest(report, files, ours, args)
    if hub:
        check_hub_manifest(report, files, hub, args.data_dir.resolve().name)
    if not ours and not hub:
        report.warn("no manifest.json or hub_manifest.json: token counts not cross-checked")


def _written_by_tokenize_docs(manifest: dict) -> bool:
    splits = manifest.get("splits")
    return isinstance(splits, dict) and all(
        isinstance(splits.get(split), dict) and {"files", "documents"} <= splits[split].keys()
        for split in ("val", "train")
    )


def check_own_manifest(report: Report, files: dict[str, list[Path]], manifest: dict, args) -> None:
    """Shard names, token counts and document counts (BOS per split) as tokenize_docs recorded them."""
    before = len(report.problems)
    for split in ("val", "train"):
        entries = manifest["splits"][split]["files"]
        names = [e["name"] for e in entries]
        if names != [p.name for p in files[split]]:
            report.fail(
                f"manifest.json lists {split} shards {names}, the folder has {[p.name for p in files[split]]}"
            )
            continue
        for entry, path in zip(entries, files[split], strict=True):
            check_listed_shard(report, path, entry, args.checksums)
        if len(report.problems) == before and not (args.quick and split == "train"):
            try:
                docs = sum(int((tg().load_shard(p) == tg().BOS_ID).sum()) for p in files[split])
            except tg().DataError:
                continue  # an unreadable shard, already reported
            want = manifest["splits"][split]["documents"]
            if docs != want:
                report.fail(f"{split}: {docs} documents (BOS tokens), manifest.json says {want}")
    if args.checksums and len(report.problems) == before:
        from data.tokenize_docs import fingerprint

        listed = manifest["splits"]["val"]["files"] + manifest["splits"]["train"]["files"]
        if fingerprint(listed) != manifest["fingerprint"]:
            report.fail("manifest.json fingerprint does not match its file list")
    if len(report.problems) == before:
        extra = " and sha256" if args.checksums else ""
        report.ok(f"manifest.json: shard names, token and document counts{extra} match")


def check_listed_shard(report: Report, path: Path, entry: dict, checksums: bool) -> None:
    try:
        count = tg().read_shard_header(path)
    except tg().DataError:
        return  # already reported
    if count != entry["tokens"]:
        report.fail(f"{path}: {count} tokens, manifest.json says {entry['tokens']}")
    elif checksums and sha256_file(path) != entry["sha256"]:
        report.fail(f"{path}: sha256 differs from manifest.json (file changed after it was written)")


def check_hub_manifest(report: Report, files: dict[str, list[Path]], manifest: dict, name: str) -> None:
    """Val complete; every shard present has the token count the manifest implies (as download checks)."""
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        report.warn(f"hub_manifest.json has no dataset {name}: counts not checked")
        return
    stats = entry.get("stats") or {}
    before = len(report.problems)
    want_val, want_train = stats.get("files_val"), stats.get("files_train")
    if want_val is not None and len(files["val"]) != int(want_val):
        report.fail(f"{len(files['val'])} val shards, the hub manifest has {want_val}: val must be complete")
    for split, paths in files.items():
        for i, path in enumerate(paths):
            want = expected_tokens(manifest, stats, split, i)
            try:
                count = tg().read_shard_header(path)
            except tg().DataError:
                continue  # already reported
            if want is not None and count != want:
                report.fail(f"{path}: {count} tokens, the hub manifest implies {want}")
    if len(report.problems) == before:
        report.ok(
            f"hub_manifest.json: val complete, token counts match "
            f"({len(files['train'])}/{want_train} train shards)"
        )


def val_sample(files: list[Path], limit: int) -> list[np.ndarray]:
    docs = []
    for doc, _ in iter_stream_docs(files):
        if limit and len(docs) >= limit:
            break
        docs.append(doc)
    return docs


def check_tokenizer_match(report: Report, sp, docs: list[np.ndarray]) -> None:
    """Decoding and re-encoding reproduces the stored ids only with the tokenizer that made them."""
    unk = sp.unk_id()
    clean = [[int(t) for t in d] for d in docs if d.size and unk not in d]
    if not clean:
        report.warn("tokenizer match not checked: no sampled val document without <unk>")
        return
    same = sum(sp.encode(sp.decode(ids)) == ids for ids in clean)
    if same / len(clean) < ROUNDTRIP_MIN:
        report.fail(
            f"only {same}/{len(clean)} sampled val documents re-encode to their stored ids: the shards were "
            "probably made with another tokenizer (check --tokenizer / TOKENIZER_PATH)"
        )
    else:
        report.ok(f"tokenizer matches: {same}/{len(clean)} sampled val documents re-encode to the stored ids")


def check_bytes(report: Report, sp, luts, docs: list[np.ndarray], val_files: list[Path]) -> None:
    """BPB byte table against the decoded UTF-8 of each sampled document's stored ids."""
    unk = sp.unk_id()
    with_unk = [d for d in docs if unk in d]
    checked, bad = 0, []
    for i, doc in enumerate(docs):
        if unk in doc or not doc.size:
            continue
        try:
            tg().check_byte_table(sp, [doc], luts)
            checked += 1
        except tg().DataError as exc:
            bad.append(f"val document {i}: {exc}")
    if bad:
        report.fail(
            f"BPB byte table wrong on {len(bad)} of {checked + len(bad)} val documents:\n      "
            + "\n      ".join(bad[:5])
        )
    elif checked:
        report.ok(f"BPB byte table exact on {checked} sampled val documents")
    if with_unk:
        total_unk = sum(int((tg().load_shard(p) == unk).sum()) for p in val_files)
        report.warn(
            f"{len(with_unk)} of {len(docs)} sampled val documents contain <unk> and were not byte-checked "
            f"({total_unk} <unk> tokens in val): the byte table counts 0 bytes for <unk>, so val_bpb "
            "undercounts their bytes; the tokenizer has no byte fallback for some characters"
        )


def check_sidecar(report: Report, sp, folder: Path, val_files: list[Path], args) -> bool:
    """The byte sidecar checks (see the module docstring); False when there is no sidecar and the
    byte table is what train_gpt.py would divide by."""
    tokens = np.concatenate([tg().load_shard(p) for p in val_files])
    try:
        sidecar = tg().load_byte_sidecar(folder, len(tokens))
    except tg().DataError as exc:
        report.fail(str(exc))
        return True
    if sidecar is None:
        if tg().is_caseops(sp):
            report.fail(
                "CaseOps tokenizer but no val byte sidecar (fineweb_val_bytes_*.bin): val_bpb cannot be "
                "charged to the original bytes; rebuild with data.tokenize_docs --caseops"
            )
            return True
        if args.input:
            report.warn("--input is used for CaseOps data only: not read")
        return False
    try:
        checked = tg().check_sidecar(sp, tokens, sidecar, args.sample_docs or len(tokens))
        report.ok(f"val byte sidecar pairs with the val shards and passes the self-check ({checked:,} bytes)")
    except tg().DataError as exc:
        report.fail(str(exc))
    if args.input:
        prove_documents(report, sp, tokens, sidecar, args)
    elif normaliser(sp) != "identity":
        report.warn(
            f"the CaseOps tokenizer's normaliser is {normaliser(sp)}: its ids do not decode to every "
            f"original document (--input with the documents finds them); to make it exact, {RETRAIN_FIX}"
        )
    return True


RETRAIN_FIX = (
    "retrain the tokenizer with `python -m data.train_tokenizer --caseops` (normalisation identity, "
    "whitespace kept, byte fallback) and rebuild the shards with `python -m data.tokenize_docs --caseops`"
)
ACCEPT_FIX = (
    "or pass --accept-normalised to accept a normalising tokenizer such as the records' (val_bpb then "
    "scores the normalised text, charged to the original bytes)"
)


def normaliser(sp) -> str:
    """The tokenizer's normalisation rule as its model stores it (NormalizerSpec field 1 `name`,
    which protobuf serialises first), and whether it collapses whitespace runs."""
    import sentencepiece as spm

    spec = spm.SentencePieceNormalizer(model_proto=sp.serialized_model_proto()).serialized_normalizer_spec()
    named = len(spec) > 2 and spec[0] == 0x0A and spec[1] < 0x80  # tag (1, bytes), one-byte length
    name = spec[2 : 2 + spec[1]].decode("utf-8", "replace") if named else "unnamed"
    collapses = tg().BOUNDARY_SPACE * 2 not in sp.normalize("a  b")
    return f"{name}{' (whitespace runs collapsed)' if collapses else ''}"


def normalised_form(sp, text: str) -> str:
    """The transformed text as the tokenizer's normaliser leaves it, as decoding prints it."""
    return sp.normalize(caseops.encode(text)).replace(tg().BOUNDARY_SPACE, " ")


def round_trip_problem(sp, ids: list[int], text: str) -> str:
    """Why decode + the inverse case transform does not give `text` back ("" when it does)."""
    decoded = sp.decode(ids)
    try:
        restored = caseops.decode(decoded)
    except caseops.CaseOpsError as exc:
        return f"the decoded ids are not CaseOps text ({exc})"
    if restored == text:
        return ""
    if sp.unk_id() in ids:
        return f"token {ids.index(sp.unk_id())} is <unk>: the tokenizer has no byte fallback for a character"
    k = next((i for i, (a, b) in enumerate(zip(text, restored, strict=False)) if a != b), None)
    k = min(len(text), len(restored)) if k is None else k
    why = " (SentencePiece reads a literal U+2581 as a space)" * (tg().BOUNDARY_SPACE in text)
    want, got = text[k : k + 12], restored[k : k + 12]
    return f"at character {k} the text has {want!r}, decode + inverse gives {got!r}{why}"


def sidecar_problem(sp, ids: list[int], side: np.ndarray, text: str) -> str:
    """The ids and the byte sidecar of one val document against its original text ("" when right)."""
    want_ids, want_bytes = caseops.encode_with_bytes(sp, [text])[0]
    return (
        "the case transform does not round-trip" * (caseops.decode(caseops.encode(text)) != text)
        or "stored ids differ from the tokenization of the transformed text" * (ids != want_ids)
        or "sidecar differs from the recomputed original bytes" * (side.tolist() != want_bytes.tolist())
        or "sidecar does not sum to the text's UTF-8 length" * (int(side.sum()) != len(text.encode()))
    )


def prove_documents(report: Report, sp, tokens: np.ndarray, sidecar: np.ndarray, args) -> None:
    """Document by document against the original texts (the first non-blank ones, as tokenize_docs):
    the ids and the sidecar, then the exact round trip decode + inverse = the original text."""
    bos = np.flatnonzero(tokens == tg().BOS_ID)
    ends = [*bos[1:], len(tokens)]
    texts = ((f"{path} line {line}", text) for path, line, text in iter_docs(args.input, args.text_field))
    texts = (item for item in texts if item[1].strip())
    bad, lossy, normalised, total = [], [], 0, 0
    for i, (start, end, (where, text)) in enumerate(zip(bos, ends, texts, strict=False)):
        ids, side = [int(t) for t in tokens[start + 1 : end]], sidecar[start + 1 : end]
        total += 1
        if problem := sidecar_problem(sp, ids, side, text):
            bad.append(f"val document {i} ({where}): {problem}")
        elif problem := round_trip_problem(sp, ids, text):
            accepted = args.accept_normalised and sp.decode(ids) == normalised_form(sp, text)
            normalised += accepted
            if not accepted:
                lossy.append(f"val document {i} ({where}): {problem}")
    if total != len(bos):
        bad.append(f"--input has {total} non-blank documents for {len(bos)} val documents")
    if bad:
        report.fail(f"{len(bad)} val documents fail the CaseOps proof:\n      " + "\n      ".join(bad[:5]))
    if lossy:
        report.fail(
            f"{len(lossy)} of {total} val documents do not round-trip exactly, the first: {lossy[0]}; the "
            f"tokenizer's normaliser is {normaliser(sp)}. Fix: {RETRAIN_FIX}; {ACCEPT_FIX}"
        )
    if bad or lossy:
        return
    exact = "exactly" if not normalised else f"exactly for {total - normalised}, normalised for {normalised}"
    report.ok(
        f"CaseOps proof on all {total} val documents: ids = tokenization of the transformed text, sidecar = "
        f"original UTF-8 bytes, decode + inverse = the original text {exact}"
    )
    if normalised:
        report.warn(
            f"--accept-normalised: {normalised} val documents decode to the text as the normaliser "
            f"{normaliser(sp)} leaves it, not to the original: the tokenizer is not bijective on them"
        )


def check_overlap(report: Report, files: dict[str, list[Path]], sp) -> None:
    """Exact token-sequence duplicates between val and train documents (empty docs ignored)."""
    val: dict[bytes, int] = {}
    for i, (doc, _) in enumerate(iter_stream_docs(files["val"])):
        if doc.size:
            val.setdefault(doc_hash(doc), i)
    hits, n_train = [], 0
    for doc, where in iter_stream_docs(files["train"]):
        n_train += 1
        if doc.size and (i := val.get(doc_hash(doc))) is not None:
            hits.append(f"train {where} = val document {i}: {sp.decode([int(t) for t in doc[:40]])[:60]!r}")
    if hits:
        report.fail(
            f"{len(hits)} train documents repeat a val document token for token:\n      "
            + "\n      ".join(hits[:5])
        )
    else:
        report.ok(f"train/val disjoint: {len(val)} val and {n_train} train documents share none")


def verify(args: argparse.Namespace) -> Report:
    report = Report()
    folder = args.data_dir
    if not folder.is_dir():
        fail(f"{folder}: not a folder; give the folder holding fineweb_*_*.bin")
    ours, hub = load_json(folder / "manifest.json"), load_json(folder / "hub_manifest.json")
    tokenizer = find_tokenizer(args, ours, hub)
    vocab = args.vocab_size or (ours or {}).get("tokenizer", {}).get("vocab_size")
    import sentencepiece as spm

    vocab = vocab or spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    print(f"verify {folder} with tokenizer {tokenizer} (vocab {vocab})")
    try:
        sp = tg().load_tokenizer(tokenizer, vocab)
    except tg().DataError as exc:
        report.fail(str(exc))
        sp = None
    files = check_shards(report, folder, args.quick, vocab if sp else None)
    check_manifests(report, files, ours, hub, args)
    if sp is None or not files["val"] or report.problems:
        return report  # the content checks need readable shards and a matching tokenizer
    docs = val_sample(files["val"], args.sample_docs)
    check_tokenizer_match(report, sp, docs)
    if not check_sidecar(report, sp, folder, files["val"], args):
        check_bytes(report, sp, tg().build_byte_luts(sp, vocab), docs, files["val"])
    if args.quick:
        report.warn("--quick: train/val overlap not scanned")
    else:
        check_overlap(report, files, sp)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = verify(args)
    if report.problems:
        print(f"verify: {len(report.problems)} problem(s) in {args.data_dir}:", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"verify: OK ({len(report.warnings)} warning(s))")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
