"""R0427's per-group serializer (COMPRESSOR=pergroup): integer streams through the lrzip binary, and the
row transforms (column-major, rows similarity-sorted) each stream keeps only where they shrink it."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_

import train_gpt as tg

SMALL = dict(NUM_LAYERS=3, MODEL_DIM=128, BIGRAM_BUCKETS=64)
HAS_LRZIP = tg.shutil.which("lrzip") is not None


def channel_model(hp: tg.Hyperparameters) -> tg.GPT:
    """A tiny model whose quantised matrices have log-normal input-channel scales, as trained ones
    have outlier channels: column-major streams then compress smaller (iid weights have no order to
    find, and keep every stream as it is)."""
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(tg.quant_plan(model, hp)):
            p = model.get_parameter(name)
            p.mul_(torch.exp(1.5 * torch.randn(p.shape[1], generator=gen)))
    return model


def tiny_payload(**knobs) -> tuple[dict, bytes]:
    hp = make_hp(**knobs)
    qz = tg.Quantizer(channel_model(hp), {}, hp)
    qstate = qz.qstate()
    return qstate, qz.payload(qstate)


def version(blob: bytes) -> int:
    return struct.unpack_from("<H", blob, len(tg.ARTIFACT_MAGIC))[0]


def records_similarity_sort(matrix: np.ndarray) -> np.ndarray:
    """R0427's `_similarity_sort_l1` as its train_gpt.py writes it (the reference)."""
    n = matrix.shape[0]
    used = np.zeros(n, dtype=bool)
    order, used[0], cur = [0], True, matrix[0].astype(np.float32)
    for _ in range(n - 1):
        dists = np.sum(np.abs(matrix[~used].astype(np.float32) - cur), axis=1)
        best = np.where(~used)[0][np.argmin(dists)]
        order.append(best)
        used[best] = True
        cur = matrix[best].astype(np.float32)
    return np.array(order)


@pytest.mark.parametrize("spread", [2, 31])
def test_similarity_order_is_the_records_greedy_l1_order(spread):
    """Few distinct values (spread 2) make ties common: the lowest unused row must win them."""
    q = np.random.default_rng(spread).integers(-spread, spread + 1, (300, 24)).astype(np.int8)
    order = tg.similarity_order(q)
    assert np.array_equal(order, records_similarity_sort(q))
    assert sorted(order) == list(range(300))


@pytest.mark.parametrize("sort", [False, True])
def test_column_layout_round_trips_bit_exact(sort):
    rng = np.random.default_rng(0)
    mats = [("mlp.fc.weight", 40, 24), ("mlp.fc.weight", 40, 24), ("tok_emb.weight", 7, 5)]
    data = b"".join(rng.integers(-31, 32, r * c).astype(np.int8).tobytes() for _, r, c in mats)
    laid = tg.columns_layout(data, mats, sort)
    assert laid != data and len(laid) == len(data) + 4 + 8 * 3 + (2 * 87 if sort else 0)
    first = np.frombuffer(data, np.int8, 40 * 24).reshape(40, 24)
    if not sort:  # column-major: the first matrix's first column comes first
        assert laid[28 : 28 + 40] == first[:, 0].tobytes()
    assert tg.rows_layout(laid, sort) == data
    with pytest.raises(tg.ArtifactError, match="stray bytes"):
        tg.rows_layout(laid + b"\0", sort)


def forced_codec(payload: bytes, layout: int, method: str = "zstd") -> tg.Codec:
    """Every integer stream that can take `layout` in it, the rest as they are."""
    spans = tg.payload_layout(payload)
    return tg.Codec(tuple((method, layout if layout in tg.layouts(s, True) else tg.RAW) for s in spans))


@pytest.mark.parametrize("layout", [tg.COLUMNS, tg.SORTED])
@pytest.mark.parametrize("knobs", [{}, {"QUANT_EMBED_GPTQ": False, "GATED_ATTN_QUANT_GATE": True}])
def test_each_row_transform_round_trips_the_artifact_bit_exact(layout, knobs):
    qstate, payload = tiny_payload(**SMALL, **knobs)
    codec = forced_codec(payload, layout)
    assert sum(chosen == layout for _, chosen in codec.choices) >= 2  # e.g. tok_emb, c_q, fc
    body = tg.compress_payload(payload, codec)
    assert tg.decompress_streams(body) == payload
    blob = tg.encode_artifact(body, codec)
    assert version(blob) == 3
    meta, decoded = tg.decode_artifact(blob, "mem")
    assert meta == tg.parse_payload(payload)[0]
    assert all(torch.equal(decoded[n].q, t.q) for n, t in qstate.items() if isinstance(t, tg.QuantTensor))


