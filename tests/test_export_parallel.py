"""The export's wall time: the payload compressed as independent streams in parallel threads (format 2,
format 1 still read), the export reserve probed on trained-like weights, GPTQ dealt out across ranks."""

from __future__ import annotations

import hashlib
import lzma
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_

import train_gpt as tg

SMALL = dict(NUM_LAYERS=3, MODEL_DIM=64, BIGRAM_BUCKETS=64)


def tiny_payload(**knobs) -> tuple[tg.Quantizer, dict, bytes]:
    hp = make_hp(**SMALL, **knobs)
    torch.manual_seed(0)
    qz = tg.Quantizer(randomize_(tg.GPT(hp), std=0.05), {}, hp)
    qstate = qz.qstate()
    return qz, qstate, qz.payload(qstate)


def same_qstate(a: dict, b: dict) -> bool:
    def flat(t):
        return (t.q, t.scale) if isinstance(t, tg.QuantTensor) else (t,)

    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(flat(a[n]), flat(b[n]), strict=True)) for n in a
    )


# ---------------------------------------------------------------- streams


def test_streams_cover_the_payload_in_order_and_cut_big_roles_between_tensors(monkeypatch):
    _, qstate, payload = tiny_payload()
    spans = tg.payload_streams(payload)
    assert spans[0][0] == 0 and spans[-1][1] == len(payload)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    fc = [n for n in qstate if n.endswith("mlp.fc.weight")]
    fc_bytes = qstate[fc[0]].q.numel()
    assert fc_bytes * len(fc) in [end - start for start, end, _ in spans]  # one role, one stream
    monkeypatch.setattr(tg, "STREAM_BYTES", fc_bytes + 1)  # three fc tensors: cut into parts
    cut = [end - start for start, end, _ in tg.payload_streams(payload)]
    assert len(cut) > len(spans) and fc_bytes in cut  # each part whole tensors
    assert [w for _, _, w in spans][-2:] == [2, 2]  # row scales, then fp16 tensors: 2-byte words


def test_even_parts_cuts_between_items_into_about_equal_sums():
    assert [len(part) for part in tg.even_parts([5] * 11, 3)] == [4, 3, 4]
    assert tg.even_parts([7], 4) == [[7]]
    assert sum(tg.even_parts([3, 1, 4, 1, 5, 9, 2, 6], 2), []) == [3, 1, 4, 1, 5, 9, 2, 6]


def test_byte_shuffle_round_trips():
    data = np.random.default_rng(0).standard_normal(1001).astype("<f2").tobytes()
    shuffled = tg.shuffle_words(data, 2)
    assert shuffled != data and shuffled[:1001] == data[0::2]
    assert tg.shuffle_words(shuffled, 2, inverse=True) == data


@pytest.mark.parametrize("knobs", [{}, {"QUANT_PACKING": "bits"}, {"QUANT_INT5_LAYERS": "1"}])
def test_stream_body_round_trips_bit_exact(knobs):
    _, qstate, payload = tiny_payload(**knobs)
    codec, body, _ = tg.compress_best(payload, tg.available_compressors("auto"), streams=True)
    assert tg.decompress_streams(body) == payload
    meta, decoded = tg.decode_artifact(tg.encode_artifact(body, codec), "mem")
    assert same_qstate(decoded, qstate) and meta["packing"] == tg.parse_payload(payload)[0]["packing"]


def test_each_stream_keeps_its_smallest_method_and_layout():
    _, _, payload = tiny_payload()
    methods = tg.available_compressors("auto")
    codec, body, sizes = tg.compress_streams(payload, methods)
    assert len(body) <= min(sizes.values())
    for (start, end, word), (method, shuffled) in zip(
        tg.payload_streams(payload), codec.choices, strict=True
    ):
        data = payload[start:end]
        layouts = [data, tg.shuffle_words(data, 2)] if word == 2 else [data]
        smallest = min(len(tg.compress(d, m)) for m in methods for d in layouts)
        assert len(tg.compress(layouts[shuffled], method)) == smallest
    assert set(str(codec).split("+")) == {method for method, _ in codec.choices}


def test_stream_bytes_do_not_depend_on_the_thread_count():
    _, _, payload = tiny_payload()
    methods = tg.available_compressors("auto")
    bodies = {threads: tg.compress_streams(payload, methods, threads)[1] for threads in (1, 2, 7)}
    assert len(set(bodies.values())) == 1
    codec = tg.compress_streams(payload, methods, 3)[0]
    assert tg.compress_payload(payload, codec) == bodies[1]  # the fit ladder's re-compression


def fit(**knobs) -> tuple[bytes, dict]:
    qz, _, _ = tiny_payload(COMPRESSOR="zstd", **knobs)
    return tg.fit_artifact(qz, 1000, [].append, 16_000_000)


def test_the_export_writes_format_2_by_default_and_format_1_with_one_stream():
    v2, info = fit()
    v1, info1 = fit(COMPRESS_STREAMS=False)
    version = struct.unpack_from("<H", v2, len(tg.ARTIFACT_MAGIC))[0]
    assert version == 2 and struct.unpack_from("<H", v1, len(tg.ARTIFACT_MAGIC))[0] == 1
    assert info["compressor"] == "zstd" == info1["compressor"]
    assert same_qstate(tg.decode_artifact(v2, "a")[1], tg.decode_artifact(v1, "b")[1])
    assert fit(COMPRESS_THREADS=1)[0] == v2


