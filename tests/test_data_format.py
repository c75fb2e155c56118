"""Shard format, shard discovery, tokenizer loading, the BPB byte table and the val_bpb arithmetic."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLED_TOKENIZER, DOCS, token_stream

import train_gpt
from train_gpt import BOS_ID, DataError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# ----------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 5, 1023, 65535, 7], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    train_gpt.write_shard(path, tokens)
    assert train_gpt.read_shard_header(path) == len(tokens)
    loaded = train_gpt.load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers


def test_shard_layout_is_the_challenge_format(tmp_path):
    path = tmp_path / "s.bin"
    train_gpt.write_shard(path, np.arange(10))
    raw = path.read_bytes()
    assert len(raw) == 256 * 4 + 2 * 10
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 10)
    assert raw[12:1024] == bytes(1012)
    assert struct.unpack("<10H", raw[1024:]) == tuple(range(10))


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "s.bin"
    train_gpt.write_shard(path, np.array([], dtype=np.int64))
    assert train_gpt.read_shard_header(path) == 0
    assert len(train_gpt.load_shard(path, vocab_size=1024)) == 0


@pytest.mark.parametrize("bad", [[65536], [-1]])
def test_write_shard_refuses_ids_outside_uint16(tmp_path, bad):
    with pytest.raises(DataError, match="uint16"):
        train_gpt.write_shard(tmp_path / "s.bin", np.array([1, *bad]))
    assert not (tmp_path / "s.bin").exists()


def _patch_word(path, index: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[4 * index : 4 * index + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    train_gpt.write_shard(path, np.arange(100) % 50)
    return path


def _assert_data_error(path, fragment: str, func=train_gpt.read_shard_header, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        func(path, **kwargs)
    message = str(err.value)
    assert str(path) in message and fragment in message, message
    return message


def test_bad_magic_names_the_file(shard):
    _patch_word(shard, 0, 12345)
    _assert_data_error(shard, "bad magic 12345")
    _assert_data_error(shard, "magic", func=train_gpt.load_shard)


def test_bad_version_names_the_file(shard):
    _patch_word(shard, 1, 7)
    _assert_data_error(shard, "version 7")


def test_truncated_shard_names_the_file(shard):
    shard.write_bytes(shard.read_bytes()[:-3])
    _assert_data_error(shard, "truncated")


def test_file_shorter_than_header_names_the_file(shard):
    shard.write_bytes(shard.read_bytes()[:100])
    _assert_data_error(shard, "header")


def test_size_mismatch_with_extra_bytes_names_the_file(shard):
    shard.write_bytes(shard.read_bytes() + b"\0\0")
    _assert_data_error(shard, "header says 100 tokens")


def test_count_word_disagreeing_with_size_names_the_file(shard):
    _patch_word(shard, 2, 101)
    _assert_data_error(shard, "header says 101 tokens")


def test_missing_shard_names_the_file(tmp_path):
    _assert_data_error(tmp_path / "nope.bin", "not found")


def test_token_id_at_vocab_size_names_the_file(shard):
    assert int(train_gpt.load_shard(shard, vocab_size=50).max()) == 49  # max id 49 < 50 is fine
    message = _assert_data_error(shard, "token id 49", func=train_gpt.load_shard, vocab_size=49)
    assert "VOCAB_SIZE=49" in message


CPU_RANK0 = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")


def test_train_shards_are_checked_against_the_vocabulary_once_at_startup(tmp_path):
    files = [tmp_path / f"fineweb_train_00000{i}.bin" for i in range(3)]
    for i, path in enumerate(files):
        train_gpt.write_shard(path, np.arange(10) + 10 * i)  # ids 0..29; the third shard holds 20..29
    train_gpt.check_token_ids(files, 30, CPU_RANK0)
    with pytest.raises(DataError) as err:
        train_gpt.check_token_ids(files, 25, CPU_RANK0)
    assert str(files[2]) in str(err.value) and "token id 29 >= VOCAB_SIZE=25" in str(err.value)


def test_the_loader_never_scans_a_shard_for_its_largest_id(tmp_path, monkeypatch):
    """Shard switches happen inside the timed loop; a ~100M-token max() there costs steps."""
    files = [tmp_path / f"fineweb_train_00000{i}.bin" for i in range(2)]
    for i, path in enumerate(files):
        train_gpt.write_shard(path, np.arange(10) + 10 * i)

    def no_scan(*args, **kwargs):
        raise AssertionError("the loader scanned a shard for its largest id")

    monkeypatch.setattr(np.memmap, "max", no_scan)
    stream = train_gpt.TokenStream(files)
    np.testing.assert_array_equal(stream.take(15), np.arange(15))  # crosses into the second shard
    assert stream.state_dict() == {"file_idx": 1, "pos": 5}


def test_find_shards_sorted_by_split_without_byte_sidecars(tmp_path):
    for name in ("fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        train_gpt.write_shard(tmp_path / name, np.arange(4))
    (tmp_path / "fineweb_val_bytes_000000.bin").write_bytes(b"sidecar")
    (tmp_path / "other.bin").write_bytes(b"x")
    train = train_gpt.find_shards(str(tmp_path), "train")
    assert [p.name for p in train] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [p.name for p in train_gpt.find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]


def test_find_shards_on_empty_dir_names_path_and_commands(tmp_path):
    with pytest.raises(DataError) as err:
        train_gpt.find_shards(str(tmp_path), "val")
    message = str(err.value)
    assert f"{tmp_path}/fineweb_val_*.bin" in message
    assert "python3 -m data.download" in message and "python3 -m data.tokenize_docs" in message


def test_load_validation_trims_to_whole_sequences_plus_one(tmp_path, tiny_hp):
    train_gpt.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(40) % 64)
    train_gpt.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(40, 60) % 64)
    hp = tiny_hp(DATA_PATH=tmp_path)  # TRAIN_SEQ_LEN=16: 60 tokens -> 3 sequences + 1 target
    tokens = train_gpt.load_validation(hp)
    np.testing.assert_array_equal(tokens, np.arange(49) % 64)


def test_load_validation_too_short_is_a_data_error(tmp_path, tiny_hp):
    train_gpt.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(16))
    with pytest.raises(DataError, match="less than TRAIN_SEQ_LEN"):
        train_gpt.load_validation(tiny_hp(DATA_PATH=tmp_path))


# ----------------------------------------------------------------------------- tokenizer


def test_load_tokenizer_bundled():
    sp = train_gpt.load_tokenizer(BUNDLED_TOKENIZER, 1024)
    assert sp.vocab_size() == 1024 and sp.bos_id() == BOS_ID


def test_load_tokenizer_wrong_vocab_size():
    with pytest.raises(DataError) as err:
        train_gpt.load_tokenizer(BUNDLED_TOKENIZER, 8192)
    assert str(BUNDLED_TOKENIZER) in str(err.value) and "VOCAB_SIZE=8192" in str(err.value)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError) as err:
        train_gpt.load_tokenizer(tmp_path / "missing.model", 1024)
    assert str(tmp_path / "missing.model") in str(err.value) and "TOKENIZER_PATH" in str(err.value)


# ----------------------------------------------------------------------------- BPB byte table


def reference_bytes(sp, token_ids) -> int:
    """UTF-8 bytes of tokens[1:] written from the rule, not from build_byte_luts."""
    total = 0
    for prev, tok in zip(token_ids[:-1], token_ids[1:], strict=True):
        if sp.is_control(tok) or sp.is_unknown(tok) or sp.is_unused(tok):
            continue
        if sp.is_byte(tok):
            total += 1
            continue
        piece = sp.id_to_piece(tok)
        if piece.startswith("\u2581"):
            piece = piece[1:]
            total += not (sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev))
        total += len(piece.encode("utf-8"))
    return total


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, raw bytes of the whole field) of a protobuf message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(buf, i)
            i += size
        elif wire == 5:
            i += 4
        yield key >> 3, wire, buf[start:i]


def mark_unused(model: bytes, ids: set[int]) -> bytes:
    """A SentencePiece model with pieces `ids` retyped UNUSED (ModelProto.pieces = field 1,
    SentencePiece.type = field 3, UNUSED = 5), edited without the protobuf package."""
    out, index = bytearray(), 0
    for number, wire, raw in _fields(model):
        if number == 1 and wire == 2:
            if index in ids:
                _, body_at = _varint(raw, 0)
                size, body_at = _varint(raw, body_at)
                body = b"".join(r for n, _, r in _fields(raw[body_at:]) if n != 3) + b"\x18\x05"
                raw = b"\x0a" + _encode_varint(len(body)) + body
            index += 1
        out += raw
    return bytes(out)


def test_unused_pieces_count_zero_bytes_and_act_as_boundaries(bundled_sp, tmp_path):
    the, end = bundled_sp.piece_to_id("\u2581the"), bundled_sp.piece_to_id("\u2581end")
    path = tmp_path / "unused.model"
    path.write_bytes(mark_unused(BUNDLED_TOKENIZER.read_bytes(), {the}))
    sp = train_gpt.load_tokenizer(path, 1024)
    assert sp.is_unused(the) and not sp.is_unused(end)
    base, space, boundary = train_gpt.build_byte_luts(sp, 1024)
    assert (base[the], space[the], boundary[the]) == (0, False, True)
    assert (base[end], space[end], boundary[end]) == (3, True, False)
    tokens = np.array([BOS_ID, end, the, end, end])
    # end(3, after BOS: no space) + the(0) + end(3, after an unused piece: no space) + end(3 + 1)
    assert train_gpt.count_target_bytes(tokens, (base, space, boundary)) == 10 == reference_bytes(sp, tokens)


def test_byte_luts_of_bundled_tokenizer(bundled_sp):
    base, space, boundary = train_gpt.build_byte_luts(bundled_sp, 1024)
    assert base.shape == space.shape == boundary.shape == (1024,)
    for i in (0, 1, 2, 3):  # <pad> <s> </s> <unk>
        assert (base[i], space[i], boundary[i]) == (0, False, True)
    assert bundled_sp.id_to_piece(4) == "\u2581t" and (base[4], space[4], boundary[4]) == (1, True, False)
    for i in range(4, 1024):
        piece = bundled_sp.id_to_piece(i)
        assert space[i] == piece.startswith("\u2581")
        assert base[i] == len(piece.removeprefix("\u2581").encode("utf-8"))
    assert not boundary[4:].any()


def test_byte_luts_beyond_tokenizer_vocab_are_boundaries(bundled_sp):
    base, space, boundary = train_gpt.build_byte_luts(bundled_sp, 1030)
    assert boundary[1024:].all() and not space[1024:].any() and not base[1024:].any()


def test_byte_luts_of_byte_fallback_pieces(byte_fallback_sp):
    _, sp = byte_fallback_sp
    base, space, boundary = train_gpt.build_byte_luts(sp, sp.vocab_size())
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert sp.id_to_piece(byte_ids[0x20]) == "<0x20>"  # a space byte is still one byte, no extra space
    assert (base[byte_ids] == 1).all() and not space[byte_ids].any() and not boundary[byte_ids].any()
    assert (base[:4] == 0).all() and boundary[:4].all()


def test_count_target_bytes_charges_leading_space_except_after_bos(bundled_sp):
    luts = train_gpt.build_byte_luts(bundled_sp, 1024)
    the = bundled_sp.piece_to_id("\u2581the")
    dot = bundled_sp.piece_to_id(".")
    assert the != bundled_sp.unk_id() and dot != bundled_sp.unk_id()
    assert train_gpt.count_target_bytes(np.array([BOS_ID, the]), luts) == 3  # "the"
    assert train_gpt.count_target_bytes(np.array([dot, the]), luts) == 4  # " the"
    assert train_gpt.count_target_bytes(np.array([BOS_ID, the, the, dot]), luts) == 3 + 4 + 1
    assert train_gpt.count_target_bytes(np.array([dot, BOS_ID]), luts) == 0  # BOS as a target: 0 bytes
    assert train_gpt.count_target_bytes(np.array([the]), luts) == 0  # no targets


def test_count_target_bytes_of_byte_pieces(byte_fallback_sp):
    _, sp = byte_fallback_sp
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    ids = sp.encode("日本語 🙂")
    assert all(sp.is_byte(i) for i in ids if sp.id_to_piece(i) != "\u2581")
    assert train_gpt.count_target_bytes(np.array([BOS_ID, *ids]), luts) == len("日本語 🙂".encode())


def test_count_target_bytes_matches_reference_on_a_stream(bundled_sp):
    stream = token_stream(bundled_sp, DOCS * 2)
    luts = train_gpt.build_byte_luts(bundled_sp, 1024)
    assert train_gpt.count_target_bytes(stream, luts) == reference_bytes(bundled_sp, stream.tolist())


TEXTS = [
    *DOCS,
    " leading space",
    "two  spaces\tand a tab",
    "ends with a newline\n",
    "UPPER lower MiXeD 007 agent",
]
NON_ASCII = ["naïve café 日本語 🙂", "Grüße aus Köln — “quoted” … ", "😀😀 emoji start", "ä"]


def test_check_byte_table_passes_on_real_texts(bundled_sp):
    luts = train_gpt.build_byte_luts(bundled_sp, 1024)
    assert all(bundled_sp.unk_id() not in bundled_sp.encode(t) for t in TEXTS)  # none is skipped
    want = sum(len(bundled_sp.decode(bundled_sp.encode(t)).encode("utf-8")) for t in TEXTS)
    assert train_gpt.check_byte_table(bundled_sp, TEXTS, luts) == want
    for text in TEXTS:  # and document by document against the rule written out here
        ids = bundled_sp.encode(text)
        decoded = bundled_sp.decode(ids).encode("utf-8")
        assert reference_bytes(bundled_sp, [BOS_ID, *ids]) == len(decoded), text


def test_check_byte_table_with_byte_fallback_and_non_ascii(byte_fallback_sp):
    _, sp = byte_fallback_sp
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    texts = TEXTS + NON_ASCII
    assert any(sp.is_byte(i) for t in NON_ASCII for i in sp.encode(t))
    assert all(sp.unk_id() not in sp.encode(t) for t in texts)
    want = sum(len(sp.decode(sp.encode(t)).encode("utf-8")) for t in texts)
    assert train_gpt.check_byte_table(sp, texts, luts) == want
    assert sp.decode(sp.encode(NON_ASCII[0])) == NON_ASCII[0]


def test_check_byte_table_accepts_token_id_documents(bundled_sp):
    luts = train_gpt.build_byte_luts(bundled_sp, 1024)
    stream = token_stream(bundled_sp, DOCS)
    docs = train_gpt.split_documents(stream, limit=100)
    assert len(docs) == len(DOCS)
    want = sum(len(bundled_sp.decode(bundled_sp.encode(t)).encode()) for t in DOCS)
    assert train_gpt.check_byte_table(bundled_sp, docs, luts) == want


@pytest.mark.parametrize("damage", ["base_bytes", "leading_space", "boundary", "byte_piece"])
def test_check_byte_table_detects_a_broken_table(byte_fallback_sp, damage):
    _, sp = byte_fallback_sp
    base, space, boundary = (a.copy() for a in train_gpt.build_byte_luts(sp, sp.vocab_size()))
    texts = ["the end of it", "naïve 日本"]
    if damage == "base_bytes":
        base[sp.encode("the end of it")[-1]] += 1
    elif damage == "leading_space":
        space[:] = False
    elif damage == "boundary":
        boundary[BOS_ID] = False  # then the "▁" of a document's first piece is charged as a space
        texts = [[sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581of")]]
        assert sp.unk_id() not in texts[0]
    else:
        base[[i for i in range(sp.vocab_size()) if sp.is_byte(i)]] = 2
    with pytest.raises(DataError, match="BPB byte table mismatch on document"):
        train_gpt.check_byte_table(sp, texts, (base, space, boundary))


def test_check_byte_table_skips_documents_with_unk(bundled_sp):
    luts = train_gpt.build_byte_luts(bundled_sp, 1024)
    assert bundled_sp.unk_id() in bundled_sp.encode(NON_ASCII[0])
    clean = train_gpt.check_byte_table(bundled_sp, ["plain text"], luts)
    assert train_gpt.check_byte_table(bundled_sp, [NON_ASCII[0], "plain text"], luts) == clean
    with pytest.raises(DataError, match="no document free of <unk>"):
        train_gpt.check_byte_table(bundled_sp, [NON_ASCII[0]], luts)


def test_split_documents():
    tokens = np.array([7, 1, 5, 6, 1, 8, 1, 1, 9, 4])
    docs = train_gpt.split_documents(tokens, limit=10)
    # tokens before the first BOS are left out; the last document runs to the end of the stream
    assert [d.tolist() for d in docs] == [[5, 6], [8], [], [9, 4]]
    assert [d.tolist() for d in train_gpt.split_documents(np.array([5, 1, 6]), limit=4)] == [[6]]


def test_split_documents_without_bos_returns_no_documents():
    assert train_gpt.split_documents(np.array([5, 6, 7]), limit=4) == []


def test_split_documents_limit_ends_the_last_document_at_the_next_bos():
    tokens = np.array([1, 5, 6, 1, 8, 1, 1, 9, 4])
    assert [d.tolist() for d in train_gpt.split_documents(tokens, limit=2)] == [[5, 6], [8]]
    assert [d.tolist() for d in train_gpt.split_documents(tokens, limit=1)] == [[5, 6]]


# ----------------------------------------------------------------------------- val_bpb arithmetic


def test_evaluate_val_bpb_equals_nll_over_bytes(shard_dir, tiny_hp, cpu_runtime, bundled_sp, randomize):
    # 4 eval sequences per batch: the last batch is partial.
    hp = tiny_hp(VOCAB_SIZE=1024, DATA_PATH=shard_dir, TOKENIZER_PATH=BUNDLED_TOKENIZER, VAL_BATCH_TOKENS=64)
    val = train_gpt.prepare_validation(hp, cpu_runtime, train_gpt.Logger(None))
    T = hp.train_seq_len
    n_seqs = (len(val.tokens) - 1) // T
    assert n_seqs >= 5 and n_seqs % 4 != 0 and len(val.tokens) == n_seqs * T + 1

    torch.manual_seed(0)
    model = randomize(train_gpt.GPT(hp), std=0.05)
    val_loss, val_bpb = train_gpt.evaluate(model, val, hp, cpu_runtime)

    nll, nbytes = 0.0, 0
    tokens = val.tokens.astype(np.int64)
    with torch.no_grad():
        for i in range(n_seqs):
            x = torch.from_numpy(tokens[i * T : (i + 1) * T])[None]
            y = torch.from_numpy(tokens[i * T + 1 : (i + 1) * T + 1])[None]
            logp = F.log_softmax(model(x).double(), dim=-1)
            nll -= logp.gather(-1, y[..., None]).sum().item()
            nbytes += reference_bytes(bundled_sp, tokens[i * T : (i + 1) * T + 1].tolist())
    assert model.training  # evaluate restores the mode
    assert val_loss == pytest.approx(nll / (n_seqs * T), rel=1e-6)
    assert val_bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    # scoring is on the whole stream: its bytes are the decoded text of every document
    assert nbytes == reference_bytes(bundled_sp, tokens.tolist())
