"""CaseOps end to end: the lossless case transform, the val byte sidecar, and val_bpb charged to the
ORIGINAL text's bytes (openai/parameter-golf PR #1729, #1736; #2138 divided by transformed bytes).

Built from the bundled sample and its CaseOps tokenizer; nothing needs the network.
"""

from __future__ import annotations

import json
import lzma
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bare `pytest` (not `python -m pytest`) leaves the root off sys.path
    sys.path.insert(0, str(REPO))

from conftest import make_hp, randomize_  # noqa: E402

import train_gpt as tg  # noqa: E402
from data import caseops, download, tokenize_docs, train_tokenizer, verify  # noqa: E402
from data._common import run_main  # noqa: E402
from data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE  # noqa: E402

SAMPLE = REPO / "data/sample/sample_wiki.jsonl.xz"
CASEOPS_TOKENIZER = REPO / "data/sample/sample_1024_bpe_caseops.model"
PLAIN_TOKENIZER = REPO / "data/sample/sample_1024_bpe.model"
VAL_DOCS, ALL_DOCS = 12, 40


def sample_texts() -> list[str]:
    with lzma.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    code = run_main(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    """The first sample documents, one with surrounding whitespace and literal operator characters."""
    texts = sample_texts()[:ALL_DOCS]
    texts[3] = f"  {ESC}Odd {TITLE}text: iPhone NASA, OpenAI.\n\n"
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory, docs_file) -> Path:
    out = tmp_path_factory.mktemp("caseops") / "sample_caseops"
    args = ["--input", str(docs_file), "--output", str(out), "--tokenizer", str(CASEOPS_TOKENIZER)]
    assert tokenize_docs.main([*args, "--caseops", "--val-docs", str(VAL_DOCS), "--workers", "1"]) == 0
    return out


def docs_of(tokens: np.ndarray) -> list[tuple[int, int]]:
    bos = np.flatnonzero(tokens == tg.BOS_ID)
    return list(zip(bos, [*bos[1:], len(tokens)], strict=True))


# ----------------------------------------------------------------------------- transform


def test_transform_round_trips_every_sample_document():
    for text in sample_texts():
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text
        assert not any("A" <= ch <= "Z" for ch in encoded)  # case lives in the operators only