def format_1_artifact(payload: bytes) -> bytes:
    """An artifact exactly as the one-stream writer made them before format 2, built here by hand."""
    body = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    header = struct.pack("<HB32sQ", 1, 2, hashlib.sha256(body).digest(), len(body))
    return b"PGOLFQ\r\n" + header + body


def test_format_1_artifacts_still_load():
    _, qstate, payload = tiny_payload()
    meta, decoded = tg.decode_artifact(format_1_artifact(payload), "old.ptz")
    assert same_qstate(decoded, qstate) and meta == tg.parse_payload(payload)[0]
    assert tg.encode_artifact(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME), "lzma") == (
        format_1_artifact(payload)
    )


def test_unknown_versions_and_compressor_ids_are_refused_with_the_fix():
    _, _, payload = tiny_payload()
    blob = bytearray(format_1_artifact(payload))
    blob[len(tg.ARTIFACT_MAGIC)] = 3
    with pytest.raises(
        tg.ArtifactError, match=r"new.ptz: artifact format version 3, .*reads versions 1, 2; "
    ):
        tg.decode_artifact(bytes(blob), "new.ptz")
    blob[len(tg.ARTIFACT_MAGIC)] = 2  # a format-1 body under a format-2 header
    with pytest.raises(tg.ArtifactError, match="compressor id 2 is not one of artifact format version 2"):
        tg.decode_artifact(bytes(blob), "odd.ptz")


# ---------------------------------------------------------------- the export reserve's probe


def quantized_ints(model: tg.GPT, hp: tg.Hyperparameters) -> torch.Tensor:
    qstate = tg.Quantizer(model, {}, hp).qstate()
    return torch.cat([t.q.flatten() for t in qstate.values() if isinstance(t, tg.QuantTensor)])


def test_the_reserve_probe_times_trained_like_weights_and_restores_the_initial_ones(monkeypatch):
    """At init the zero-init projections make ~43 % of the integers zero and brotli ~2x faster: a probe
    on them under-reserves. The probe's payload must look trained (few zeros, high entropy), and the
    reserve is 1.25x the probe's time plus 1 s."""
    hp = make_hp(**SMALL, MAX_WALLCLOCK_SECONDS=100, EXPORT_RESERVE_SECONDS=-1)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    probed = {}

    def fake_produce(m, loader, hp_, rt, log, bytes_code, limit_fit=True, prior=None):
        probed["ints"] = quantized_ints(m, hp_)
        probed["payload"] = tg.Quantizer(m, {}, hp_).payload(tg.Quantizer(m, {}, hp_).qstate())
        return b"", {"size_per_entropy": 1.25}

    monkeypatch.setattr(tg, "produce_artifact", fake_produce)
    monkeypatch.setattr(tg, "max_over_ranks", lambda seconds, rt: 8.0)  # the probe's time
    stream = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    lines: list[str] = []
    reserve, ratio = tg.measure_export_reserve(
        model, SimpleNamespace(stream=stream), hp, None, lines.append, 0
    )
    assert (reserve, ratio) == (1.25 * 8.0 + 1.0, 1.25)
    assert lines == ["export_probe_s:8.0000 export_reserve_s:11.0000"]
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # restored exactly
    init, probe = quantized_ints(model, hp), probed["ints"]
    assert (init == 0).float().mean() > 0.3 and (probe == 0).float().mean() < 0.2
    bits = [8 * tg.entropy_bytes(q) / q.numel() for q in (init, probe)]
    assert bits[1] > bits[0] + 0.5  # bits per integer: 4.1 at init, 5.1 probed (64-wide rows)
    init_payload = tg.Quantizer(model, {}, hp).payload(tg.Quantizer(model, {}, hp).qstate())
    sizes = [len(tg.compress(p, "zstd")) for p in (init_payload, probed["payload"])]
    assert sizes[1] > 1.25 * sizes[0]  # compresses like a trained model, not like the init


def test_trained_like_weights_come_from_seed_alone_and_keep_each_matrix_std():
    """Every rank draws the same stand-in (SEED, its own generator), and training's RNG does not move."""
    hp = make_hp(**SMALL)
    torch.manual_seed(0)
    model = tg.GPT(hp)
    draws = []
    for global_seed in (5, 6):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        with tg.trained_like_weights(model, hp):
            draws.append({n: model.get_parameter(n).detach().clone() for n in tg.quant_plan(model, hp)})
        assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(draws[0][n], draws[1][n]) for n in draws[0])
    assert float(draws[0]["blocks.0.attn.proj.weight"].std()) == pytest.approx(0.02, rel=1e-3)  # zero init
    fc = model.get_parameter("blocks.0.mlp.fc.weight")
    assert float(draws[0]["blocks.0.mlp.fc.weight"].std()) == pytest.approx(
        max(float(fc.std()), 0.02), rel=1e-3
    )
    t = tg.student_t(torch.Size([200_000]), 3, torch.Generator().manual_seed(0))
    assert float(t.var()) == pytest.approx(3.0, rel=0.25)  # nu / (nu - 2)
