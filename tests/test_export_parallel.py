"""The export's wall time: the payload compressed as independent streams in parallel threads (format 2,
format 1 still read), the export reserve probed on trained-like weights, GPTQ dealt out across ranks."""

from __future__ import annotations

import hashlib
import lzma
import os
import socket
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_hp, randomize_

import train_gpt as tg

SMALL = dict(NUM_LAYERS=3, MODEL_DIM=128, BIGRAM_BUCKETS=64)


def tiny_payload(**knobs) -> tuple[tg.Quantizer, dict, bytes]:
    hp = make_hp(**SMALL, **knobs)
    torch.manual_seed(0)
    qz = tg.Quantizer(randomize_(tg.GPT(hp), std=0.05), {}, hp)
    qstate = qz.qstate()
    return qz, qstate, qz.payload(qstate)


# The frontier records' quantisation knobs all on (R0427's clips, LQER asym, AWQ-lite, int8 gates).
FRONTIER = dict(
    MLP_CLIP_SIGMAS=11.5,
    ATTN_CLIP_SIGMAS=13.0,
    EMBED_CLIP_SIGMAS=14.0,
    GPTQ_SDCLIP_K=12.85,
    LQER_ENABLED=True,
    LQER_ASYM_ENABLED=True,
    AWQ_LITE_ENABLED=True,
    AWQ_LITE_GROUP_TOP_K=2,
    GATED_ATTN_QUANT_GATE=True,
)


