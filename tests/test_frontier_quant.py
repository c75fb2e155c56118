"""The frontier records' quantisation: per-class SDClip, int7 GPTQ embeddings, LQER, AWQ-lite, int8
attention gates (R0419-R0427, PR #1855, PR #1908), each off by default."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hp

import train_gpt as tg

# R0427's logged values (train_seed0.log): MLP 11.5, attention 13.0, embedding 14.0, others 12.85.
RECORD_CLIPS = dict(MLP_CLIP_SIGMAS=11.5, ATTN_CLIP_SIGMAS=13.0, EMBED_CLIP_SIGMAS=14.0, GPTQ_SDCLIP_K=12.85)


def outlier_layer(seed: int = 0, rows: int = 64, cols: int = 128, loud: tuple[int, ...] = (), loudness=8.0):
    """Trained-like weights: Gaussian bulk plus a few outlier input columns (as trained matrices
    have), and the Hessian of inputs whose `loud` channels are `loudness` times louder."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    W[:, sorted({c % cols for c in (5, 40, 77)})] *= 12
    scales = torch.ones(cols)
    scales[list(loud)] = loudness
    X = torch.randn(8 * cols, cols, generator=gen) * scales
    return W, X.T @ X


def tiny_quantizer(seed: int = 0, loudness: float = 8.0, **knobs) -> tg.Quantizer:
    """A 2-block model of 128 channels with trained-like matrices and gates, and a Hessian (with row
    counts) for every block matrix and the tied embedding; each matrix's third-last input is loud."""
    hp = make_hp(NUM_LAYERS=2, MODEL_DIM=128, BIGRAM_BUCKETS=64, COMPRESSOR="zstd", **knobs)
    torch.manual_seed(seed)
    model = tg.GPT(hp)
    hessians = tg.Hessians()
    with torch.no_grad():
        for i, name in enumerate(tg.quant_plan(model, hp)):
            p = model.get_parameter(name)
            W, H = outlier_layer(seed + i, *p.shape, loud=(p.size(1) - 3,), loudness=loudness)
            p.copy_(W)
            if name != "bigram.embed.weight":  # a lookup table has no input
                hessians[name], hessians.rows[name] = H, 8 * p.size(1)
        for name, p in model.named_parameters():
            if name.endswith(tg.GATE_SUFFIXES):  # zero at init
                p.copy_(torch.randn(p.shape) * 0.05)
    return tg.Quantizer(model, hessians, hp)


def out_err(W, qt, H) -> float:
    return float(tg.output_error(W - qt.dequantize(), H).sum())


# ----------------------------------------------------------------------------- per-class SDClip


def test_clip_sigmas_by_class_with_the_records_values_and_fallback():
    hp = make_hp(**RECORD_CLIPS)
    assert tg.clip_sigmas("tok_emb.weight", hp) == 14.0
    assert tg.clip_sigmas("blocks.3.mlp.fc.weight", hp) == 11.5
    assert tg.clip_sigmas("blocks.3.attn.c_q.weight", hp) == 13.0
    assert tg.clip_sigmas("bigram.embed.weight", hp) == 12.85  # the records' MATRIX_CLIP_SIGMAS
    partial = make_hp(MLP_CLIP_SIGMAS=11.5)
    assert tg.clip_sigmas("blocks.0.attn.proj.weight", partial) == 0.0  # the clip search
    assert tg.clip_sigmas("blocks.0.mlp.proj.weight", partial) == 11.5


def test_per_class_sdclip_scales_are_k_row_std_over_qmax_in_fp16():
    qz = tiny_quantizer(QUANT_EMBED_GPTQ=True, QUANT_EMBED_BITS=7, **RECORD_CLIPS)
    qstate = qz.qstate()
    for name, k in [
        ("tok_emb.weight", 14.0),
        ("blocks.1.mlp.fc.weight", 11.5),
        ("blocks.0.attn.c_v.weight", 13.0),
    ]:
        W, t = qz.state[name].float(), qstate[name]
        expected = (k * W.std(dim=1) / tg.qmax(t.bits)).half()  # R0427's gptq_quantize_weight
        assert torch.equal(t.scale, expected), name
    emb = qstate["tok_emb.weight"]
    assert emb.bits == 7 and int(emb.q.abs().max()) <= 63  # R0427's EMBED_BITS=7, GPTQ'd
    assert not qz.clip_searched()  # every block matrix has its k: nothing for the ladder to give up


