"""CaseOps exactness: a case-transformed tokenizer must be a bijection on the documents and val_bpb must
be charged to their original bytes. `data.train_tokenizer --caseops` trains without normalisation so
that decode + the inverse case transform gives every document back; `data.verify --input` proves it
document by document and fails on a tokenizer that folds text (the records' nmt_nfkc) or emits <unk>.
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bare `pytest` (not `python -m pytest`) leaves the root off sys.path
    sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from data import caseops, tokenize_docs, train_tokenizer, verify  # noqa: E402
from data._common import run_main  # noqa: E402

SAMPLE = REPO / "data/sample/sample_wiki.jsonl.xz"
BUNDLED = REPO / "data/sample/sample_1024_bpe_caseops.model"
VAL_DOCS, ALL_DOCS = 8, 24
# What a normaliser would change: NFKC folds (ligature, fraction, full-width, NBSP, ideographic
# space), whitespace runs, newlines, tabs, CR, NUL, leading/trailing blanks, combining marks.
HARD_TEXTS = [
    "  Leading and trailing  ",
    "Title\n\nBody line\r\nTabbed\tcell\x00end\n",
    "ﬁx ½ ＡＢＣ iPhone\u00a0NASA\u3000e\u0301 é 日本 🙂",
    f"{caseops.ESC}Odd {caseops.TITLE}text: OpenAI",
]


def sample_texts(n: int | None = None) -> list[str]:
    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:n]


def round_trips(sp, text: str) -> bool:
    return caseops.decode(sp.decode(sp.encode(caseops.encode(text)))) == text


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    code = run_main(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def train_small(prefix: Path, capsys) -> tuple[spm.SentencePieceProcessor, str]:
    """A small CaseOps tokenizer trained by the tool, and what the tool printed."""
    argv = ["--input", str(SAMPLE), "--caseops", "--vocab-size", "400", "--max-docs", "150"]
    code, text = run_cli(train_tokenizer, [*argv, "--threads", "1", "--output", str(prefix)], capsys)
    assert code == 0, text
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model"), text


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    texts = sample_texts(ALL_DOCS)
    texts[1:1] = HARD_TEXTS  # val documents that a normaliser changes beyond case, mixed case
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def build_and_verify(tmp_path, tokenizer: Path, docs_file: Path, capsys, *extra: str) -> tuple[int, str]:
    out = tmp_path / f"shards_{tokenizer.stem}"
    argv = ["--input", str(docs_file), "--output", str(out), "--tokenizer", str(tokenizer), "--caseops"]
    assert tokenize_docs.main([*argv, "--val-docs", str(VAL_DOCS), "--workers", "1", "--force"]) == 0
    capsys.readouterr()
    return run_cli(verify, [str(out), "--input", str(docs_file), *extra], capsys)


# ----------------------------------------------------------------------------- the tokenizers


def test_bundled_caseops_tokenizer_is_a_bijection_on_every_sample_document():
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED))
    assert verify.normaliser(sp) == "identity"
    assert [t for t in sample_texts() + HARD_TEXTS if not round_trips(sp, t)] == []


def test_train_tokenizer_caseops_trains_a_round_tripping_tokenizer(tmp_path, capsys):
    sp, printed = train_small(tmp_path / "tok", capsys)
    assert verify.normaliser(sp) == "identity" and sp.get_piece_size() == 400
    assert "caseops:1 normalization:identity" in printed
    assert [t for t in sample_texts(300) + HARD_TEXTS if not round_trips(sp, t)] == []
    assert train_tokenizer.trainer_settings(False) == train_tokenizer.TRAINER_SETTINGS  # plain: official


def test_the_records_normaliser_does_not_round_trip(tmp_path, capsys, monkeypatch):
    """The official settings (nmt_nfkc, whitespace collapsed), which the records' CaseOps tokenizer
    was trained with: the reason --caseops departs from them."""
    monkeypatch.setattr(train_tokenizer, "CASEOPS_SETTINGS", {})
    sp, printed = train_small(tmp_path / "nfkc", capsys)
    assert (
        verify.normaliser(sp) == "nmt_nfkc (whitespace runs collapsed)"
        and "normalization:nmt_nfkc" in printed
    )
    assert not any(round_trips(sp, t) for t in HARD_TEXTS[:3])
    # It strips leading blanks: their bytes go to the first token of text, never to a case operator.
    (ids, nbytes), *_ = caseops.encode_with_bytes(sp, ["  Leading words"])
    assert ids[0] == sp.piece_to_id(caseops.TITLE) and nbytes[0] == 0
    assert int(nbytes.sum()) == len("  Leading words") and nbytes[1] >= 2
    capsys.readouterr()
    tokenize_docs.warn_if_normalising(Path("nfkc.model"), sp)  # data.tokenize_docs --caseops warns
    assert "nfkc.model normalises text (nmt_nfkc" in capsys.readouterr().err
    tokenize_docs.warn_if_normalising(BUNDLED, spm.SentencePieceProcessor(model_file=str(BUNDLED)))
    assert capsys.readouterr().err == ""
    plain = spm.SentencePieceProcessor(model_file=str(REPO / "data/sample/sample_1024_bpe.model"))
    assert verify.normaliser(plain) == "nmt_nfkc (whitespace runs collapsed)"  # official, no --caseops


def test_round_trip_problem_names_unk_and_the_boundary_marker(tmp_path):
    """No byte fallback: a character outside the vocabulary is <unk>. A literal U+2581 reads as a space
    in every SentencePiece tokenizer, so even the bijective one cannot give it back."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caseops.encode(t) for t in sample_texts(80)),
        model_prefix=str(tmp_path / "nobyte"),
        **(train_tokenizer.trainer_settings(True) | {"byte_fallback": False, "vocab_size": 300}),
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "nobyte.model"))
    ids = sp.encode(caseops.encode("snow 雪"))
    assert "is <unk>" in verify.round_trip_problem(sp, ids, "snow 雪")
    bundled = spm.SentencePieceProcessor(model_file=str(BUNDLED))
    text = "a\u2581b"
    assert "U+2581" in verify.round_trip_problem(bundled, bundled.encode(text), text)
    assert verify.round_trip_problem(bundled, bundled.encode(HARD_TEXTS[0]), HARD_TEXTS[0]) == ""