def same_qstate(a: dict, b: dict) -> bool:
    """Every stored field equal: integers, scales, AWQ-lite group scales, LQER factors."""

    def flat(t):
        if not isinstance(t, tg.QuantTensor):
            return (t,)
        g, L = t.salient, t.lqer
        extras = ((g.starts, g.size, g.bits, g.scale) if g else ()) + (
            (L.kind, L.qA, L.sA, L.qB, L.sB) if L else ()
        )
        return (t.q, t.scale, t.bits, *extras)

    def equal(x, y) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return a.keys() == b.keys() and all(
        len(flat(a[n])) == len(flat(b[n])) and all(map(equal, flat(a[n]), flat(b[n]))) for n in a
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
    assert tg.payload_streams(payload + b"\0")[-1][2] == 1  # a tail of odd length is never shuffled


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


def frontier_quantizer(**knobs) -> tg.Quantizer:
    hp = make_hp(**SMALL, QUANT_EMBED_GPTQ=True, **FRONTIER, **knobs)
    return tg.Quantizer(*export_inputs(hp), hp)


def test_frontier_fields_get_their_own_stream_and_round_trip_bit_exact_in_format_2():
    """LQER factors and AWQ-lite group scales follow the fp16 tensors (build_payload): one stream of
    their own, and the format 2 artifact gives back every field bit for bit."""
    qz = frontier_quantizer()
    qstate = qz.qstate()
    ints = [t for t in qstate.values() if isinstance(t, tg.QuantTensor)]
    assert sum(t.lqer is not None for t in ints) == 3 and any(t.salient is not None for t in ints)
    assert any(n.endswith(tg.GATE_SUFFIXES) and isinstance(t, tg.QuantTensor) for n, t in qstate.items())
    payload = qz.payload(qstate)
    extras = sum(len(b) for t in ints for b in tg.extra_fields(t, {}))
    start, end, word = tg.payload_streams(payload)[-1]
    assert (start, end, word) == (len(payload) - extras, len(payload), 1)  # exactly the extras
    codec, body, _ = tg.compress_best(payload, tg.available_compressors("auto"), streams=True)
    assert tg.decompress_streams(body) == payload and tg.compress_payload(payload, codec) == body
    assert same_qstate(tg.decode_artifact(tg.encode_artifact(body, codec), "mem")[1], qstate)
    blob, _ = tg.fit_artifact(frontier_quantizer(COMPRESSOR="zstd"), 1000, [].append, 16_000_000)
    assert struct.unpack_from("<H", blob, len(tg.ARTIFACT_MAGIC))[0] == 2
    assert same_qstate(tg.decode_artifact(blob, "fit")[1], frontier_quantizer(COMPRESSOR="zstd").qstate())


def test_a_fit_ladder_bit_move_keeps_the_codecs_streams_with_bit_packing(monkeypatch):
    """Streams are cut by value counts: an int5 move under QUANT_PACKING=bits shrinks the bytes but
    keeps the stream count, so the fit's re-compression with the first Codec still applies."""
    qz, qstate, payload = tiny_payload(QUANT_PACKING="bits")
    fc = [n for n in qstate if n.endswith("mlp.fc.weight")]
    monkeypatch.setattr(tg, "STREAM_BYTES", qstate[fc[0]].q.numel() + 1)
    codec, _, _ = tg.compress_best(payload, ["zstd"], streams=True)
    qz.plan.update({n: 5 for n in qz.plan if tg.block_index(n) is not None})
    moved = qz.payload(qz.qstate())
    assert len(moved) < len(payload) and len(tg.payload_streams(moved)) == len(codec.choices)
    assert tg.decompress_streams(tg.compress_payload(moved, codec)) == moved


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
    blob[len(tg.ARTIFACT_MAGIC)] = 4
    with pytest.raises(
        tg.ArtifactError, match=r"new.ptz: artifact format version 4, .*reads versions 1, 2, 3; "
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
    assert bits[1] > bits[0] + 0.3  # bits per integer: 4.19 at init, 4.66 probed (128-wide rows)
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
        max(float(fc.detach().std()), 0.02), rel=1e-3
    )
    t = tg.student_t(torch.Size([200_000]), 3, torch.Generator().manual_seed(0))
    assert float(t.var()) == pytest.approx(3.0, rel=0.25)  # nu / (nu - 2)


# ---------------------------------------------------------------- calibration and GPTQ across ranks


def test_q_k_v_share_one_hessian_computed_and_summed_once(cpu_runtime, shard_dir, monkeypatch):
    hp = make_hp(VOCAB_SIZE=1024, MODEL_DIM=128, DATA_PATH=str(shard_dir))
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), cpu_runtime)
    own = {}  # each linear's X^T X summed by a hook of its own: what sharing must equal

    def summing(name):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2).float()
            own[name] = own.get(name, 0) + x.T @ x

        return hook

    attn = model.blocks[1].attn
    for name, module in (("c_k", attn.c_k), ("c_v", attn.c_v), ("fc", model.blocks[1].mlp.fc)):
        module.register_forward_pre_hook(summing(name))
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(tg, "all_reduce_sum", lambda H, rt: reduced.append(H) or H)
    hessians = tg.collect_hessians(model, loader, hp, cpu_runtime, batches=2)
    q, k, v, fc = (f"blocks.1.{n}.weight" for n in ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.fc"))
    assert hessians[q] is hessians[k] is hessians[v] and hessians[fc] is not hessians[q]
    assert torch.equal(hessians[k], own["c_k"]) and torch.equal(hessians[v], own["c_v"])
    assert torch.equal(hessians[fc], own["fc"])
    tokens = 2 * hp.microbatch_tokens  # AWQ-lite's rows: each name's own, the shared H's not tripled
    assert hessians.rows[q] == hessians.rows[k] == hessians.rows[v] == hessians.rows[fc] == tokens
    assert sorted(map(id, reduced)) == sorted({id(H) for H in hessians.values()})  # each summed once


def test_deal_by_cost_balances_and_covers_every_matrix_once():
    costs = {f"m{i}": c for i, c in enumerate([90, 70, 50, 40, 40, 30, 20, 10, 5])}
    for ranks in (1, 2, 3, 8, 12):
        shares = tg.deal_by_cost(costs, ranks)
        assert sorted(sum(shares, [])) == sorted(costs) and len(shares) == ranks
        loads = [sum(costs[n] for n in share) for share in shares]
        assert max(loads) - min(loads) <= max(costs.values())
        assert shares == tg.deal_by_cost(dict(reversed(costs.items())), ranks)  # order-free
    assert [sum(costs[n] for n in s) for s in tg.deal_by_cost(costs, 2)] == [180, 175]


def export_inputs(hp: tg.Hyperparameters) -> tuple[tg.GPT, dict[str, torch.Tensor]]:
    """A tiny model and fixed Hessians (every rank alike): calibration itself is tested above."""
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp), std=0.05)
    gen = torch.Generator().manual_seed(1)
    hessians = tg.Hessians()
    for name in sorted(tg.quant_plan(model, hp)):
        cols = model.get_parameter(name).size(1)
        x = torch.randn(4 * cols, cols, generator=gen) * torch.rand(cols, generator=gen)
        hessians[name], hessians.rows[name] = x.T @ x, 4 * cols
    return model, hessians