def test_sdclip_std_is_the_weights_as_given_even_with_dead_inputs():
    W, H = outlier_layer(1)
    H[7, :] = H[:, 7] = 0  # never active in calibration: GPTQ zeroes it, the clip ignores that
    qt = tg.gptq_quantize(W, H, 6, make_hp(), sdclip_k=12.85)
    assert torch.equal(qt.scale, tg.fp16_scales(12.85 * W.std(dim=1), 6).half())


def test_partial_classes_keep_the_search_for_the_ladder_on_the_other_matrices():
    qz = tiny_quantizer(MLP_CLIP_SIGMAS=11.5)
    assert qz.clip_searched() and qz.max_clip_order()  # the attention matrices still search
    before = qz.qstate()
    qz.max_clip.update(n for n in qz.plan if tg.block_index(n) == 0)  # a ladder move on block 0
    after = qz.qstate()
    mlp, attn = "blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight"
    assert after[mlp] is before[mlp]  # SDClip'd: the move changes nothing, no second GPTQ
    assert torch.equal(after[mlp].scale, tg.fp16_scales(11.5 * qz.state[mlp].std(dim=1), 6).half())
    assert not torch.equal(after[attn].scale, before[attn].scale)  # the search given up for max |w|


# ----------------------------------------------------------------------------- LQER


def test_lqer_asym_factors_use_the_records_ranges_and_scales():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(96, 4, generator=gen), torch.randn(4, 128, generator=gen)
    L = tg.lqer_asym(A, B, 64)
    assert L.kind == "asym" and L.sA.shape == (1,) and L.sB.shape == (8,)
    assert int(L.qA.min()) >= -2 and int(L.qA.max()) <= 1 and int(L.qB.min()) >= -8 and int(L.qB.max()) <= 7
    assert torch.equal(L.sA, (A.abs().max() / 1.5).half().reshape(1))
    assert torch.equal(L.sB, (B.reshape(-1, 64).abs().amax(dim=1) / 7.5).half())
    S = tg.lqer_sym(A, B, 4)
    assert S.kind == "sym" and S.sA.shape == (96,) and S.sB.shape == (4,) and int(S.qB.abs().max()) <= 7


@pytest.mark.parametrize("asym", [True, False])
def test_lqer_corrects_the_largest_errors_and_lowers_their_output_error(asym):
    knobs = dict(QUANT_EMBED_GPTQ=True, GPTQ_SDCLIP_K=4.0, LQER_RANK=4, LQER_TOP_K=3)
    plain = tiny_quantizer(**knobs).qstate()
    qz = tiny_quantizer(LQER_ENABLED=True, LQER_ASYM_ENABLED=asym, **knobs)
    fixed = qz.qstate()
    corrected = [n for n, t in fixed.items() if isinstance(t, tg.QuantTensor) and t.lqer is not None]
    norms = {n: float((qz.state[n].float() - plain[n].dequantize()).norm()) for n in qz.plan}
    assert sorted(corrected) == sorted(sorted(norms, key=lambda n: -norms[n])[:3])
    for name in corrected:
        assert fixed[name].lqer.kind == ("asym" if asym else "sym")
        assert torch.equal(fixed[name].q, plain[name].q)  # a correction on top, the integers unchanged
        W, H = qz.state[name].float(), qz.hessians.get(name, torch.eye(qz.state[name].size(1)))
        # k = 4 clips the outlier columns: a residual of low rank that the rank-4 fit takes back
        assert out_err(W, fixed[name], H) < 0.75 * out_err(W, plain[name], H), name  # asym: 0.59


def test_lqer_asym_falls_back_to_sym_when_b_does_not_split_into_groups():
    E = torch.randn(40, 100, generator=torch.Generator().manual_seed(0))
    assert tg.lqer_fit(E, make_hp(LQER_ASYM_ENABLED=True, LQER_RANK=4)).kind == "sym"  # 400 % 64 != 0
    assert tg.lqer_fit(E, make_hp(LQER_ASYM_ENABLED=True, LQER_RANK=4, LQER_ASYM_GROUP=50)).kind == "asym"


