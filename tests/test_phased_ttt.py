"""Frontier evaluation passes: phased TTT (per-document LoRA + global SGD phases), document-independent
scoring (EVAL_MODE=doc) and the token-only n-gram tilt (NGRAM_TILT).

Legality is tested, not assumed: each pass scores every position exactly once (1-3 ranks), a score
never depends on a token the pass has not scored yet (in the pass's own scoring order), a global
phase trains only on documents already scored, the tilt's hint reads only the prefix, and the tilted
distribution sums to 1 over the whole vocabulary. Each legality check has a control: the same test
with the rule broken on purpose fails.
"""

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_
from test_eval import EVAL_KNOBS, V, random_tokens, val_data
from test_training import run_script, sample_shards, tiny_env  # noqa: F401 (sample_shards: a fixture)

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# 209 tokens, a BOS every 37: five 37-token documents and a 23-token one. Two documents a batch (three
# rounds on one rank), global phases after 2 and 4 documents, each phase 76 tokens in 32-token chunks.
PHASED = dict(
    TTT_MODE="phased",
    TTT_LORA_DOCS=2,
    TTT_LORA_CHUNK=8,
    TTT_LORA_LR=0.05,
    TTT_LORA_RANK=4,
    TTT_LORA_ALPHA=8.0,
    TTT_WARM_START_A=True,
    TTT_BETA1=0.0,
    TTT_BETA2=0.99,
    TTT_WEIGHT_DECAY=0.5,
    TTT_ADAM_EPS=1e-10,
    TTT_K_LORA=True,
    TTT_O_LORA=True,
    TTT_MLP_LORA=True,
    PHASED_TTT_PREFIX_DOCS=4,
    PHASED_TTT_NUM_PHASES=2,
    GLOBAL_TTT_CHUNK_TOKENS=32,
    GLOBAL_TTT_BATCH_SEQS=2,
    GLOBAL_TTT_LR=0.05,
)
SILENT = lambda _: None  # noqa: E731


def setup(tokens: np.ndarray, **knobs):
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], val_data(tokens)).float())
    if hp.ngram_tilt:
        tg.attach_tilt_hints(stream, hp)
    return hp, rt, model, stream


def run_phased(tokens: np.ndarray, log=SILENT, **knobs) -> dict:
    hp, rt, model, stream = setup(tokens, **dict(PHASED, **knobs))
    clock = tg.EvalClock(hp.eval_budget_s, rt)
    return tg.run_lora_pass(model, stream, hp, rt, clock, log, phased=True)


def run_doc(tokens: np.ndarray, **knobs) -> dict:
    hp, rt, model, stream = setup(tokens, **knobs)
    return tg.run_doc_pass(model, stream, tg.Pass("doc", hp.eval_window, hp.eval_stride, doc=True), hp, rt)


def scoring_order(tokens: np.ndarray, docs_per_batch: int = 2) -> list[tuple[int, int]]:
    spans = tg.document_spans(tokens, len(tokens) - 1)
    return [d for batch in tg.phased_batches(spans, docs_per_batch) for d in batch]


def perturbed(tokens: np.ndarray, positions, seed: int) -> np.ndarray:
    """`tokens` with the given positions redrawn (never to BOS, so documents keep their bounds)."""
    out = tokens.copy()
    fresh = np.random.default_rng(1000 + seed).integers(2, V, len(tokens))  # not random_tokens(seed)
    idx = np.array(sorted(positions), dtype=np.int64)
    idx = idx[(idx < len(tokens)) & (tokens[idx] != tg.BOS_ID)]
    out[idx] = fresh[idx]
    return out


# ---------------------------------------------------------------- phased TTT


def test_phased_scores_each_token_and_byte_once_and_runs_its_phases():
    tokens = random_tokens()
    lines = []
    r = run_phased(tokens, lines.append)
    assert r["tokens"] == len(tokens) - 1 and r["bytes"] == val_data(tokens).total_bytes
    assert r["scored_before_update"] is True and r["documents"] == 6
    assert r["ttt_phases_run"] == 2
    assert [line.split()[0] for line in lines if line.startswith("ttt_phase:")] == [
        "ttt_phase:1",
        "ttt_phase:2",
    ]
    assert "boundaries:2,4" in next(line for line in lines if line.startswith("ttt_phased:"))