def test_sorting_is_offered_only_in_the_records_hot_roles():
    _, payload = tiny_payload(**SMALL)
    sorted_roles, column_roles = set(), set()
    for s in tg.payload_layout(payload):
        roles = {role for role, _, _ in s.matrices}
        column_roles |= roles if tg.COLUMNS in tg.layouts(s, True) else set()
        sorted_roles |= roles if tg.SORTED in tg.layouts(s, True) else set()
        assert tg.layouts(s, False) == ([tg.RAW, tg.SHUFFLED] if s.word == 2 else [tg.RAW])
    assert sorted_roles == set(tg.SORTED_ROLES) and "attn.c_k.weight" in column_roles - sorted_roles
    _, bits = tiny_payload(**SMALL, QUANT_PACKING="bits")  # no byte per integer: nothing to reorder
    assert all(tg.layouts(s, True) == tg.layouts(s, False) for s in tg.payload_layout(bits))


def test_row_transform_bytes_do_not_depend_on_the_thread_count():
    _, payload = tiny_payload(**SMALL)
    runs = {t: tg.compress_streams(payload, ["zstd", "lzma"], t, rows=True) for t in (1, 2, 5)}
    assert len({body for _, body, _ in runs.values()}) == 1
    codec, body, _ = runs[2]
    assert {layout for _, layout in codec.choices} >= {tg.COLUMNS, tg.SORTED}  # both kept somewhere
    assert tg.compress_payload(payload, tg.Codec(codec.choices, 3)) == body  # the fit's re-compression


def test_each_stream_keeps_its_smallest_layout():
    _, payload = tiny_payload(**SMALL)
    methods = ["zstd", "lzma"]
    codec, body, sizes = tg.compress_streams(payload, methods, rows=True)
    plain = tg.compress_streams(payload, methods)[1]
    assert len(body) < 0.95 * len(plain) and len(body) <= min(sizes.values())  # measured: -13 %
    for s, (method, layout) in zip(tg.payload_layout(payload), codec.choices, strict=True):
        data = payload[s.start : s.end]
        smallest = min(
            len(tg.compress(tg.to_layout(data, s, lay), m)) for m in methods for lay in tg.layouts(s, True)
        )
        assert len(tg.compress(tg.to_layout(data, s, layout), method)) == smallest


def test_a_transform_that_does_not_shrink_is_not_chosen(monkeypatch):
    """On a compressor where every transformed stream comes out larger, no stream keeps a transform:
    the body is byte for byte the plain one, format 2. On a tie the plain layout wins too."""
    _, payload = tiny_payload(**SMALL)
    plain_codec, plain, _ = tg.compress_streams(payload, ["zstd"])
    transformed, real = set(), tg.columns_layout
    monkeypatch.setattr(tg, "columns_layout", lambda *a: transformed.add(real(*a)) or real(*a))
    real_compress = tg.compress
    monkeypatch.setattr(tg, "compress", lambda d, m: real_compress(d, m) + bytes(len(d) * (d in transformed)))
    codec, body, _ = tg.compress_streams(payload, ["zstd"], rows=True)
    assert transformed and codec == plain_codec and body == plain
    assert version(tg.encode_artifact(body, codec)) == 2
    monkeypatch.setattr(tg, "compress", lambda d, m: b"same size")
    assert tg.compress_streams(payload, ["zstd"], rows=True)[0].choices == (
        (("zstd", tg.RAW),) * len(plain_codec.choices)
    )


def test_the_default_export_is_unchanged_format_2():
    """Row transforms and lrzip are off by default: format 2, no stream with a new layout."""
    hp = make_hp(**SMALL, COMPRESSOR="zstd")
    assert not hp.row_transforms and tg.compressor_plan(hp) == (["zstd"], dict(rows=False))
    torch.manual_seed(0)
    qz = tg.Quantizer(randomize_(tg.GPT(hp), std=0.05), {}, hp)
    blob, info = tg.fit_artifact(qz, 1000, [].append, 16_000_000)
    assert version(blob) == 2 and info["compressor"] == "zstd"