# ----------------------------------------------------------------------------- data.verify


def test_verify_proves_the_exact_round_trip(tmp_path, docs_file, capsys):
    code, text = build_and_verify(tmp_path, BUNDLED, docs_file, capsys)
    assert code == 0, text
    assert f"CaseOps proof on all {VAL_DOCS} val documents" in text and "original text exactly" in text


def test_verify_fails_on_a_folding_normaliser_naming_document_normaliser_and_fix(
    tmp_path, docs_file, capsys, monkeypatch
):
    monkeypatch.setattr(train_tokenizer, "CASEOPS_SETTINGS", {})  # sabotage: the records' nmt_nfkc
    train_small(tmp_path / "nfkc", capsys)
    code, text = build_and_verify(tmp_path, tmp_path / "nfkc.model", docs_file, capsys)
    assert code == 1, text
    assert "do not round-trip exactly, the first: val document 0 (" in text and "line 1)" in text
    assert "normaliser is nmt_nfkc (whitespace runs collapsed)" in text
    assert "python -m data.train_tokenizer --caseops" in text and "--accept-normalised" in text
    code, text = build_and_verify(tmp_path, tmp_path / "nfkc.model", docs_file, capsys, "--accept-normalised")
    assert code == 0 and "--accept-normalised: " in text and "normalised for" in text, text
    capsys.readouterr()
    code, text = run_cli(verify, [str(tmp_path / "shards_nfkc")], capsys)  # no --input: a warning
    assert code == 0 and "normaliser is nmt_nfkc" in text, text


def test_verify_fails_when_the_transform_drops_an_operator(tmp_path, docs_file, capsys, monkeypatch):
    """Sabotage: CAPNEXT dropped ("iPhone" -> "iphone"). Ids and sidecar stay self-consistent (a letter
    is one byte whatever its case), so only the round trip to the original text catches it."""
    encode = caseops.encode
    monkeypatch.setattr(caseops, "encode", lambda text: encode(text).replace(caseops.CAPNEXT, ""))
    code, text = build_and_verify(tmp_path, BUNDLED, docs_file, capsys)
    assert code == 1 and "the case transform does not round-trip" in text, text


def test_verify_fails_when_a_stored_operator_is_dropped(tmp_path, docs_file, capsys):
    """Sabotage in the shards: one case operator token and its sidecar entry removed from val."""
    code, _ = build_and_verify(tmp_path, BUNDLED, docs_file, capsys)
    assert code == 0
    folder = tmp_path / f"shards_{BUNDLED.stem}"
    tokens = np.array(tg.load_shard(folder / "fineweb_val_000000.bin"))
    side = np.array(tg.load_shard(folder / "fineweb_val_bytes_000000.bin"))
    title = spm.SentencePieceProcessor(model_file=str(BUNDLED)).piece_to_id(caseops.TITLE)
    i = int(np.flatnonzero(tokens == title)[0])
    tg.write_shard(folder / "fineweb_val_000000.bin", np.delete(tokens, i))
    tg.write_shard(folder / "fineweb_val_bytes_000000.bin", np.delete(side, i))
    (folder / "manifest.json").unlink()  # its counts would fail first
    code, text = run_cli(
        verify, [str(folder), "--input", str(docs_file), "--tokenizer", str(BUNDLED)], capsys
    )
    assert code == 1 and "stored ids differ from the tokenization" in text, text