def test_a_round_past_several_boundaries_runs_each_phase():
    """One batch of all six documents: the round passes both boundaries (2 and 4 documents)."""
    lines = []
    r = run_phased(random_tokens(), lines.append, TTT_LORA_DOCS=6)
    assert r["ttt_phases_run"] == 2
    docs = [line.split()[2] for line in lines if line.startswith("ttt_phase:")]
    assert docs == ["docs:2", "docs:4"]


def test_phase_plan_follows_the_record():
    """R0427: PHASED_TTT_PREFIX_DOCS=2500 over 3 phases -> boundaries 833, 1666, 2500 (its log)."""
    hp = make_hp(PHASED_TTT_PREFIX_DOCS=2500, PHASED_TTT_NUM_PHASES=3)
    assert tg.phase_boundaries(50000, hp) == [833, 1666, 2500]
    spans = [(0, 5), (5, 20), (20, 22), (22, 40), (40, 41)]
    batches = tg.phased_batches(spans, 2)
    assert batches == [[(22, 40), (5, 20)], [(0, 5), (20, 22)], [(40, 41)]]  # longest first
    assert tg.phase_documents(batches, 3) == [(22, 40), (5, 20), (0, 5)]


def later_in_scoring_order(tokens: np.ndarray, doc: int, upto: int) -> set[int]:
    """Token positions a score of document `doc` (in scoring order) at positions <= upto may not see:
    its own tokens after upto+1 (the target of upto) and every token of documents scored after it."""
    order = scoring_order(tokens)
    lo, hi = order[doc]
    out = set(range(upto + 2, hi + 1))
    for a, b in order[doc + 1 :]:
        out |= set(range(a, b + 1))
    return out


def earlier_positions(tokens: np.ndarray, doc: int, upto: int) -> list[int]:
    order = scoring_order(tokens)
    pos = [p for a, b in order[:doc] for p in range(a, b)]
    return pos + list(range(order[doc][0], upto + 1))


