"""Tests for the data/ tools: downloader (fake hub), tokenize_docs, train_tokenizer and verify.

Everything is generated here from tiny documents plus the bundled tokenizer and sample; nothing
needs the network or /work/shared.
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bare `pytest` (not `python -m pytest`) leaves the root off sys.path
    sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402
from data import download, tokenize_docs, train_tokenizer, verify  # noqa: E402
from data._common import run_main  # noqa: E402

TOKENIZER = REPO / "data/sample/fineweb_1024_bpe.model"
SAMPLE = REPO / "data/sample/sample_wiki.jsonl.xz"
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been would its more time so if out no other"
).split()


# ----------------------------------------------------------------------------- helpers


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct small English-like documents (ASCII, one accented word so <unk>/bytes get exercised)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 60))]
        docs.append(f"Document {i}\n\n" + " ".join(words).capitalize() + f". Number {rng.randint(0, 99999)}.")
    docs[1] += " Café déjà vu."
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text))
    elif path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(text))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        path.write_bytes(text)
    return path


def tokenize(inputs, out: Path, *extra: str) -> dict:
    """Run tokenize_docs in-process (one worker unless asked) and return its manifest."""
    args = ["--input", *map(str, inputs), "--output", str(out), "--tokenizer", str(TOKENIZER)]
    workers = [] if "--workers" in extra else ["--workers", "1"]
    assert tokenize_docs.main([*args, *workers, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    """A tool's exit status and its stdout+stderr, as the command line would give them."""
    code = run_main(module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("module", [download, tokenize_docs, train_tokenizer, verify])
def test_every_tool_has_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m data." in capsys.readouterr().out


def test_module_entry_point_runs_from_repo_root():
    result = subprocess.run(
        [sys.executable, "-m", "data.verify", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "usage: python -m data.verify" in result.stdout


# ----------------------------------------------------------------------------- tokenize_docs


def test_tokenize_counts_tokens_bytes_and_layout(tmp_path, sp):
    docs = make_docs(30)
    manifest = tokenize([write_jsonl(tmp_path / "docs.jsonl", docs)], tmp_path / "out", "--val-docs", "8")
    val, train = docs[:8], docs[8:]
    for split, part in (("val", val), ("train", train)):
        stats = manifest["splits"][split]
        assert stats["documents"] == len(part)
        assert stats["bytes"] == sum(len(d.encode("utf-8")) for d in part)
        assert stats["tokens"] == sum(len(sp.encode(d)) + 1 for d in part)
        assert stats["bytes_per_token"] == round(stats["bytes"] / stats["tokens"], 4)
        stream = np.concatenate([[train_gpt.BOS_ID, *sp.encode(d)] for d in part])
        shard = train_gpt.load_shard(tmp_path / "out" / f"fineweb_{split}_000000.bin", 1024)
        np.testing.assert_array_equal(shard, stream)  # BOS before every document, no EOS
    assert manifest["tokenizer"]["sha256"] == train_gpt_sha(TOKENIZER)
    assert len(manifest["fingerprint"]) == 64 and manifest["append_eos"] is False


def train_gpt_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compressed_inputs_and_file_splits_give_identical_shards(tmp_path):
    docs = make_docs(24)
    plain = tokenize([write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "plain", "--val-docs", "5")
    for suffix in (".jsonl.gz", ".jsonl.xz", ".jsonl.zst"):
        m = tokenize([write_jsonl(tmp_path / f"d{suffix}", docs)], tmp_path / suffix, "--val-docs", "5")
        assert m["fingerprint"] == plain["fingerprint"], suffix
    parts = [
        write_jsonl(tmp_path / "a.jsonl.gz", docs[:10]),
        write_jsonl(tmp_path / "b.jsonl.zst", docs[10:]),
    ]
    assert tokenize(parts, tmp_path / "two", "--val-docs", "5")["fingerprint"] == plain["fingerprint"]


def test_output_does_not_depend_on_workers(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(80))
    common = ("--val-docs", "10", "--shard-tokens", "1500", "--batch-docs", "7")
    one = tokenize([src], tmp_path / "w1", *common, "--workers", "1")
    two = tokenize([src], tmp_path / "w2", *common, "--workers", "2")
    assert len(one["splits"]["train"]["files"]) > 2  # documents run across shard boundaries
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")
    assert one["fingerprint"] == two["fingerprint"]


def test_train_val_overlap_is_an_error_or_dropped(tmp_path, capsys):
    docs = make_docs(20)
    docs[15] = "  " + docs[3].upper().replace(" ", "   ") + "\n"  # same text up to case and spacing
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    base = ["--input", str(src), "--tokenizer", str(TOKENIZER), "--workers", "1", "--val-docs", "5"]
    code, out = run_cli(tokenize_docs, [*base, "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and f"{src}:16 duplicates val document {src}:4" in out
    assert not list((tmp_path / "o").glob("*.bin")), "a failed run must not leave shards"
    manifest = tokenize([src], tmp_path / "o2", "--val-docs", "5", "--drop-overlap")
    assert manifest["dropped_overlap"] == 1 and manifest["splits"]["train"]["documents"] == 14


def test_clear_errors_for_bad_inputs(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(10))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "a"}\n\n{"text": oops}\n'))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    out = str(tmp_path / "o")
    cases = [
        (["--input", str(bad), "--output", out], f"{bad}:3: bad JSON"),
        (
            ["--input", str(nofield), "--output", out],
            f"{nofield}:1: expected an object with a string field 'text'",
        ),
        (["--input", str(tmp_path / "missing.jsonl"), "--output", out], "input file not found"),
        (["--input", str(good), "--output", out, "--vocab-size", "4096"], "VOCAB_SIZE=4096"),
        (
            ["--input", str(good), "--output", out, "--tokenizer", str(tmp_path / "no.model")],
            "tokenizer not found",
        ),
        (["--input", str(good), "--output", out, "--val-docs", "10"], "both splits need documents"),
    ]
    for argv, message in cases:
        code, text = run_cli(tokenize_docs, [*argv, "--workers", "1"], capsys)
        assert code == 1 and message in text, (argv, text)


def test_refuses_to_overwrite_foreign_shards(tmp_path, capsys):
    out = tmp_path / "official"
    out.mkdir()
    train_gpt.write_shard(out / "fineweb_val_000000.bin", np.array([1, 5, 6]))
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(10))
    code, text = run_cli(
        tokenize_docs, ["--input", str(src), "--output", str(out), "--val-docs", "2"], capsys
    )
    assert code == 1 and "not written by data.tokenize_docs" in text
    for broken in ("{not json", "[1, 2]"):  # used to end in a JSONDecodeError/AttributeError traceback
        (out / "manifest.json").write_text(broken)
        code, text = run_cli(
            tokenize_docs, ["--input", str(src), "--output", str(out), "--val-docs", "2"], capsys
        )
        assert code == 1 and "not written by data.tokenize_docs" in text
    assert tokenize([src], out, "--val-docs", "2", "--force")["splits"]["val"]["documents"] == 2


def test_quick_start_sample_defaults(tmp_path, capsys):
    """The README command, defaults included (all cores), on the bundled sample."""
    out = tmp_path / "sample_sp1024"
    start = time.perf_counter()
    assert tokenize_docs.main(["--input", str(SAMPLE), "--output", str(out)]) == 0
    assert time.perf_counter() - start < 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["documents"] == 100
    assert 80_000 <= manifest["splits"]["val"]["tokens"] <= 100_000
    assert manifest["splits"]["val"]["documents"] + manifest["splits"]["train"]["documents"] == 1723
    code, text = run_cli(verify, [str(out)], capsys)
    assert code == 0 and "verify: OK" in text and "train/val disjoint" in text


# ----------------------------------------------------------------------------- train_tokenizer


def test_train_tiny_tokenizer_with_byte_fallback(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl.xz", make_docs(60))
    prefix = tmp_path / "tok" / "tiny"
    argv = ["--input", str(src), "--vocab-size", "320", "--output", str(prefix), "--max-docs", "50"]
    code, text = run_cli(train_tokenizer, argv, capsys)
    assert code == 0 and "docs:50" in text, text
    tok = train_gpt.load_tokenizer(prefix.with_suffix(".model"), 320)
    assert prefix.with_suffix(".vocab").read_text().count("\n") == 320
    assert [tok.pad_id(), tok.bos_id(), tok.eos_id(), tok.unk_id()] == [0, 1, 2, 3]
    assert sum(tok.is_byte(i) for i in range(320)) == 256
    ids = tok.encode("Number 123 naïve 😀")
    assert tok.unk_id() not in ids and tok.decode(ids) == "Number 123 naïve 😀"
    assert [tok.id_to_piece(i) for i in tok.encode("123")][-3:] == ["1", "2", "3"]  # split_digits
    assert tok.piece_to_id("\u2581") != tok.unk_id()
    luts = train_gpt.build_byte_luts(tok, 320)
    assert train_gpt.check_byte_table(tok, make_docs(5, seed=1) + ["naïve 😀 x"], luts) > 0


def test_train_tokenizer_output_prefix_with_dots_or_model_suffix(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(40))
    out = tmp_path / "tok" / "tiny-v1.5.model"  # used to crash: SentencePiece wrote tiny-v1.5.model.model
    argv = ["--input", str(src), "--vocab-size", "300", "--output", str(out)]
    code, text = run_cli(train_tokenizer, argv, capsys)
    assert code == 0, text
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-v1.5.model", "tiny-v1.5.vocab"]
    train_gpt.load_tokenizer(out, 300)


def test_train_tokenizer_skip_docs_counts_documents_like_the_val_split(tmp_path):
    docs = ["", "   ", "val one", "\n", "val two", "train one", "train two"]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    args = train_tokenizer.build_parser().parse_args(["--input", str(src), "--skip-docs", "2"])
    # tokenize_docs --val-docs 2 puts "val one" and "val two" in val (blank documents are skipped),
    # so --skip-docs 2 must leave out exactly those; counting blanks fed both to the trainer.
    assert list(train_tokenizer.DocFeed(args)) == ["train one", "train two"]


def test_train_tokenizer_reports_bad_line(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "hello world"}\n[1, 2]\n')
    code, text = run_cli(train_tokenizer, ["--input", str(src), "--output", str(tmp_path / "t")], capsys)
    assert code == 1 and f"{src}:2" in text and not (tmp_path / "t.model").exists()


# ----------------------------------------------------------------------------- verify


@pytest.fixture()
def shards(tmp_path):
    out = tmp_path / "shards"
    tokenize(
        [write_jsonl(tmp_path / "d.jsonl", make_docs(40))], out, "--val-docs", "8", "--shard-tokens", "800"
    )
    return out


def test_verify_passes_on_good_data(shards, capsys):
    code, text = run_cli(verify, [str(shards), "--checksums"], capsys)
    assert code == 0, text
    assert "BPB byte table exact" in text and "tokenizer matches" in text


def test_verify_fails_on_corrupted_shard(shards, capsys):
    victim = shards / "fineweb_train_000001.bin"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated
    code, text = run_cli(verify, [str(shards)], capsys)
    assert code == 1 and "problem(s)" in text and "fineweb_train_000001.bin" in text and "truncated" in text


def test_verify_fails_on_manifest_mismatch(shards, capsys):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"]["documents"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, text = run_cli(verify, [str(shards)], capsys)
    assert code == 1 and "val: 8 documents (BOS tokens), manifest.json says 9" in text


def test_verify_warns_on_a_manifest_it_did_not_write(shards, tmp_path, capsys):
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(TOKENIZER.read_bytes())
    (shards / "manifest.json").write_text(json.dumps({"made_by": "another tool"}))
    code, text = run_cli(verify, [str(shards), "--tokenizer", str(tokenizer)], capsys)
    assert code == 0, text
    assert "manifest.json is not one data.tokenize_docs wrote" in text


def test_verify_fails_on_bad_ids_and_missing_shard(shards, capsys):
    train_gpt.write_shard(shards / "fineweb_train_000000.bin", np.array([1, 5, 4000]))
    (shards / "fineweb_train_000001.bin").unlink()  # a gap in the numbering
    code, text = run_cli(verify, [str(shards)], capsys)
    assert code == 1 and "4000 >= VOCAB_SIZE=1024" in text and "a shard is missing" in text


def test_verify_fails_on_train_val_overlap(tmp_path, sp, capsys):
    docs = [[train_gpt.BOS_ID, *sp.encode(d)] for d in make_docs(12)]
    out = tmp_path / "raw"
    out.mkdir()
    train_gpt.write_shard(out / "fineweb_val_000000.bin", np.concatenate(docs[:4]))
    train_stream = np.concatenate(docs[4:] + [docs[2]])  # val document 2 again, at the end of train
    train_gpt.write_shard(out / "fineweb_train_000000.bin", train_stream[:100])  # and across a shard cut
    train_gpt.write_shard(out / "fineweb_train_000001.bin", train_stream[100:])
    code, text = run_cli(verify, [str(out), "--tokenizer", str(TOKENIZER)], capsys)
    assert code == 1 and "1 train documents repeat a val document" in text and "val document 2" in text


def test_verify_detects_wrong_tokenizer(shards, tmp_path, capsys):
    """Same vocabulary size, different merges: ids are in range, but they no longer round-trip."""
    prefix = tmp_path / "other"
    argv = ["--input", str(SAMPLE), "--max-docs", "200", "--vocab-size", "1024", "--output", str(prefix)]
    assert train_tokenizer.main(argv) == 0
    code, text = run_cli(verify, [str(shards), "--tokenizer", str(prefix.with_suffix(".model"))], capsys)
    assert code == 1 and "another tokenizer" in text, text


# ----------------------------------------------------------------------------- download (fake hub)

VARIANT_DIR = "fineweb10B_sp1024"


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """A folder laid out like the published hub repo: datasets/{manifest.json,datasets/,tokenizers/}."""
    base = tmp_path_factory.mktemp("hub")
    built = base / "built"
    src = write_jsonl(base / "d.jsonl", make_docs(60))
    manifest = tokenize([src], built, "--val-docs", "10", "--shard-tokens", "900")
    root = base / "repo" / "datasets"
    (root / "datasets" / VARIANT_DIR).mkdir(parents=True)
    for shard in built.glob("*.bin"):
        shutil.copy(shard, root / "datasets" / VARIANT_DIR / shard.name)
    (root / "tokenizers").mkdir()
    shutil.copy(TOKENIZER, root / "tokenizers" / TOKENIZER.name)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_text(vocab_lines)
    splits = manifest["splits"]
    stats = {
        f"{k}_{s}": len(splits[s]["files"]) if k == "files" else splits[s]["tokens"]
        for s in splits
        for k in ("files", "tokens")
    }
    hub_manifest = {
        "version": "10B",
        "shard_size": 900,
        "datasets": [
            {"name": VARIANT_DIR, "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024, "stats": stats}
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }
    (root / "manifest.json").write_text(json.dumps(hub_manifest))
    assert stats["files_train"] >= 3 and stats["files_val"] >= 1
    return base / "repo"


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download (local_dir mode), serving files from hub_root."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, bool]] = []
        self.interrupt: set[str] = set()  # remote names that fail halfway
        self.corrupt: dict[str, str] = {}  # remote name -> "always" or "cached" (stale copy until forced)

    def __call__(
        self, repo_id, filename, *, subfolder=None, repo_type=None, local_dir=None, force_download=False, **kw
    ):
        assert repo_id == download.HUB_REPOS["sp1024"] and repo_type == "dataset"
        remote = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append((remote, force_download))
        data = (self.root / remote).read_bytes()
        dest = Path(local_dir) / remote
        dest.parent.mkdir(parents=True, exist_ok=True)
        if filename in self.interrupt:
            dest.with_name(filename + ".incomplete").write_bytes(data[: len(data) // 2])
            raise ConnectionError("connection reset by peer")
        mode = self.corrupt.get(filename)
        if mode == "always" or (mode == "cached" and not force_download):
            data = b"\0" * 16 + data[16:]  # bad magic
        dest.write_bytes(data)
        return str(dest)

    def downloads(self) -> list[str]:
        return [Path(r).name for r, _ in self.calls if not r.endswith("manifest.json")]


@pytest.fixture()
def hub(hub_root, monkeypatch):
    fake = FakeHub(hub_root)
    monkeypatch.setattr(download, "hf_hub_download", fake)

    def file_info(repo_id, remotes, revision):
        return {r: ((hub_root / r).stat().st_size, None) for r in remotes}

    monkeypatch.setattr(download, "hub_file_info", file_info)
    return fake


def fetch(local: Path, capsys, *extra: str) -> tuple[int, str]:
    return run_cli(download, ["--local-dir", str(local), "--no-progress", "--jobs", "2", *extra], capsys)


def hub_files(hub_root: Path) -> dict[str, bytes]:
    return folder_bytes(hub_root / "datasets" / "datasets" / VARIANT_DIR)


def test_download_fresh_then_skip_when_verified(hub, hub_root, tmp_path, capsys):
    local = tmp_path / "data"
    code, text = fetch(local, capsys, "--train-shards", "3")
    assert code == 0, text
    folder = local / "datasets" / VARIANT_DIR
    got = {k: v for k, v in folder_bytes(folder).items() if k.endswith(".bin")}
    wanted = {"fineweb_val_000000.bin", *(f"fineweb_train_{i:06d}.bin" for i in range(3))}
    assert got == {k: v for k, v in hub_files(hub_root).items() if k in wanted}
    assert (local / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == TOKENIZER.read_bytes()
    assert (folder / "hub_manifest.json").is_file() and not (local / "datasets" / ".staging").exists()
    hub.calls.clear()
    code, text = fetch(local, capsys, "--train-shards", "3")
    assert code == 0 and hub.downloads() == [] and "0 downloaded" in text
    code, text = run_cli(verify, [str(folder)], capsys)  # tokenizer found through hub_manifest.json
    assert code == 0 and "hub_manifest.json: val complete" in text, text
    # A valid shard of the wrong length: verify flags it against the manifest, download redoes it.
    train_gpt.write_shard(folder / "fineweb_train_000002.bin", np.array([1, 5, 6, 7]))
    code, text = run_cli(verify, [str(folder)], capsys)
    assert code == 1 and "fineweb_train_000002.bin: 4 tokens, the hub manifest implies 900" in text, text
    code, text = fetch(local, capsys, "--train-shards", "3")
    assert code == 0 and "1 redone" in text and run_cli(verify, [str(folder)], capsys)[0] == 0


def test_verify_run_inside_the_dataset_folder(hub, tmp_path, capsys, monkeypatch):
    local = tmp_path / "data"
    assert fetch(local, capsys, "--train-shards", "1")[0] == 0
    monkeypatch.chdir(local / "datasets" / VARIANT_DIR)
    # Path(".").name is "": the dataset used to be missing from hub_manifest.json, so no tokenizer.
    code, text = run_cli(verify, ["."], capsys)
    assert code == 0 and "hub_manifest.json: val complete" in text, text


def test_download_train_shards_option(hub, hub_root, tmp_path, capsys):
    local = tmp_path / "data"
    assert fetch(local, capsys, "--train-shards", "1")[0] == 0
    names = sorted(p.name for p in (local / "datasets" / VARIANT_DIR).glob("fineweb_train_*.bin"))
    assert names == ["fineweb_train_000000.bin"]
    hub.calls.clear()
    assert fetch(local, capsys, "--train-shards", "2")[0] == 0
    assert hub.downloads() == ["fineweb_train_000001.bin"]
    n_train = len(list((hub_root / "datasets" / "datasets" / VARIANT_DIR).glob("fineweb_train_*")))
    code, text = fetch(local, capsys, "--train-shards", str(n_train + 1))
    assert code == 1 and f"has {n_train} train shards" in text


def test_download_interrupted_then_resumed(hub, tmp_path, capsys):
    local = tmp_path / "data"
    hub.interrupt = {"fineweb_train_000001.bin"}
    code, text = fetch(local, capsys, "--train-shards", "2")
    assert code == 1 and "fineweb_train_000001.bin" in text and "run again" in text
    folder = local / "datasets" / VARIANT_DIR
    assert not (folder / "fineweb_train_000001.bin").exists(), "no partial file under the final name"
    # A truncated copy under the final name (e.g. from an interrupted manual copy) is redone too.
    good = folder / "fineweb_val_000000.bin"
    good.write_bytes(good.read_bytes()[:2000])
    hub.interrupt, hub.calls = set(), []
    code, text = fetch(local, capsys, "--train-shards", "2")
    assert code == 0, text
    assert sorted(hub.downloads()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert "redone" in text and "1 redone" in text
    assert run_cli(verify, [str(folder)], capsys)[0] == 0


def test_download_corrupted_files(hub, hub_root, tmp_path, capsys):
    local = tmp_path / "data"
    assert fetch(local, capsys, "--train-shards", "2")[0] == 0
    folder = local / "datasets" / VARIANT_DIR
    victim = folder / "fineweb_train_000000.bin"
    victim.write_bytes(b"\x07" * 4 + victim.read_bytes()[4:])  # bad magic, right size
    hub.corrupt = {"fineweb_train_000001.bin": "cached"}  # stale staged copy: fixed by a forced fetch
    (folder / "fineweb_train_000001.bin").unlink()
    hub.calls.clear()
    code, text = fetch(local, capsys, "--train-shards", "2")
    assert code == 0, text
    assert ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin", True) in hub.calls
    assert folder_bytes(folder)["fineweb_train_000000.bin"] == hub_files(hub_root)["fineweb_train_000000.bin"]
    # A file that is bad on the hub itself: clear error, nothing installed.
    hub.corrupt = {"fineweb_train_000002.bin": "always"}
    code, text = fetch(local, capsys, "--train-shards", "3")
    assert code == 1 and "fineweb_train_000002.bin" in text and "bad magic" in text
    assert not (folder / "fineweb_train_000002.bin").exists()


def test_download_without_hub_sizes_and_from_local_mirror(hub_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(hub_root))
    monkeypatch.setattr(download, "hub_file_info", lambda *a: {})  # hub metadata unavailable
    assert fetch(tmp_path / "a", capsys, "--train-shards", "1")[0] == 0
    local = tmp_path / "b"
    code, text = fetch(local, capsys, "--train-shards", "2", "--source", str(hub_root))
    assert code == 0, text
    folder = local / "datasets" / VARIANT_DIR
    assert run_cli(verify, [str(folder)], capsys)[0] == 0
    code, text = fetch(local, capsys, "--variant", "sp4096", "--source", str(hub_root))
    assert code == 1 and "fineweb10B_sp4096 is not in the manifest" in text
