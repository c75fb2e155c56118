"""Evaluation modes: sliding windows, score-first chunked and LoRA TTT, and the n-gram mixture.

Legality is tested, not assumed: every mode is causal (later tokens never change earlier scores),
scores every position exactly once on 1-3 ranks, adapts only on already-scored tokens (and the
ledger check fires when that order is broken), and the mixture is a normalised distribution.
"""

import numpy as np
import pytest
import torch
from conftest import make_hp, randomize_
from test_training import run_script, sample_shards, tiny_env  # noqa: F401 (sample_shards: a fixture)

import train_gpt as tg

V = 64
MODES = {
    "flat": dict(ttt=False, ngram=False, flat=True),
    "sliding": dict(ttt=False, ngram=False),
    "ttt": dict(ttt=True, ngram=False),
    "ngram": dict(ttt=False, ngram=True),
    "ttt_ngram": dict(ttt=True, ngram=True),
    "lora": dict(ttt=False, ngram=False, lora=True),
    "lora_ngram": dict(ttt=False, ngram=True, lora=True),
}
EVAL_KNOBS = dict(
    TRAIN_SEQ_LEN=16,
    EVAL_STRIDE=4,
    TTT_CHUNK_TOKENS=40,
    TTT_EPOCHS=2,
    TTT_BATCH_SEQS=2,
    TTT_LR=0.05,
    NGRAM_BUCKETS=32,
    NGRAM_WARMUP_TOKENS=0,  # the mixture from the first chunk on (the default waits for 10,000 tokens)
    EVAL_BATCH_SEQS=3,
    TTT_LORA_CHUNK=40,
    TTT_LORA_DOCS=3,
    TTT_LORA_LR=0.05,
)


def val_data(tokens: np.ndarray) -> tg.ValData:
    """Val tokens with a made-up byte table (2 bytes a token, a space after non-BOS for even ids)."""
    base = torch.full((V,), 2, dtype=torch.int16)
    space = torch.arange(V) % 2 == 0
    boundary = torch.arange(V) == tg.BOS_ID
    vd = tg.ValData(tokens, base, space, boundary, 0)
    t = torch.from_numpy(tokens.astype(np.int64))
    vd.total_bytes = int(tg.token_bytes(t[:-1], t[1:], vd).sum())
    return vd


def random_tokens(n: int = 16 * 13 + 1, seed: int = 0) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(2, V, n)
    tokens[::37] = tg.BOS_ID
    return tokens


def run_mode(mode: str, tokens: np.ndarray, **knobs) -> dict:
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **knobs))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    spec = dict(MODES[mode])
    seq, stride = (hp.train_seq_len, hp.train_seq_len) if spec.pop("flat", False) else (16, hp.eval_stride)
    stream_val = val_data(tokens)
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], stream_val).float())
    clock = tg.EvalClock(600.0, rt)
    ngram = spec.pop("ngram")
    if spec.get("lora"):
        net = tg.run_lora_pass(model, stream, hp, rt, clock, lambda _: None)
    else:
        net = tg.run_pass(model, stream, tg.Pass(mode, seq, stride, **spec), hp, rt, clock, lambda _: None)
    return dict(tg.run_mixer_pass(net, stream, hp, rt), net=net) if ngram else net


@pytest.mark.parametrize(
    "n,seq,stride",
    [
        (100, 16, 4),
        (16, 16, 4),
        (10, 16, 4),
        (17, 16, 4),
        (99, 16, 16),
        (99, 16, 7),
        (50, 8, 64),
        (64, 16, 5),
    ],
)
def test_windows_score_every_position_once_with_the_most_context(n, seq, stride):
    starts, n_scored, T = tg.window_plan(n, seq, stride)
    hits = np.zeros(n, dtype=int)
    for s, k in zip(starts, n_scored, strict=True):
        assert s >= 0 and s + T <= n and 0 < k <= T
        hits[s + T - k : s + T] += 1
        if s > 0:  # every later window gives its scored tokens at least T - stride of context
            assert T - k >= T - min(stride, T)
    assert (hits == 1).all()
    assert T == min(seq, n)