@pytest.mark.parametrize("doc,offset", [(0, 20), (1, 36), (2, 10), (3, 30), (4, 5)])
def test_phased_scores_never_see_tokens_scored_later(doc, offset):
    """Changing every token the pass scores after position p (later in its own document, or any
    document scored later, whatever its place in the stream) leaves every score up to p unchanged;
    documents 2 and 4 are scored after the phases trained on documents 0-1 and 0-3."""
    tokens = random_tokens()
    base = run_phased(tokens)["nll"]
    p = scoring_order(tokens)[doc][0] + offset
    changed = perturbed(tokens, later_in_scoring_order(tokens, doc, p), seed=doc)
    nll = run_phased(changed)["nll"]
    keep = torch.tensor(earlier_positions(tokens, doc, p))
    torch.testing.assert_close(nll[keep], base[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(nll, base)  # the probe can see a change


def test_phases_change_the_scores_of_later_documents():
    tokens = random_tokens()
    with_phases = run_phased(tokens)["nll"]
    without = run_phased(tokens, GLOBAL_TTT_LR=0.0)["nll"]
    first_two = torch.tensor([p for a, b in scoring_order(tokens)[:2] for p in range(a, b)])
    torch.testing.assert_close(with_phases[first_two], without[first_two], rtol=0, atol=1e-6)
    assert not torch.allclose(with_phases, without)


def test_a_phase_that_reads_unscored_documents_is_refused(monkeypatch):
    """Sabotage: the phase takes one more batch than has been scored."""
    real = tg.phase_documents
    monkeypatch.setattr(tg, "phase_documents", lambda batches, boundary: real(batches, boundary + 2))
    with pytest.raises(tg.LegalityError, match="not yet scored"):
        run_phased(random_tokens())


def test_scores_see_a_phase_that_reads_unscored_documents(monkeypatch):
    """Control for the causality test: with the check silenced, a phase training one batch ahead
    changes scores that came before that batch was scored."""
    real = tg.phase_documents
    monkeypatch.setattr(tg, "phase_documents", lambda batches, boundary: real(batches, boundary + 2))
    monkeypatch.setattr(tg, "check_phase_scored", lambda *a: None)
    tokens = random_tokens()
    base = run_phased(tokens)["nll"]
    p = scoring_order(tokens)[2][0] + 5  # document 2's scores follow phase 1, which read documents 2-3
    changed = perturbed(tokens, later_in_scoring_order(tokens, 2, p), seed=2)
    keep = torch.tensor(earlier_positions(tokens, 2, p))
    assert not torch.allclose(run_phased(changed)["nll"][keep], base[keep], rtol=0, atol=1e-6)


def test_an_adapter_trained_before_scoring_is_refused(monkeypatch):
    """Sabotage: the ledger is told a chunk was adapted on before it is scored."""
    real = tg.ScoreLedger.scored

    def adapt_first(self, lo, hi):
        if hi < self.n:
            self.adapted(lo, hi)
        return real(self, lo, hi)

    monkeypatch.setattr(tg.ScoreLedger, "scored", adapt_first)
    with pytest.raises(tg.LegalityError, match="before it was scored"):
        run_phased(random_tokens())


def test_lora_targets_follow_the_knobs():
    """Q, V and head by default; K, O and MLP on request; TTT_NO_QV_MASK (PR #1953) drops Q and V."""
    hp = make_hp(VOCAB_SIZE=V, **EVAL_KNOBS)
    model = tg.GPT(hp)
    L, d, kv = len(model.blocks), hp.model_dim, model.blocks[0].attn.c_k.out_features

    def shapes(**knobs):
        m = tg.GPT(hp)
        lora = tg.LoRASet(m, 3, make_hp(VOCAB_SIZE=V, TTT_LORA_RANK=4, **dict(EVAL_KNOBS, **knobs)), "cpu")
        return sorted((a.A.shape[2], a.B.shape[1]) for a in lora.adapters), m, lora

    default, _, _ = shapes()
    assert default == sorted([(d, d)] * L + [(d, kv)] * L + [(d, V)])
    full, m, lora = shapes(TTT_K_LORA=True, TTT_O_LORA=True, TTT_MLP_LORA=True)
    assert len(full) == 5 * L + 1 and len(lora.hooks) == 2 * L
    no_qv, m2, _ = shapes(TTT_K_LORA=True, TTT_O_LORA=True, TTT_MLP_LORA=True, TTT_NO_QV_MASK=True)
    assert len(no_qv) == 3 * L + 1 and all(b.attn.c_q.lora is None for b in m2.blocks)
    with torch.no_grad():
        for a in lora.adapters:
            a.B.normal_()
    x = torch.randint(0, V, (3, 16))
    adapted = m(x)
    lora.switch(False)  # as for a global phase: the plain model, any batch size
    plain = tg.GPT(hp)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    x5 = torch.randint(0, V, (5, 16))
    torch.testing.assert_close(m(x5), plain(x5), rtol=0, atol=0)
    lora.switch(True)
    torch.testing.assert_close(m(x), adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, plain(x))


def test_fresh_adapters_with_hooks_leave_the_model_unchanged():
    """B = 0: every adapter, the hooked O and MLP ones included, is a no-op until trained; alpha
    scales the output by alpha/rank."""
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **PHASED))
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    x = torch.randint(0, V, (2, 16))
    plain = model(x)
    lora = tg.LoRASet(model, 2, hp, "cpu")
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    a = lora.adapters[0]
    with torch.no_grad():
        a.B.normal_()
    inp = torch.randn(2, 5, a.A.shape[2])
    ref = (inp @ a.A.transpose(1, 2)) @ a.B.transpose(1, 2)
    torch.testing.assert_close(a(inp), ref * 8.0 / 4)  # TTT_LORA_ALPHA=8, TTT_LORA_RANK=4


def test_warm_start_keeps_a_and_zeroes_b():
    a = tg.BatchedLoRA(2, 8, 4, 3, torch.device("cpu"))
    with torch.no_grad():
        a.B.fill_(1.0)
    kept = a.A.detach().clone()
    a.reset(warm_a=True)
    assert torch.equal(a.A, kept) and not a.B.any()
    a.reset(warm_a=False)
    assert not torch.equal(a.A, kept)