def test_row_transforms_through_the_fit_ladder():
    """COMPRESS_ROW_TRANSFORMS=1 under a cap that forces int5 moves: the fit's re-compressions keep
    the Codec's layouts and the artifact decodes to what was fitted."""
    hp = make_hp(**SMALL, COMPRESSOR="zstd", COMPRESS_ROW_TRANSFORMS=True)
    qz = tg.Quantizer(channel_model(hp), {}, hp)
    full, _ = tg.fit_artifact(qz, 1000, [].append, 16_000_000)
    blob, info = tg.fit_artifact(qz, 1000, [].append, 1000 + int(0.9 * len(full)))
    assert info["fit_int5_layers"] and version(blob) == 3 and len(blob) < 0.9 * len(full)
    decoded = tg.decode_artifact(blob, "fit")[1]
    assert all(decoded[n].bits == 5 for n in qz.plan if tg.block_index(n) in info["fit_int5_layers"])


def test_knobs_check_each_other_and_the_record_preset_asks_for_pergroup():
    with pytest.raises(tg.ConfigError, match="COMPRESS_STREAMS=1"):
        make_hp(COMPRESSOR="pergroup", COMPRESS_STREAMS=False)
    with pytest.raises(tg.ConfigError, match="QUANT_PACKING=bytes"):
        make_hp(COMPRESS_ROW_TRANSFORMS=True, QUANT_PACKING="bits")
    assert make_hp(COMPRESSOR="pergroup").row_transforms
    assert not make_hp(COMPRESSOR="pergroup", QUANT_PACKING="bits").row_transforms
    assert tg.PRESETS["record_0427"]["COMPRESSOR"] == "pergroup"
    assert not any("pergroup" in entry for entry in tg.PRESET_MISSING.get("record_0427", ()))


def test_without_the_lrzip_binary_the_run_stops_before_training_with_the_fix(monkeypatch):
    monkeypatch.setattr(tg.shutil, "which", lambda name: None)
    for choice in ("pergroup", "lrzip"):
        with pytest.raises(tg.ArtifactError, match="apt-get install lrzip"):
            tg.compressor_plan(make_hp(COMPRESSOR=choice))
        with pytest.raises(tg.ConfigError, match="apt-get install lrzip"):
            tg.check_compressor(make_hp(COMPRESSOR=choice))
    tg.check_compressor(make_hp(COMPRESSOR="pergroup", EVAL_ONLY=True, ARTIFACT_PATH="a.ptz"))
    body = tg.streams_body([("lrzip", tg.RAW)], [b"x"])
    with pytest.raises(tg.ArtifactError, match="apt-get install lrzip"):
        tg.decompress_streams(body)


@pytest.mark.skipif(not HAS_LRZIP, reason="the lrzip binary is not installed (apt-get install lrzip)")
def test_lrzip_round_trips_and_pergroup_tries_it_on_the_integer_streams_only(monkeypatch):
    data = np.random.default_rng(0).integers(-3, 4, 5000).astype(np.int8).tobytes()
    blob = tg.compress(data, "lrzip")
    assert blob[:4] == b"LRZI" and tg.decompress(blob, "lrzip") == data and tg.compress(data, "lrzip") == blob
    assert len(blob) < len(data) / 2
    # R0427's flags keep lrzip's LZ4 pre-test: near-uniform int6 is stored raw, so brotli must stay a choice
    uniform = np.random.default_rng(0).integers(-31, 32, 50_000).astype(np.int8).tobytes()
    assert len(tg.compress(uniform, "lrzip")) > len(uniform) > len(tg.compress(uniform, "brotli"))
    methods, options = tg.compressor_plan(make_hp(COMPRESSOR="pergroup"))
    assert (methods, options) == (["brotli"], dict(int_methods=["brotli", "lrzip"], rows=True))
    qstate, payload = tiny_payload()
    jobs, real = [], tg.run_jobs
    monkeypatch.setattr(tg, "run_jobs", lambda js, threads: jobs.extend(js) or real(js, threads))
    codec, body, _ = tg.compress_streams(payload, methods, 0, **options)
    spans = tg.payload_layout(payload)
    lrzip_streams = {i for i, _, m, _ in jobs if m == "lrzip"}
    assert lrzip_streams == {i for i, s in enumerate(spans) if s.ints}  # every integer stream, no other
    assert all(m == "brotli" for (m, _), s in zip(codec.choices, spans, strict=True) if not s.ints)
    assert tg.compress_streams(payload, methods, 1, **options)[1] == body
    forced = tg.Codec(
        tuple(
            ("lrzip" if s.ints else "brotli", lay) for s, (_, lay) in zip(spans, codec.choices, strict=True)
        )
    )
    blob = tg.encode_artifact(tg.compress_payload(payload, forced), forced)
    assert version(blob) == 3 and str(forced) == "brotli+lrzip"
    decoded = tg.decode_artifact(blob, "pergroup.ptz")[1]
    assert all(torch.equal(decoded[n].q, t.q) for n, t in qstate.items() if isinstance(t, tg.QuantTensor))