def round_trip(qz: tg.Quantizer, cap: int = 16_000_000, lines=None):
    blob, info = tg.fit_artifact(qz, 1000, (lines if lines is not None else []).append, cap)
    meta, qstate = tg.decode_artifact(blob, "mem")
    return blob, info, qstate


def test_lqer_and_awq_artifact_round_trip_is_bit_exact_and_loads():
    knobs = dict(QUANT_EMBED_GPTQ=True, GPTQ_SDCLIP_K=4.0, LQER_ENABLED=True, LQER_ASYM_ENABLED=True)
    qz = tiny_quantizer(AWQ_LITE_ENABLED=True, AWQ_LITE_GROUP_TOP_K=2, GATED_ATTN_QUANT_GATE=True, **knobs)
    sym = tiny_quantizer(LQER_ENABLED=True, LQER_ASYM_ENABLED=False, GPTQ_SDCLIP_K=4.0)
    for quantizer in (qz, sym):
        _, _, loaded = round_trip(quantizer)
        expected = quantizer.qstate()
        assert set(loaded) == set(expected)
        for name, t in expected.items():
            got = loaded[name]
            if isinstance(t, tg.QuantTensor):
                assert torch.equal(got.q, t.q) and torch.equal(got.scale, t.scale) and got.bits == t.bits
                assert (got.lqer is None) == (t.lqer is None) and (got.salient is None) == (t.salient is None)
                assert torch.equal(got.dequantize(), t.dequantize()), name
            else:
                assert torch.equal(got, t), name
        tg.load_artifact_weights(tg.GPT(quantizer.hp), loaded, "mem")
    lines: list[str] = []
    extras = [t for t in round_trip(qz, lines=lines)[2].values() if isinstance(t, tg.QuantTensor)]
    assert sum(t.lqer is not None for t in extras) == 3 and any(t.salient is not None for t in extras)
    logged = next(line for line in lines if line.startswith("lqer:"))
    assert logged.count(":asym") == 3 and "awq_groups:" in logged and "quant_gates:blocks.0.attn" in logged


def test_lqer_factors_cost_bytes_in_the_estimate_and_the_artifact_still_fits():
    knobs = dict(GPTQ_SDCLIP_K=4.0, LQER_RANK=8, LQER_TOP_K=4)
    plain, lqer = tiny_quantizer(**knobs), tiny_quantizer(LQER_ENABLED=True, **knobs)
    est = tg.SizeEstimate(plain.qstate(), None)
    factors = sum(tg.extra_bytes(t) for t in lqer.qstate().values() if isinstance(t, tg.QuantTensor))
    assert factors > 0 and est.raw(lqer.qstate()) == pytest.approx(est.raw(plain.qstate()) + factors)
    free, _, _ = round_trip(lqer)
    assert len(free) > len(round_trip(plain)[0])
    cap = len(free) + 1000 - 1500  # the fit ladder must find 1,500 bytes with the factors counted
    blob, info, loaded = round_trip(lqer, cap)
    assert len(blob) + 1000 <= cap and info["fit_int5_layers"]
    assert sum(t.lqer is not None for t in loaded.values() if isinstance(t, tg.QuantTensor)) == 4


# ----------------------------------------------------------------------------- AWQ-lite


def test_awq_lite_picks_the_group_with_loud_inputs_over_all_matrices():
    qz = tiny_quantizer(loudness=40.0, AWQ_LITE_ENABLED=True)  # every matrix's input cols-3 is loud
    assert len(qz.salient) == 1  # AWQ_LITE_GROUP_TOP_K=1: one group in the whole model, as PR #1908
    ((name, starts),) = qz.salient.items()
    cols = qz.state[name].size(1)
    assert starts == [cols - 64]  # the group holding the loud channel
    scores = {}  # every 64-column group of every GPTQ'd matrix (no tied embedding without its knob)
    for n in (n for n in qz.plan if tg.gptq_applies(n, qz.hessians, qz.hp)):
        rms = (qz.hessians[n].diagonal() / qz.hessians.rows[n]).sqrt()
        saliency = rms * qz.state[n].abs().mean(dim=0)
        scores.update({(n, s): float(saliency[s : s + 64].sum()) for s in range(0, saliency.numel(), 64)})
    assert "tok_emb.weight" not in {n for n, _ in scores}
    assert max(scores, key=scores.get) == (name, cols - 64)