def export_on(rank: int, world_size: int, knobs: dict) -> tuple[bytes, list[str]]:
    """produce_artifact on this rank (calibration replaced by the fixed Hessians); the artifact and
    the (name, bits, max-|w| clip) of every tensor this rank quantised."""
    hp = make_hp(**SMALL, COMPRESSOR="zstd", QUANT_EMBED_GPTQ=True, **knobs)
    model, hessians = export_inputs(hp)
    tg.collect_hessians = lambda *args: hessians
    quantized, real = [], tg.quantize_tensor
    tg.quantize_tensor = lambda name, *args: quantized.append((name, args[1], args[4])) or real(name, *args)
    try:
        rt = tg.Runtime(rank, world_size, rank, torch.device("cpu"), 1, "t")
        blob, _ = tg.produce_artifact(model, None, hp, rt, [].append, 1000)
    finally:
        tg.quantize_tensor = real
    return blob, quantized


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out: str, knobs: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(export_on(rank, world_size, knobs), f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("knobs", [{}, FRONTIER], ids=["defaults", "frontier"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_gptq_split_across_ranks_writes_the_same_artifact_bytes(world_size, knobs, tmp_path, monkeypatch):
    """With the frontier knobs too: AWQ-lite groups, int8 gates and LQER factors end up the same."""
    torch.set_num_threads(1)
    monkeypatch.setattr(tg, "collect_hessians", tg.collect_hessians)  # export_on replaces it
    reference, everything = export_on(0, 1, knobs)
    if knobs:  # the artifact does carry every frontier field
        stored = tg.decode_artifact(reference, "ref")[1]
        ints = [t for t in stored.values() if isinstance(t, tg.QuantTensor)]
        assert any(t.lqer for t in ints) and any(t.salient for t in ints)
        assert any(isinstance(t, tg.QuantTensor) for n, t in stored.items() if n.endswith(tg.GATE_SUFFIXES))
    args = (world_size, free_port(), str(tmp_path), knobs)
    mp.spawn(_rank_main, args=args, nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    assert all(blob == reference for blob, _ in results)  # every rank, byte for byte
    shares = [done for _, done in results]
    assert sorted(sum(shares, [])) == sorted(everything)  # each matrix quantised once, by one rank
    assert all(shares)  # every rank did some


@pytest.mark.parametrize("world_size", [2, 3])
def test_fit_ladder_requantisations_are_split_across_ranks_with_the_same_bytes(
    world_size, tmp_path, monkeypatch
):
    """A cap 7 % under the model's size: the fit ladder re-quantises blocks at max-|w| clips and at
    int5; those GPTQ runs are dealt across ranks too, and the artifact stays the same bytes."""
    torch.set_num_threads(1)
    monkeypatch.setattr(tg, "collect_hessians", tg.collect_hessians)  # export_on replaces it
    knobs = dict(ARTIFACT_CAP_BYTES=1000 + int(0.93 * len(export_on(0, 1, {})[0])))
    reference, everything = export_on(0, 1, knobs)
    moved = [key for key in everything if key[1] == 5 or key[2]]
    assert moved and len(set(everything)) == len(everything)  # the ladder re-quantised, each key once
    args = (world_size, free_port(), str(tmp_path), knobs)
    mp.spawn(_rank_main, args=args, nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    assert all(blob == reference for blob, _ in results)
    shares = [done for _, done in results]
    assert sorted(sum(shares, [])) == sorted(everything)
    assert sum(any(key in moved for key in share) for share in shares) > 1  # not rank 0 alone