def test_short_documents_get_the_short_chunk():
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, SHORT_TTT_CHUNK_SIZE=4, TTT_LORA_CHUNK=8))
    assert tg.doc_chunk(hp, 10) == 4 and tg.doc_chunk(hp, 16) == 8 and tg.doc_chunk(hp, 100) == 8
    tokens = random_tokens()
    short = run_phased(tokens, SHORT_TTT_CHUNK_SIZE=4, TTT_LORA_CHUNK=8, EVAL_SEQ_LEN=64)
    plain = run_phased(tokens, TTT_LORA_CHUNK=8, EVAL_SEQ_LEN=64)
    assert short["tokens"] == plain["tokens"] == len(tokens) - 1
    assert not torch.allclose(short["nll"], plain["nll"])


def test_phases_stop_on_the_clock_and_scoring_completes():
    tokens = random_tokens()
    lines = []
    hp, rt, model, stream = setup(tokens, **PHASED)
    r = tg.run_lora_pass(model, stream, hp, rt, tg.EvalClock(0.0, rt), lines.append, phased=True)
    assert r["tokens"] == len(tokens) - 1 and r["ttt_phases_run"] == 0
    assert any(line.startswith("ttt_stopped:eval_clock") and "mode:phased" in line for line in lines)


# ---------------------------------------------------------------- EVAL_MODE=doc


def test_doc_mode_scores_each_token_and_byte_once():
    tokens = random_tokens()
    r = run_doc(tokens)
    assert r["tokens"] == len(tokens) - 1 and r["bytes"] == val_data(tokens).total_bytes
    assert r["documents"] == 6 and r["scored_before_update"] is True


@pytest.mark.parametrize("doc", [0, 2, 5])
def test_doc_mode_scores_each_document_on_its_own(doc):
    """Every token outside a document (BOS kept) changed: its scores stay as they were."""
    tokens = random_tokens()
    lo, hi = tg.document_spans(tokens, len(tokens) - 1)[doc]
    base = run_doc(tokens)["nll"]
    changed = perturbed(tokens, set(range(len(tokens))) - set(range(lo, hi + 1)), seed=doc)
    nll = run_doc(changed)["nll"]
    torch.testing.assert_close(nll[lo:hi], base[lo:hi], rtol=0, atol=1e-6)
    assert not torch.allclose(nll, base)


def test_doc_mode_on_a_short_document_is_the_model_on_that_document_alone():
    tokens = random_tokens()
    hp, rt, model, stream = setup(tokens, EVAL_SEQ_LEN=64)
    r = tg.run_doc_pass(model, stream, tg.Pass("doc", 64, 8, doc=True), hp, rt)
    lo, hi = tg.document_spans(tokens, len(tokens) - 1)[1]
    x = torch.from_numpy(tokens[lo : hi + 1].astype(np.int64))[None]
    with torch.no_grad():
        alone = model(x[:, :-1], x[:, 1:], reduction="none")[0]
    torch.testing.assert_close(r["nll"][lo:hi], alone, rtol=0, atol=1e-5)


def test_doc_mode_on_one_long_document_is_the_sliding_pass():
    """No BOS after the first token: one document, slid over exactly as the sliding pass does."""
    tokens = random_tokens()
    tokens[1:][tokens[1:] == tg.BOS_ID] = 5
    doc = run_doc(tokens)
    hp, rt, model, stream = setup(tokens)
    sliding = tg.run_pass(
        model, stream, tg.Pass("sliding", 16, hp.eval_stride), hp, rt, tg.EvalClock(600, rt), SILENT
    )
    torch.testing.assert_close(doc["nll"], sliding["nll"], rtol=0, atol=1e-5)


def test_doc_windows_cover_each_position_once_inside_its_document():
    spans = [(0, 5), (5, 40), (40, 56), (56, 57)]
    w = tg.doc_windows(spans, 16, 4)
    hits = np.zeros(57, dtype=int)
    for start, length, offset, count in w:
        doc = next((lo, hi) for lo, hi in spans if lo <= start < hi)
        assert doc[0] <= start and start + length <= doc[1]  # never reads past its document
        hits[start + offset : start + offset + count] += 1
    assert (hits == 1).all()


# ---------------------------------------------------------------- NGRAM_TILT

TILT = dict(NGRAM_TILT=True, NGRAM_TILT_MIN_ORDER=1, NGRAM_TILT_MAX_ORDER=3, NGRAM_TILT_ORDER_STRIDE=1)