def test_flat_pass_equals_training_time_validation(cpu_runtime, torch_single_thread):
    tokens = random_tokens()
    hp = make_hp(VOCAB_SIZE=V, TRAIN_SEQ_LEN=16, VAL_BATCH_TOKENS=48)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    val = val_data(tokens)
    loss, bpb = tg.evaluate(model, val, hp, cpu_runtime)
    result = run_mode("flat", tokens)
    assert result["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert result["val_bpb"] == pytest.approx(bpb, rel=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_scores_each_token_and_byte_exactly_once(mode, torch_single_thread):
    tokens = random_tokens()
    result = run_mode(mode, tokens)
    assert result["tokens"] == len(tokens) - 1
    assert result["bytes"] == val_data(tokens).total_bytes
    assert result["scored_before_update"] is True
    net = result.get("net", result)  # the network pass a mixer result mixed
    assert net["tokens"] == result["tokens"] and net["bytes"] == result["bytes"]
    if MODES[mode]["ttt"]:
        assert 0 < net["ttt_chunks_trained"] == net["ttt_chunks"] - 1  # the last one never
    if MODES[mode].get("lora"):
        assert net["documents"] == int((tokens[:-1] == tg.BOS_ID).sum())


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_is_causal(mode, torch_single_thread):
    """Changing the tokens after position t leaves every score of a target <= t unchanged."""
    tokens = random_tokens()
    base = run_mode(mode, tokens)["nll"]
    for t in (5, 37, 90, 150):  # inside the first window, at a chunk edge, mid-stream, late
        changed = tokens.copy()
        changed[t + 1 :] = random_tokens(len(tokens), seed=t)[t + 1 :]
        nll = run_mode(mode, changed)["nll"]
        torch.testing.assert_close(nll[:t], base[:t], rtol=0, atol=1e-6)
        assert not torch.allclose(nll[t:], base[t:])  # the check can see a change


ADAPTIVE = ["ttt", "lora", "ngram", "ttt_ngram", "lora_ngram"]
T = 16  # the window of every pass run_mode runs (TTT training sequences, LoRA scoring windows)


def chunk_ends(mode: str, tokens: np.ndarray, per_part: int = 2) -> list[int]:
    """The last target token (hi: the chunk is positions [lo, hi)) of the first `per_part` chunks
    each adaptive part of the mode adapts on after scoring them (one code path serves every chunk)."""
    n, spec, chunk = len(tokens) - 1, MODES[mode], EVAL_KNOBS["TTT_CHUNK_TOKENS"]
    parts = []
    if spec["ttt"]:
        parts.append(
            [hi for *_, hi in tg.chunk_bounds(tg.window_plan(n, T, EVAL_KNOBS["EVAL_STRIDE"]), chunk)]
        )
    if spec["ngram"]:
        parts.append(list(range(chunk, n, chunk)))
    if spec.get("lora"):  # within a document: its adapter carries over to the next chunk
        c = min(EVAL_KNOBS["TTT_LORA_CHUNK"], T)
        parts.append([k for lo, hi in tg.document_spans(tokens, n) for k in range(lo + c, hi, c)])
    return sorted({e for ends in parts for e in ends[:per_part] if e < n})


def boundary_leaks(mode: str, tokens: np.ndarray, first: bool = False) -> list[int]:
    """Probes just past each chunk end hi of chunk_ends: the tokens from hi+1 (the next chunk's
    first target), from hi+2 and from hi+T-1 (as far as a T-token window from inside the chunk
    reaches) on are changed. Returns the first changed token p of each probe that changed the score
    of a position whose target comes before p: the chunk's, any earlier chunk's or the next chunk's
    first p-1-hi (a chunk's own scores come before its adaptation; a read past its end shows in the
    next chunk). `first`: stop at the first leak."""
    base, leaks = run_mode(mode, tokens)["nll"], []
    probes = sorted({p for hi in chunk_ends(mode, tokens) for p in (hi + 1, hi + 2, hi + T - 1)})
    for p in (p for p in probes if p < len(tokens)):
        changed = tokens.copy()
        changed[p:] = random_tokens(len(tokens), seed=p)[p:]  # BOS stays where it was
        nll = run_mode(mode, changed)["nll"]
        assert not torch.allclose(nll[p - 1 :], base[p - 1 :])  # the probe can see a change
        if not torch.allclose(nll[: p - 1], base[: p - 1], rtol=0, atol=1e-6):
            leaks.append(p)
            if first:
                break
    return leaks


@pytest.mark.parametrize("mode", ADAPTIVE)
def test_every_adaptive_mode_is_causal_just_past_each_chunk_end(mode, torch_single_thread):
    assert boundary_leaks(mode, random_tokens()) == []


def read_past_chunk_end(real):
    """A TTT step whose training sequences run a full T tokens from their start, up to T-1 tokens
    past the scored chunk's end (the ledger still sees the chunk's own span)."""

    def wrapped(self, tokens, starts, hi):
        return real(self, tokens, starts, min(hi + self.seq_len - 1, len(tokens) - 1))

    return wrapped


def count_past_chunk_end(real):
    """A mixer that counts up to T-1 tokens past the chunk it adapts on."""

    def wrapped(self, tokens, lo, hi, ledger):
        ledger.adapted(lo, hi)
        silent = tg.ScoreLedger(len(tokens))
        silent.scored_upto = len(tokens)
        return real(self, tokens, lo, min(hi + T - 1, len(tokens) - 1), silent)

    return wrapped


@pytest.mark.parametrize("mode", ["ttt", "ngram"])
def test_boundary_probes_see_an_adaptation_that_reads_past_its_chunk(mode, monkeypatch, torch_single_thread):
    """Control for the boundary probes: a chunk's training window (TTT) or counts (mixer) reading
    past the chunk's end leaks into the next chunk's scores, and the probes see it."""
    monkeypatch.setattr(tg.ChunkTTT, "step", read_past_chunk_end(tg.ChunkTTT.step))
    monkeypatch.setattr(tg.NgramMixer, "adapt", count_past_chunk_end(tg.NgramMixer.adapt))
    assert boundary_leaks(mode, random_tokens(), first=True) != []


def train_ahead(real):
    """A TTT that trains on the next chunk too: the ledger must refuse it."""

    def wrapped(self, tokens, c, lo, hi, ledger):
        return real(self, tokens, c, lo, min(hi + (hi - lo), len(tokens) - 1), ledger)

    return wrapped


def test_causality_check_sees_a_ttt_that_trains_ahead(monkeypatch, torch_single_thread):
    """Control for the causality test: with the ledger silenced, training on the next chunk before
    scoring it changes earlier scores when later tokens change."""
    monkeypatch.setattr(tg.ScoreLedger, "adapted", lambda self, lo, hi: None)
    monkeypatch.setattr(tg.ChunkTTT, "train_chunk", train_ahead(tg.ChunkTTT.train_chunk))
    tokens, t = random_tokens(), 90
    changed = tokens.copy()
    changed[t + 1 :] = random_tokens(len(tokens), seed=t)[t + 1 :]
    base, nll = run_mode("ttt", tokens)["nll"], run_mode("ttt", changed)["nll"]
    assert not torch.allclose(nll[:t], base[:t], rtol=0, atol=1e-6)


def test_ledger_fires_on_a_ttt_that_trains_ahead(monkeypatch, torch_single_thread):
    monkeypatch.setattr(tg.ChunkTTT, "train_chunk", train_ahead(tg.ChunkTTT.train_chunk))
    with pytest.raises(tg.LegalityError, match="before it was scored"):
        run_mode("ttt", random_tokens())


def test_ledger_refuses_adapting_before_scoring():
    ledger = tg.ScoreLedger(100)
    ledger.scored(0, 40)
    ledger.adapted(0, 40)
    with pytest.raises(tg.LegalityError, match="before it was scored"):
        ledger.adapted(40, 80)
    with pytest.raises(tg.LegalityError, match="does not continue"):
        ledger.scored(50, 80)
    ledger.scored(40, 100)
    assert ledger.held


def test_ledger_refuses_scoring_with_a_state_adapted_on_the_span():
    ledger = tg.ScoreLedger(100)
    ledger.scored(0, 40)
    ledger.adapted(0, 40)
    ledger.scored_upto = 30  # as if positions 30..39 were re-scored after the update
    with pytest.raises(tg.LegalityError, match="already adapted"):
        ledger.scored(30, 60)


def test_score_before_update_check_fires_when_the_order_is_broken(monkeypatch, torch_single_thread):
    """Swap the mixer's order: adapt on each chunk before it is scored."""
    real_score, real_adapt = tg.NgramMixer.score, tg.NgramMixer.adapt
    pending = {}

    def remember(self, tokens, lo, hi, ledger):
        pending["ledger"] = ledger
        return real_adapt(self, tokens, lo, hi, ledger)

    def adapt_first(self, net_logp, tokens, lo, hi):
        if "ledger" in pending:
            real_adapt(self, tokens, lo, hi, pending["ledger"])
        return real_score(self, net_logp, tokens, lo, hi)

    monkeypatch.setattr(tg.NgramMixer, "adapt", remember)
    monkeypatch.setattr(tg.NgramMixer, "score", adapt_first)
    with pytest.raises(tg.LegalityError, match="before it was scored"):
        run_mode("ngram", random_tokens())


def test_mixture_is_a_normalised_distribution(torch_single_thread):
    """Each count expert is a distribution over all V tokens at every context, the weights the
    scores use sum to 1, so the mixture of these with the network's softmax is one."""
    mixer = tg.NgramMixer(V, 32, 0.1, True, torch.device("cpu"))
    tokens = torch.from_numpy(random_tokens().astype(np.int64))
    ledger = tg.ScoreLedger(len(tokens) - 1)
    mixer.score(torch.zeros(len(tokens) - 1), tokens, 0, 100)
    ledger.scored(0, 100)
    mixer.adapt(tokens, 0, 100, ledger)
    assert [int(counts.sum()) for counts, _ in mixer.tables] == [100, 100, 100]
    prev2, prev = torch.randint(0, V, (50,)), torch.randint(0, V, (50,))
    every = every_count_prob(mixer, mixer.rows(prev2, prev))
    torch.testing.assert_close(every.sum(0), torch.ones(50, 3, dtype=torch.float64), rtol=0, atol=1e-9)
    net = torch.log_softmax(torch.randn(50, V, dtype=torch.float64) * 4, -1)
    w = mixer.log_weights().exp()
    mixed = w[0] * net.exp().T + every @ w[1:]  # p_mix(v) at 50 positions, (V, 50)
    torch.testing.assert_close(mixed.sum(0), torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-9)
    assert mixer.norm_checks == 100


def every_count_prob(mixer: tg.NgramMixer, rows: list[torch.Tensor]) -> torch.Tensor:
    """(V, n, 3): each count expert's probability of every token at the positions of `rows`."""
    n = len(rows[0])
    return torch.stack([mixer.count_log_probs(rows, torch.full((n,), v)) for v in range(V)]).exp()


def test_count_experts_stay_distributions_past_2_24_tokens(torch_single_thread):
    """A float32 total stops growing at 2^24 = 16,777,216 while its counts grow (the official 62M val
    tokens would take the unigram expert's sum to about 3.7). Here the tables count 2^20 tokens, are
    multiplied by 16 in bulk (as if that chunk had been counted 16 times: 2^24 tokens), and count
    the chunk once more through `adapt`: every expert still sums to 1 at every context, the counts
    are exact, and the NGRAM_CHECK_NORM check passes."""
    chunk = 1 << 20
    mixer = tg.NgramMixer(V, 32, 0.1, True, torch.device("cpu"))
    tokens = torch.from_numpy(random_tokens(chunk + 1, seed=3).astype(np.int64))
    for repeat in (16, 1):
        ledger = tg.ScoreLedger(chunk)
        ledger.scored(0, chunk)
        mixer.adapt(tokens, 0, chunk, ledger)
        for counts, totals in mixer.tables:
            counts *= repeat
            totals *= repeat
    contexts = [torch.zeros(V, dtype=torch.int64), torch.arange(V), torch.arange(V) % 32]  # every row
    every = every_count_prob(mixer, contexts)
    torch.testing.assert_close(every.sum(0), torch.ones(V, 3, dtype=torch.float64), rtol=0, atol=1e-9)
    assert [int(totals.sum()) for _, totals in mixer.tables] == [17 * chunk] * 3
    assert [int(counts.sum()) for counts, _ in mixer.tables] == [17 * chunk] * 3
    mixer.score(torch.full((chunk,), -float(np.log(V))), tokens, 0, 1000)  # the run-time check
    assert mixer.norm_checks == 1000


def test_runtime_check_fires_on_weights_the_scores_use_unnormalised(monkeypatch, torch_single_thread):
    """NGRAM_CHECK_NORM checks the mixture that is scored: weights exp(log_w) used without the
    softmax make it sum to other than 1 over the vocabulary."""
    monkeypatch.setattr(tg.NgramMixer, "log_weights", lambda self: self.log_w.double())
    run_mode("ngram", random_tokens())  # the debug check is off by default
    with pytest.raises(tg.LegalityError, match="the mixture sums to"):
        run_mode("ngram", random_tokens(), NGRAM_CHECK_NORM=True)


def test_runtime_check_fires_on_a_score_that_is_not_the_mixtures(torch_single_thread):
    """A scored probability that is not the mixture's entry at the target (e.g. mixed with other
    weights than the ones checked) is refused."""
    mixer = tg.NgramMixer(V, 32, 0.1, True, torch.device("cpu"))
    tokens = torch.from_numpy(random_tokens().astype(np.int64))
    net_logp = torch.log_softmax(torch.randn(len(tokens) - 1, V), -1)[:, 0]
    prev2, prev, tgt = mixer.context(tokens, 0, 50)
    rows = mixer.rows(prev2, prev)
    logp = torch.cat([net_logp[:50, None].double(), mixer.count_log_probs(rows, tgt)], -1)
    log_w = mixer.log_weights()
    mixer.check(rows, tgt, logp, log_w, torch.logsumexp(logp + log_w, -1))  # what `score` scores
    wrong = torch.logsumexp(logp + torch.log_softmax(torch.zeros(4, dtype=torch.float64), 0), -1)
    with pytest.raises(tg.LegalityError, match="not the mixture's probability"):
        mixer.check(rows, tgt, logp, log_w, wrong)


def test_runtime_normalisation_check_fires_on_an_improper_expert(monkeypatch, torch_single_thread):
    """NGRAM_CHECK_NORM catches an unnormalised expert (PR #886's bug: count ratios without the
    smoothing mass in the denominator are not a distribution)."""
    monkeypatch.setattr(tg.NgramMixer, "normaliser", lambda self, k, row: self.tables[k][1][row] + 1.0)
    run_mode("ngram", random_tokens())  # the debug check is off by default
    with pytest.raises(tg.LegalityError, match="sums to"):
        run_mode("ngram", random_tokens(), NGRAM_CHECK_NORM=True)


def test_mixer_normalisation_check_counts_every_scored_position(torch_single_thread):
    tokens = random_tokens()
    result = run_mode("ngram", tokens, NGRAM_CHECK_NORM=True)
    assert result["norm_checks"] == len(tokens) - 1


def test_ttt_leaves_the_callers_model_unchanged(cpu_runtime, torch_single_thread):
    hp = make_hp(VOCAB_SIZE=V, **EVAL_KNOBS)
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tg.score_model(model, val_data(random_tokens()), hp, cpu_runtime, lambda _: None)
    assert out["ttt_mode"] == "chunked" and out["eval_mode"] == "chunked"
    assert out["val_bpb"] == out["val_bpb_chunked"] and {"val_bpb_flat", "val_bpb_sliding"} <= set(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_budget_falls_back_to_cheaper_modes_and_logs_why(cpu_runtime, torch_single_thread):
    hp = make_hp(VOCAB_SIZE=V, EVAL_BUDGET_S=0.0, NGRAM_MIX=True, **EVAL_KNOBS)
    torch.manual_seed(0)
    lines = []
    out = tg.score_model(randomize_(tg.GPT(hp)), val_data(random_tokens()), hp, cpu_runtime, lines.append)
    assert out["eval_mode"] == "flat" and out["ttt_mode"] == "none"  # flat always runs: every token scored
    fallbacks = [line for line in lines if line.startswith("eval_fallback:")]
    names = [f.split()[0].split(":")[1] for f in fallbacks]
    assert names == ["sliding", "chunked", "ngram_mix"]
    assert all("reason:over_budget" in f for f in fallbacks)


RANKS_MODES = [(1, "chunked"), (2, "chunked"), (3, "chunked"), (2, "lora"), (3, "lora")]


@pytest.mark.parametrize("nproc,ttt_mode", RANKS_MODES)
def test_every_mode_scores_each_val_token_once_on_1_to_3_ranks(nproc, ttt_mode, sample_shards, tmp_path):  # noqa: F811
    lora = ttt_mode == "lora"
    env = tiny_env(
        sample_shards,
        RUN_ID=f"eval{nproc}{ttt_mode}",
        TTT_MODE=ttt_mode,
        TTT_LORA_CHUNK="512",
        TTT_LORA_DOCS="4",
        ITERATIONS="2",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="1536",
        MICROBATCH_TOKENS="256",
        EVAL_STRIDE="32",
        TTT_CHUNK_TOKENS="6144",
        TTT_EPOCHS="1",
        TTT_FREEZE_BLOCKS="2",
        NGRAM_MIX="1",
        NGRAM_BUCKETS="256",
    )
    final, log = run_script(env, tmp_path, nproc=nproc)
    assert final["world_size"] == nproc
    net = ttt_mode
    assert final["eval_mode"] == ttt_mode + "+ngram_mix"
    assert final["ttt_mode"] == ttt_mode and final["val_bpb"] == final["val_bpb_ngram_mix"]
    assert final["scored_before_update"] is True
    assert final["scored_tokens"] == final["val_tokens"] and final["scored_bytes"] == final["val_bytes"]
    for stage in ("flat", "sliding", net, "ngram_mix"):
        assert f"final_eval:{stage} " in log
    if not lora:
        assert final["ttt_chunks_trained"] == 2  # 16,256 val tokens: 3 chunks, the last never trained on


def test_lora_adapters_change_scores_only_after_a_documents_first_chunk(torch_single_thread):
    """A fresh adapter is a no-op (B = 0): the first chunk of every document (TTT_LORA_CHUNK=40 is
    clamped to the 16-token window) scores as the plain doc-isolated model; later chunks see the
    trained adapter."""
    tokens = random_tokens()
    trained = run_mode("lora", tokens)["nll"]
    untrained = run_mode("lora", tokens, TTT_LORA_LR=0.0)["nll"]
    spans = tg.document_spans(tokens, len(tokens) - 1)
    firsts = torch.tensor([i for lo, hi in spans for i in range(lo, min(lo + 16, hi))])
    torch.testing.assert_close(trained[firsts], untrained[firsts], rtol=0, atol=1e-6)
    assert not torch.allclose(trained, untrained)


def test_documents_are_dealt_to_ranks_by_length():
    spans = [(0, 50), (50, 60), (60, 100), (100, 130), (130, 131)]
    shares = [tg.deal_documents(spans, tg.Runtime(r, 2, r, torch.device("cpu"), 1, "t")) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == spans
    loads = [sum(hi - lo for lo, hi in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 10


def test_mixer_leaves_the_network_alone_until_its_tables_warm_up(torch_single_thread):
    tokens = random_tokens()
    alone = run_mode("sliding", tokens)["nll"]
    warming = run_mode("ngram", tokens, NGRAM_WARMUP_TOKENS=80)["nll"]
    first_chunk = 40  # TTT_CHUNK_TOKENS: the tables hold 40 tokens after it, 80 after the second
    torch.testing.assert_close(warming[: 2 * first_chunk], alone[: 2 * first_chunk], rtol=0, atol=1e-5)
    assert not torch.allclose(warming[2 * first_chunk :], alone[2 * first_chunk :])