def test_awq_lite_group_at_int8_lowers_the_output_error_of_its_matrix():
    W, H = outlier_layer(2, loud=tuple(range(64, 128)))
    hp = make_hp(AWQ_LITE_ENABLED=True)
    plain = tg.gptq_quantize(W, H, 6, hp, sdclip_k=12.85)
    awq = tg.gptq_quantize(W, H, 6, hp, sdclip_k=12.85, salient=(64,))
    assert torch.equal(awq.scale, plain.scale) and awq.salient.starts == (64,) and awq.salient.bits == 8
    assert torch.equal(awq.salient.scale, tg.fp16_scales(12.85 * W.std(dim=1), 8).half())  # PR #1908's s_hi
    assert int(awq.q[:, 64:].abs().max()) > tg.qmax(6) >= int(awq.q[:, :64].abs().max())
    assert out_err(W, awq, H) < 0.5 * out_err(W, plain, H)


def test_awq_lite_needs_hessian_row_counts_and_byte_packing():
    qz = tiny_quantizer()
    with pytest.raises(tg.ArtifactError, match="row counts"):
        tg.awq_lite_groups(qz.state, qz.plan, dict(qz.hessians), make_hp(AWQ_LITE_ENABLED=True))
    with pytest.raises(tg.ConfigError, match="QUANT_PACKING=bytes"):
        make_hp(AWQ_LITE_ENABLED=True, QUANT_PACKING="bits")


def test_collected_hessians_count_their_rows(cpu_runtime, shard_dir):
    hp = make_hp(VOCAB_SIZE=1024, MODEL_DIM=128, DATA_PATH=str(shard_dir), QUANT_EMBED_GPTQ=True)
    model = tg.GPT(hp)
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), cpu_runtime)
    hessians = tg.collect_hessians(model, loader, hp, cpu_runtime, batches=2)
    assert set(hessians.rows) == set(hessians)
    assert all(rows == 2 * hp.microbatch_tokens for rows in hessians.rows.values())


# ----------------------------------------------------------------------------- int8 attention gates


def test_quant_gate_stores_attention_gates_int8_per_row_and_the_ladder_leaves_them():
    qz = tiny_quantizer(GATED_ATTN_QUANT_GATE=True)
    assert qz.gates == {"blocks.0.attn.gate.weight", "blocks.1.attn.gate.weight"}
    gate = qz.qstate()["blocks.0.attn.gate.weight"]
    W = qz.state["blocks.0.attn.gate.weight"].float()
    assert gate.bits == 8 and torch.equal(gate.scale, (W.abs().amax(dim=1) / 127).half())  # R0419
    assert (W - gate.dequantize()).abs().max() <= gate.scale.float().max() / 2 + 1e-6
    assert "blocks.0.attn.gate.bias" not in qz.gates and all(g not in qz.plan for g in qz.gates)
    order = tg.prune_order(qz.qstate(), qz.hessians)
    assert not any(name.endswith(tg.GATE_SUFFIXES) for name in order[0])
    assert tg.quant_gate_names({"blocks.0.attn.attn_gate_w": torch.zeros(8, 12)}, qz.hp)  # R0427's name
    assert not tg.quant_gate_names({"blocks.0.attn.attn_gate_w": torch.zeros(2, 12)}, qz.hp)  # < 32 values
    off = tiny_quantizer()
    assert not off.gates and not isinstance(off.qstate()["blocks.0.attn.gate.weight"], tg.QuantTensor)
    sizes = [len(q.payload(q.qstate())) for q in (qz, off)]
    assert sizes[0] < sizes[1]


def test_defaults_write_no_new_fields():
    qz = tiny_quantizer()
    assert not qz.salient and not qz.gates and not qz.hp.lqer_enabled
    payload = qz.payload(qz.qstate())
    assert b'"lqer"' not in payload and b'"salient"' not in payload