def repetitive_tokens(n: int = 16 * 13 + 1, seed: int = 0) -> np.ndarray:
    """A few phrases repeated with noise, so short contexts recur and give hints."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, V, 6) for _ in range(4)]
    out = np.concatenate([phrases[i] for i in rng.integers(0, 4, n // 6 + 2)])[:n]
    noise = rng.random(n) < 0.15
    out[noise] = rng.integers(2, V, int(noise.sum()))
    out[::37] = tg.BOS_ID
    return out


def reference_hints(tokens: np.ndarray, n: int, order: int):
    """The record kernel's token expert, one position at a time: lookup (best token, its count, the
    context count) before the update with the position's own target."""
    ctx_count, pair_count, best = {}, {}, {}
    hint, best_count, seen = np.full(n, -1), np.zeros(n, dtype=int), np.zeros(n, dtype=int)
    for i in range(order - 1, n):
        ctx, tgt = tuple(tokens[i - order + 1 : i + 1]), int(tokens[i + 1])
        if ctx in ctx_count:
            hint[i], best_count[i], seen[i] = best[ctx][0], best[ctx][1], ctx_count[ctx]
        ctx_count[ctx] = ctx_count.get(ctx, 0) + 1
        pair_count[ctx, tgt] = pair_count.get((ctx, tgt), 0) + 1
        if ctx not in best or tgt == best[ctx][0]:
            best[ctx] = (tgt, pair_count[ctx, tgt])
        elif pair_count[ctx, tgt] > best[ctx][1]:
            best[ctx] = (tgt, pair_count[ctx, tgt])
    return hint, best_count, seen


@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_hints_match_the_kernels_sequential_update(order):
    tokens = repetitive_tokens(600)
    n = len(tokens) - 1
    got = tg.order_hints(torch.from_numpy(tokens.astype(np.int64)), n, order)
    for g, want in zip(got, reference_hints(tokens, n, order), strict=True):
        np.testing.assert_array_equal(g.numpy(), want)
    assert (got[0] >= 0).sum() > 50  # the stream does give hints


def test_hints_read_only_the_prefix():
    tokens = repetitive_tokens(600)
    t = torch.from_numpy(tokens.astype(np.int64))
    hp = make_hp(VOCAB_SIZE=V, **TILT)
    hints, betas = tg.tilt_hints(t, len(tokens) - 1, hp)
    for cut in (50, 300, 598):
        changed = t.clone()
        changed[cut + 1 :] = torch.from_numpy(repetitive_tokens(600, seed=cut)[cut + 1 :].astype(np.int64))
        h, b = tg.tilt_hints(changed, len(tokens) - 1, hp)
        torch.testing.assert_close(h[: cut + 1], hints[: cut + 1], rtol=0, atol=0)
        torch.testing.assert_close(b[: cut + 1], betas[: cut + 1], rtol=0, atol=0)
    tg.check_prefix_only(t, len(tokens) - 1, hp)


def test_a_hint_that_reads_its_target_is_refused(monkeypatch):
    """Sabotage: the hint of position i is its target token i+1."""
    monkeypatch.setattr(
        tg, "tilt_hints", lambda tokens, n, hp: (tokens[1 : n + 1].clone(), torch.ones(n).double())
    )
    with pytest.raises(tg.LegalityError, match="reads a token after it"):
        setup(repetitive_tokens(), **TILT)