@pytest.mark.parametrize(
    ("text", "want"),
    [  # the records' README examples, then the corner cases of the rules
        ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
        ("iPhone OpenAI", f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"),
        ("A b X1Y", f"{TITLE}a b {TITLE}x1{TITLE}y"),
        ("ABc aBC", f"{TITLE}a{CAPNEXT}bc a{CAPNEXT}b{CAPNEXT}c"),
        (f"x{TITLE}Y {ESC}", f"x{ESC}{TITLE}{TITLE}y {ESC}{ESC}"),
        ("Éclair ÉCOLE", f"É{'clair'} É{ALLCAPS}cole"),
        ("", ""),
    ],
)
def test_transform_follows_the_records_rules(text, want):
    assert caseops.encode(text) == want
    assert caseops.decode(want) == text


@pytest.mark.parametrize(
    "bad",
    [TITLE, f"{TITLE} a", f"a{TITLE}b", f"{CAPNEXT}a", f"{ALLCAPS}a{CAPNEXT}b", f"{TITLE}{ALLCAPS}a", ESC],
)
def test_decode_refuses_what_encode_never_makes(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(bad)


def test_operators_and_detection_agree_with_train_gpt(sp):
    assert caseops.OPERATORS == tg.CASEOPS_OPERATORS
    assert tg.is_caseops(sp)
    assert not tg.is_caseops(spm.SentencePieceProcessor(model_file=str(PLAIN_TOKENIZER)))
    assert [sp.piece_to_id(c) for c in caseops.OPERATORS] == [4, 5, 6, 7]  # right after the specials


def test_original_bytes_charge_operators_nothing_and_escaped_characters_their_bytes():
    assert caseops.original_bytes([f"{TITLE}the", f" {ALLCAPS}nasa", f"{ESC}", f"{TITLE}x"]) == [3, 5, 0, 4]
    assert tg.caseops_text_bytes(f"{TITLE}the {ESC}{ESC}é") == len("The \ue004é".encode())


def test_per_token_bytes_sum_to_every_sample_documents_utf8_length(sp):
    texts = sample_texts() + ["  padded both sides \t", f"{ESC}{TITLE}Mixed iPhone ½ ﬁx 日本"]
    for k, (text, (ids, nbytes)) in enumerate(zip(texts, caseops.encode_with_bytes(sp, texts), strict=True)):
        assert k % 20 or ids == sp.encode(caseops.encode(text))  # the offset mapping's ids are encode's
        assert int(nbytes.sum()) == len(text.encode("utf-8"))
        unescaped_ops = [i for i, t in enumerate(ids) if t in (4, 5, 6) and (i == 0 or ids[i - 1] != 7)]
        assert all(nbytes[i] == 0 for i in unescaped_ops)


# ----------------------------------------------------------------------------- data tools


def test_train_tokenizer_caseops_reserves_the_operators(tmp_path, capsys):
    prefix = tmp_path / "tok"
    argv = ["--input", str(SAMPLE), "--caseops", "--vocab-size", "400", "--max-docs", "150"]
    code, text = run_cli(train_tokenizer, [*argv, "--threads", "1", "--output", str(prefix)], capsys)
    assert code == 0 and "caseops:1" in text, text
    trained = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    assert tg.is_caseops(trained) and [trained.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    text_pieces = [trained.id_to_piece(i) for i in range(8, trained.vocab_size()) if not trained.is_byte(i)]
    assert text_pieces and not any("A" <= c <= "Z" for p in text_pieces for c in p)  # trained lower-cased


def test_tokenize_caseops_writes_a_sidecar_summing_to_each_original_document(caseops_dir, docs_file):
    manifest = json.loads((caseops_dir / "manifest.json").read_text())
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"
    assert [f["name"] for f in manifest["splits"]["val"]["byte_files"]] == ["fineweb_val_bytes_000000.bin"]
    tokens = tg.load_shard(caseops_dir / "fineweb_val_000000.bin")
    sidecar = tg.load_shard(caseops_dir / "fineweb_val_bytes_000000.bin")
    assert len(sidecar) == len(tokens) and not list(caseops_dir.glob("fineweb_train_bytes_*"))
    texts = [json.loads(line)["text"] for line in docs_file.read_text(encoding="utf-8").splitlines()]
    spans = docs_of(np.asarray(tokens))
    assert len(spans) == VAL_DOCS
    for (a, b), text in zip(spans, texts, strict=False):
        assert sidecar[a] == 0 and int(sidecar[a:b].sum()) == len(text.encode("utf-8"))
    assert manifest["splits"]["val"]["bpb_bytes"] == manifest["splits"]["val"]["bytes"]


def test_caseops_shards_do_not_depend_on_workers_or_batches(caseops_dir, docs_file, tmp_path):
    """Sidecars are computed only while val can still take documents; small batches spread val over
    several, and parallel workers run ahead of the split: the files stay the same."""
    out = tmp_path / "o"
    args = ["--input", str(docs_file), "--output", str(out), "--tokenizer", str(CASEOPS_TOKENIZER)]
    extra = ["--caseops", "--val-docs", str(VAL_DOCS), "--workers", "2", "--batch-docs", "5"]
    assert tokenize_docs.main([*args, *extra]) == 0
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "fineweb_train_000000.bin"):
        assert (out / name).read_bytes() == (caseops_dir / name).read_bytes(), name


def test_tokenize_refuses_a_tokenizer_mode_mismatch(tmp_path, docs_file, capsys):
    base = ["--input", str(docs_file), "--output", str(tmp_path / "o"), "--workers", "1"]
    code, text = run_cli(tokenize_docs, [*base, "--tokenizer", str(CASEOPS_TOKENIZER)], capsys)
    assert code == 1 and "needs --caseops" in text
    code, text = run_cli(tokenize_docs, [*base, "--caseops", "--tokenizer", str(PLAIN_TOKENIZER)], capsys)
    assert code == 1 and "--caseops" in text


def test_verify_proves_every_val_document(caseops_dir, docs_file, capsys):
    code, text = run_cli(verify, [str(caseops_dir), "--input", str(docs_file)], capsys)
    assert code == 0, text
    assert f"CaseOps proof on all {VAL_DOCS} val documents" in text and "val byte sidecar pairs" in text


def test_verify_fails_on_a_wrong_or_missing_sidecar(caseops_dir, docs_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(caseops_dir, broken)
    side = broken / "fineweb_val_bytes_000000.bin"
    values = np.array(tg.load_shard(side))
    values[5] += 1  # one byte too many on one token
    tg.write_shard(side, values)
    code, text = run_cli(verify, [str(broken), "--input", str(docs_file)], capsys)
    assert code == 1 and "sidecar differs from the recomputed original bytes" in text, text
    side.unlink()
    code, text = run_cli(verify, [str(broken)], capsys)
    assert code == 1 and "CaseOps tokenizer but no val byte sidecar" in text, text


# ----------------------------------------------------------------------------- train_gpt.py


def caseops_hp(data: Path, **knobs):
    return make_hp(
        DATA_PATH=data,
        TOKENIZER_PATH=CASEOPS_TOKENIZER,
        VOCAB_SIZE=1024,
        BYTE_CHECK_DOCS=VAL_DOCS,
        **knobs,
    )


def test_validation_divides_by_the_sidecar_not_the_transformed_bytes(caseops_dir, cpu_runtime):
    lines = []
    val = tg.prepare_validation(caseops_hp(caseops_dir), cpu_runtime, lines.append)
    assert "byte_source:sidecar caseops_tokenizer:1" in lines
    manifest = json.loads((caseops_dir / "manifest.json").read_text())
    raw = tg.load_shard(caseops_dir / "fineweb_val_bytes_000000.bin")
    assert int(raw.sum()) == manifest["splits"]["val"]["bytes"]
    assert val.total_bytes == int(raw[1 : len(val.tokens)].sum())  # the targets of the trimmed stream
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))
    table = tg.count_target_bytes(val.tokens, tg.build_byte_luts(sp, 1024))
    assert table > val.total_bytes * 1.02  # the byte table charges each operator 3 bytes


def test_val_bpb_in_every_mode_is_charged_to_original_bytes(caseops_dir, cpu_runtime, torch_single_thread):
    """Flat evaluate() and score_model (flat, sliding, n-gram mixer) divide by the sidecar's bytes of
    exactly the scored targets; the transformed text's bytes would give another, wrong number."""
    knobs = dict(TTT_MODE="none", NGRAM_MIX=True, NGRAM_BUCKETS=64, EVAL_STRIDE=8, VAL_BATCH_TOKENS=4096)
    hp = caseops_hp(caseops_dir, **knobs)
    val = tg.prepare_validation(hp, cpu_runtime, lambda _: None)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    model.eval_forward = model.forward
    loss, bpb = tg.evaluate(model, val, hp, cpu_runtime)
    scored = (len(val.tokens) - 1) // hp.train_seq_len * hp.train_seq_len
    original = int(val.sidecar[1 : scored + 1].sum())
    transformed = tg.count_target_bytes(
        val.tokens[: scored + 1], tg.build_byte_luts(tg.load_tokenizer(CASEOPS_TOKENIZER, 1024), 1024)
    )
    assert transformed != original
    assert bpb == pytest.approx(loss * scored / math.log(2) / original, rel=1e-12)
    out = tg.score_model(model, val, hp, cpu_runtime, lambda _: None)
    assert out["scored_bytes"] == val.total_bytes == int(val.sidecar[1:].sum())
    assert out["val_bpb_flat"] == pytest.approx(bpb, rel=1e-5)
    assert {"val_bpb_sliding", "val_bpb_ngram_mix"} <= out.keys()


def test_caseops_tokenizer_without_sidecar_is_refused(caseops_dir, tmp_path, cpu_runtime):
    bare = tmp_path / "bare"
    shutil.copytree(caseops_dir, bare)
    (bare / "fineweb_val_bytes_000000.bin").unlink()
    with pytest.raises(
        tg.DataError, match=r"no val byte sidecar.*CaseOps tokenizer.*tokenize_docs --caseops"
    ):
        tg.prepare_validation(caseops_hp(bare), cpu_runtime, lambda _: None)


def test_caseops_enabled_requires_a_sidecar(shard_dir, cpu_runtime):
    hp = make_hp(
        DATA_PATH=shard_dir, TOKENIZER_PATH=REPO / "data/sample/fineweb_1024_bpe.model", VOCAB_SIZE=1024
    )
    lines = []
    tg.prepare_validation(hp, cpu_runtime, lines.append)
    assert "byte_source:table caseops_tokenizer:0" in lines  # the default path is untouched
    enabled = make_hp(
        DATA_PATH=shard_dir,
        TOKENIZER_PATH=REPO / "data/sample/fineweb_1024_bpe.model",
        VOCAB_SIZE=1024,
        CASEOPS_ENABLED=True,
    )
    with pytest.raises(tg.DataError, match="CASEOPS_ENABLED=1"):
        tg.prepare_validation(enabled, cpu_runtime, lambda _: None)


def test_sidecar_self_check_catches_transformed_bytes_and_misalignment(caseops_dir, sp):
    tokens = np.array(tg.load_shard(caseops_dir / "fineweb_val_000000.bin"))
    sidecar = np.array(tg.load_shard(caseops_dir / "fineweb_val_bytes_000000.bin"))
    assert tg.check_sidecar(sp, tokens, sidecar, VAL_DOCS) == int(sidecar.sum())
    base, space, boundary = tg.build_byte_luts(sp, 1024)
    transformed = np.concatenate([[0], base[tokens[1:]] + (space[tokens[1:]] & ~boundary[tokens[:-1]])])
    with pytest.raises(tg.DataError, match="case operator"):
        tg.check_sidecar(sp, tokens, transformed.astype(np.uint16), VAL_DOCS)
    with pytest.raises(tg.DataError):
        tg.check_sidecar(sp, tokens, np.roll(sidecar, 1), VAL_DOCS)


def test_sidecar_must_pair_with_the_val_shards(caseops_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(caseops_dir, odd)
    tg.write_shard(odd / "fineweb_val_bytes_000000.bin", np.zeros(7, dtype=np.uint16))
    with pytest.raises(tg.DataError, match="one byte count per token"):
        tg.load_byte_sidecar(str(odd), 10)


def test_smoke_caseops_preset_is_smoke_on_caseops_data():
    smoke, caseops_preset = tg.PRESETS["smoke"], tg.PRESETS["smoke_caseops"]
    assert {k: v for k, v in caseops_preset.items() if smoke.get(k) != v} == {
        "DATA_PATH": "./data/datasets/sample_sp1024_caseops",
        "TOKENIZER_PATH": "./data/sample/sample_1024_bpe_caseops.model",
        "CASEOPS_ENABLED": "1",
    }
    assert list(tg.PRESETS)[-1] == "smoke_caseops"
    assert tg.Hyperparameters({"RUN_PRESET": "smoke_caseops"}).caseops_enabled


# ----------------------------------------------------------------------------- download


def caseops_hub(root: Path, built: Path, with_sidecar: bool = True) -> Path:
    """A folder laid out like romeerp/parameter-golf-caseops-v1 (the records' cached_challenge_fineweb)."""
    name = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    folder = root / "datasets" / "datasets" / name
    folder.mkdir(parents=True)
    for shard in built.glob("*.bin"):
        shutil.copy(shard, folder / shard.name)
    (root / "datasets" / "tokenizers").mkdir()
    model = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    shutil.copy(CASEOPS_TOKENIZER, root / "datasets" / model)
    splits = json.loads((built / "manifest.json").read_text())["splits"]
    stats = {f"files_{s}": len(splits[s]["files"]) for s in splits} | {
        f"tokens_{s}": splits[s]["tokens"] for s in splits
    }
    entry = {"name": name, "tokenizer_name": "caseops", "vocab_size": 1024, "stats": stats}
    if with_sidecar:
        entry["val_bytes_glob"] = f"datasets/{name}/fineweb_val_bytes_*.bin"
    manifest = {"datasets": [entry], "tokenizers": [{"name": "caseops", "model_path": model}]}
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_download_caseops_variant_brings_the_sidecar(caseops_dir, tmp_path, capsys):
    hub_folder = caseops_hub(tmp_path / "hub", caseops_dir)
    local = tmp_path / "data"
    argv = ["--variant", "sp8192_caseops", "--source", str(tmp_path / "hub"), "--local-dir", str(local)]
    code, text = run_cli(download, [*argv, "--train-shards", "1", "--no-progress"], capsys)
    assert code == 0, text
    got = local / "datasets" / hub_folder.name
    side = "fineweb_val_bytes_000000.bin"
    assert (got / side).read_bytes() == (hub_folder / side).read_bytes()
    code, text = run_cli(verify, [str(got)], capsys)  # tokenizer found through hub_manifest.json
    assert code == 0 and "val byte sidecar pairs" in text, text
    code, text = run_cli(download, [*argv, "--train-shards", "1", "--no-progress"], capsys)
    assert code == 0 and "0 downloaded" in text


def test_download_knows_the_caseops_hub_repo_by_both_names():
    for variant in ("sp8192_caseops", "sp8192_lossless_caps_caseops_v1_reserved"):
        args = download.build_parser().parse_args(["--variant", variant])
        assert download.make_source(args).repo_id == "romeerp/parameter-golf-caseops-v1"
        assert download.dataset_name(variant) == "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def test_download_caseops_refuses_a_manifest_without_sidecar(caseops_dir, tmp_path, capsys):
    caseops_hub(tmp_path / "hub", caseops_dir, with_sidecar=False)
    argv = [
        "--variant",
        "sp8192_caseops",
        "--source",
        str(tmp_path / "hub"),
        "--local-dir",
        str(tmp_path / "d"),
    ]
    code, text = run_cli(download, [*argv, "--train-shards", "0", "--no-progress"], capsys)
    assert code == 1 and "no val byte sidecar" in text, text