def test_tilted_distribution_sums_to_one_over_the_vocabulary():
    """p'(v) = p(v) e^(beta [v = h]) / Z over all V tokens sums to 1, and its value at the target is
    what tilted_nll scores."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, V, generator=g, dtype=torch.float64) * 3
    y, h = torch.randint(0, V, (200,), generator=g), torch.randint(-1, V, (200,), generator=g)
    h[:50] = y[:50]  # some hints are right
    beta = torch.rand(200, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(logits, -1)
    tilt = torch.where((torch.arange(V)[None] == h[:, None]) & (h[:, None] >= 0), beta[:, None], 0.0)
    full = torch.log_softmax(logp + tilt, -1)  # the tilted distribution, normalised numerically
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    hint_logp = tg.hint_log_probs(logits, nll, y, h)
    closed = tg.tilted_nll(nll, hint_logp, y, h, beta).double()
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(closed, -full.gather(1, y[:, None]).squeeze(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("net", ["sliding", "doc", "phased"])
def test_tilt_after_any_pass_scores_each_token_once_and_is_causal(net):
    tokens = repetitive_tokens()

    def run(tok):
        hp, rt, model, stream = setup(tok, **dict(PHASED if net == "phased" else {}, **TILT))
        if net == "doc":
            r = tg.run_doc_pass(model, stream, tg.Pass("doc", 16, hp.eval_stride, doc=True), hp, rt)
        elif net == "phased":
            r = tg.run_lora_pass(model, stream, hp, rt, tg.EvalClock(600, rt), SILENT, phased=True)
        else:
            r = tg.run_pass(
                model, stream, tg.Pass("sliding", 16, hp.eval_stride), hp, rt, tg.EvalClock(600, rt), SILENT
            )
        return r, tg.run_tilt_pass(r, stream, hp, rt)

    r, tilted = run(tokens)
    assert tilted["tokens"] == len(tokens) - 1 and tilted["tilt_hints"] > 20
    assert tilted["bytes"] == r["bytes"] and not torch.allclose(tilted["nll"], r["nll"])
    if net != "phased":  # stream-order passes: a later change leaves earlier tilted scores alone
        t = 120
        changed = tokens.copy()
        changed[t + 1 :] = repetitive_tokens(seed=5)[t + 1 :]
        torch.testing.assert_close(run(changed)[1]["nll"][:t], tilted["nll"][:t], rtol=0, atol=1e-6)


def test_score_model_runs_tilt_after_the_ttt_pass_and_before_the_mixer(cpu_runtime):
    knobs = dict(PHASED, **TILT, NGRAM_MIX=True, EVAL_MODE="doc")
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    torch.manual_seed(0)
    out = tg.score_model(randomize_(tg.GPT(hp)), val_data(repetitive_tokens()), hp, cpu_runtime, SILENT)
    assert out["eval_mode"] == "phased+ngram_tilt+ngram_mix" and out["ttt_mode"] == "phased"
    assert {"val_bpb_flat", "val_bpb_doc", "val_bpb_phased", "val_bpb_ngram_tilt"} <= set(out)
    assert out["scored_tokens"] == len(repetitive_tokens()) - 1 and out["scored_before_update"] is True


def test_defaults_leave_the_new_passes_off():
    hp = make_hp()
    assert (hp.ttt_mode, hp.eval_mode, hp.ngram_tilt) == ("chunked", "sliding", False)
    assert (hp.ttt_lora_alpha, hp.ttt_warm_start_a, hp.ttt_weight_decay) == (0.0, False, 0.0)


# ---------------------------------------------------------------- 1-3 ranks


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_phased_doc_and_tilt_score_each_val_token_once_on_1_to_3_ranks(nproc, sample_shards, tmp_path):  # noqa: F811
    env = tiny_env(
        sample_shards,
        RUN_ID=f"phased{nproc}",
        ITERATIONS="2",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="1536",
        MICROBATCH_TOKENS="256",
        EVAL_MODE="doc",
        EVAL_STRIDE="64",
        TTT_MODE="phased",
        TTT_LORA_CHUNK="64",
        TTT_LORA_DOCS="2",
        TTT_K_LORA="1",
        TTT_O_LORA="1",
        TTT_MLP_LORA="1",
        TTT_WARM_START_A="1",
        PHASED_TTT_PREFIX_DOCS="8",
        PHASED_TTT_NUM_PHASES="2",
        GLOBAL_TTT_CHUNK_TOKENS="2048",
        NGRAM_TILT="1",
        NGRAM_TILT_MIN_ORDER="2",
        NGRAM_TILT_MAX_ORDER="4",
        NGRAM_TILT_ORDER_STRIDE="1",
    )
    final, log = run_script(env, tmp_path, nproc=nproc)
    assert final["world_size"] == nproc
    assert final["eval_mode"] == "phased+ngram_tilt" and final["ttt_mode"] == "phased"
    assert final["scored_before_update"] is True
    assert final["scored_tokens"] == final["val_tokens"] and final["scored_bytes"] == final["val_bytes"]
    for stage in ("flat", "doc", "phased", "ngram_tilt"):
        assert f"final_eval:{stage} " in log
    assert "ttt_phase:2 " in log


# ---------------------------------------------------------------- compile warmup


def is_val_window(row: torch.Tensor, tokens: np.ndarray) -> bool:
    """Whether `row` occurs as consecutive tokens of the val stream."""
    k = len(row)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, k)
    return bool((windows == row.numpy()).all(1).any())


@pytest.mark.parametrize("ttt", [False, True])
def test_compile_warmup_never_sees_validation_tokens(monkeypatch, ttt):
    """With a compiled trunk the pass warms it up before scoring (issue raised on PR #1530: a TTT
    warmup on val tokens trains/compiles on unscored data). Here compile_for_eval returns a wrapper,
    so the warmup runs on CPU: its rows are random tokens, not val windows, and it is the only
    trunk call before the first scored batch."""
    calls, adds = [], []
    monkeypatch.setattr(tg, "compile_for_eval", lambda fn, hp, rt: lambda x: calls.append(x.clone()) or fn(x))
    real_add = tg.Scores.add
    monkeypatch.setattr(tg.Scores, "add", lambda self, *a: adds.append(1) or real_add(self, *a))
    tokens = random_tokens()
    hp, rt, model, stream = setup(tokens)
    p = tg.Pass("chunked" if ttt else "sliding", 16, hp.eval_stride, ttt=ttt)
    tg.run_pass(model, stream, p, hp, rt, tg.EvalClock(600, rt), SILENT)
    warmup, first = calls[0], calls[1]
    assert not any(is_val_window(row, tokens) for row in warmup)
    assert all(is_val_window(row, tokens) for row in first[:1])  # the scoring batches are val windows
    assert len(calls) - 1 == len(adds)  # besides the warmup, a val forward only where it is scored


def test_phased_compiled_forward_warms_up_on_random_tokens_and_matches_eager(monkeypatch):
    """compile_for_lora as on a GPU (dynamo, dynamic shapes; CPU eager backend): the warmup forwards
    random tokens only, and the compiled pass scores as the eager one does."""
    import torch._dynamo

    torch._dynamo.reset()
    calls = []

    def compile_on_cpu(fn, hp, rt):
        compiled = torch.compile(fn, backend="eager", dynamic=True)
        return lambda x: calls.append(x.clone()) or compiled(x)

    tokens = random_tokens()
    eager = run_phased(tokens)["nll"]
    monkeypatch.setattr(tg, "compile_for_lora", compile_on_cpu)
    lines = []
    compiled = run_phased(tokens, lines.append)["nll"]
    torch._dynamo.reset()
    assert any(line.startswith("ttt_compile_warmup_s:") and "widths:8,16" in line for line in lines)
    warmups = calls[:2]
    assert [w.shape[1] for w in warmups] == [8, 16]
    assert not any(is_val_window(row, tokens) for w in warmups for row in w)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_no_new_evaluation_forward_runs_with_autograd(forwards, cpu_runtime):
    """Forwards under autograd only where they train: adapters attached (phased LoRA) or the model in
    training mode (a global phase); the doc pass and the tilt build no graph."""
    calls = forwards
    knobs = dict(PHASED, **TILT, EVAL_MODE="doc")
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    torch.manual_seed(0)
    out = tg.score_model(randomize_(tg.GPT(hp)), val_data(repetitive_tokens()), hp, cpu_runtime, SILENT)
    assert out["eval_mode"] == "phased+ngram_tilt"
    assert not [c for c in calls if c[0] and not c[1] and not c[2]], "an evaluation forward built a graph"
    assert any(c[0] and c[1] for c in calls)  # the global phases do train


def test_records_tool_knows_the_new_passes():
    """`python -m records validate` accepts the eval_mode names these passes log and ranks their
    final_eval lines: doc with sliding, phased and ngram_tilt with TTT."""
    from records import dialects, rules

    for mode in ("doc", "phased", "doc+ngram_tilt", "phased+ngram_tilt+ngram_mix", "lora+ngram_tilt"):
        assert rules.eval_passes(mode) is not None, mode
    assert rules.eval_passes("phased+phased") is None

    def stage(label):
        return next(cls for rx, cls in dialects._STAGE_RES if rx.match(label))

    assert stage("doc") == dialects.SLIDING
    assert stage("phased") == stage("ngram_tilt") == dialects.TTT
