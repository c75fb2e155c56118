"""Phased TTT as R0427 runs it beyond shared adapters and plain phase windows (R0427 =
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611):

- TTT_LORA_PER_LOOP_SLOT: each repeat of a looped block (depth recurrence) has adapters of its own;
  the record sizes them by the executed block order (num_slots = len(encoder) + len(decoder)).
- GLOBAL_TTT_RESPECT_DOC_BOUNDARIES: a global phase's step is one row per rank in which a token
  attends only within its own document, cut every EVAL_SEQ_LEN tokens from its start (the record's
  _build_cu_seqlens(bos_pos, n, device, eval_seq_len, 64)).

Both off reproduce the pass as it was; both on keep the pass legal (every token scored once, before
any update that saw it; a phase reading unscored documents is refused).
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import make_hp, randomize_
from test_eval import EVAL_KNOBS, V, random_tokens, val_data
from test_frontier_optim import reference_varlen
from test_phased_ttt import (
    PHASED,
    SILENT,
    earlier_positions,
    later_in_scoring_order,
    perturbed,
    scoring_order,
)
from test_training import run_script, sample_shards, tiny_env  # noqa: F401 (sample_shards: a fixture)

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Three blocks, block 1 run three times: executed order 0 1 1 1 2, five slots.
LOOPED = dict(NUM_LAYERS=3, NUM_LOOPS=2, LOOP_START=1, LOOP_END=1)
ALL_TARGETS = dict(TTT_K_LORA=True, TTT_O_LORA=True, TTT_MLP_LORA=True)
RECORD = dict(TTT_LORA_PER_LOOP_SLOT=True, GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=True)


def looped_model(**knobs):
    hp = make_hp(VOCAB_SIZE=V, **dict(EVAL_KNOBS, **dict(LOOPED, **knobs)))
    torch.manual_seed(0)
    model = randomize_(tg.GPT(hp))
    model.looping = True  # as after training past ENABLE_LOOPING_AT
    return hp, model


def run_looped_phased(tokens: np.ndarray, looping: bool = True, log=SILENT, **knobs) -> dict:
    """run_phased on the looped model (with looping on or off)."""
    hp, model = looped_model(**dict(PHASED, **knobs))
    model.looping = looping
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    t = torch.from_numpy(tokens.astype(np.int64))
    stream = tg.EvalStream(t, tg.token_bytes(t[:-1], t[1:], val_data(tokens)).float())
    return tg.run_lora_pass(model, stream, hp, rt, tg.EvalClock(hp.eval_budget_s, rt), log, phased=True)


def adapter_params(lora: tg.LoRASet) -> int:
    return sum(t.numel() for t in lora.params())


# ---------------------------------------------------------------- TTT_LORA_PER_LOOP_SLOT


def test_per_loop_slot_adapters_scale_with_the_slots():
    """Off: one set per block (3). On: one per executed slot (5); blocks run once keep one set, the
    head keeps one adapter. Without looping the slots are the blocks."""
    counts = {}
    for per_slot in (False, True):
        for looping in (False, True):
            hp, model = looped_model(**ALL_TARGETS, TTT_LORA_PER_LOOP_SLOT=per_slot)
            model.looping = looping
            lora = tg.LoRASet(model, 2, hp, torch.device("cpu"))
            counts[per_slot, looping] = (len(lora.adapters), adapter_params(lora))
    shared, slotted = counts[False, True], counts[True, True]
    assert counts[False, False] == counts[True, False] == shared
    assert shared[0] == 5 * 3 + 1 and slotted[0] == 5 * 5 + 1
    hp, model = looped_model(**ALL_TARGETS)
    lora = tg.LoRASet(model, 2, hp, torch.device("cpu"))
    head_params = lora.adapters[-1].A.numel() + lora.adapters[-1].B.numel()
    assert (slotted[1] - head_params) * 3 == (shared[1] - head_params) * 5


def test_per_loop_slot_counts_the_records_slots():
    """R0427's layout (11 blocks, 3-5 looped twice more): 17 slots, as len(encoder_indices) +
    len(decoder_indices) in its BatchedTTTLoRA."""
    hp = make_hp(
        VOCAB_SIZE=V,
        NUM_LAYERS=11,
        NUM_LOOPS=2,
        LOOP_START=3,
        LOOP_END=5,
        XSA_LAST_N=11,
        TTT_LORA_PER_LOOP_SLOT=True,
    )
    model = tg.GPT(hp)
    model.looping = True
    lora = tg.LoRASet(model, 1, hp, torch.device("cpu"))
    assert len(lora.adapters) == 2 * 17 + 1  # Q and V of every slot, and the head
    looped = model.blocks[4].attn.c_q.lora
    assert isinstance(looped, tg.LoopSlots) and len(looped.slots) == 3
    assert isinstance(model.blocks[2].attn.c_q.lora, tg.BatchedLoRA)


def set_b(lora: tg.LoRASet, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lora.adapters:
            a.B.copy_(torch.randn(a.B.shape, generator=gen))


def test_per_loop_slot_is_the_shared_adapter_when_the_slots_are_equal():
    """Every slot a copy of the shared adapter: the same logits (bit for bit), and the shared
    adapter's gradient is the sum of its slots' gradients."""
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    hp, shared_model = looped_model(**ALL_TARGETS)
    shared = tg.LoRASet(shared_model, 2, hp, torch.device("cpu"))
    set_b(shared)
    hp_slot, slot_model = looped_model(**ALL_TARGETS, TTT_LORA_PER_LOOP_SLOT=True)
    slotted = tg.LoRASet(slot_model, 2, hp_slot, torch.device("cpu"))
    # LoRASet creates, per block, Q, K, V, O and MLP adapters (each once per repeat), then the head
    repeats = [1, 3, 1]
    shared_of = [a for b in range(3) for a in shared.adapters[5 * b : 5 * b + 5] for _ in range(repeats[b])]
    owners = dict(zip(map(id, slotted.adapters), shared_of + [shared.adapters[-1]], strict=True))
    with torch.no_grad():
        for s in slotted.adapters:
            s.A.copy_(owners[id(s)].A)
            s.B.copy_(owners[id(s)].B)
    out_shared, out_slot = shared_model(x), slot_model(x)
    torch.testing.assert_close(out_slot, out_shared, rtol=0, atol=0)
    out_shared.square().mean().backward()
    out_slot.square().mean().backward()
    summed = {id(a): torch.zeros_like(a.B) for a in shared.adapters}
    for s in slotted.adapters:
        summed[id(owners[id(s)])] += s.B.grad
    for a in shared.adapters:
        torch.testing.assert_close(summed[id(a)], a.B.grad, rtol=1e-5, atol=1e-6)


def test_per_loop_slot_repeats_get_different_gradients():
    hp, model = looped_model(**ALL_TARGETS, TTT_LORA_PER_LOOP_SLOT=True)
    lora = tg.LoRASet(model, 2, hp, torch.device("cpu"))
    set_b(lora)
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    looped = [model.blocks[1].attn.c_q.lora, model.blocks[1].attn.c_v.lora]
    for slots in looped:
        grads = [torch.cat([s.A.grad.flatten(), s.B.grad.flatten()]) for s in slots.slots]
        assert all(g.abs().sum() > 0 for g in grads)
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.allclose(grads[i], grads[j]), (i, j)
        assert slots.visit == 0  # a whole forward leaves the counter at repeat 0


def test_per_loop_slot_off_or_without_loops_is_the_shared_pass():
    """Off on a looped model, and on without looping, give the shared-adapter pass bit for bit; on
    with looping it differs."""
    tokens = random_tokens()
    off = run_looped_phased(tokens)["nll"]
    on_unlooped = run_looped_phased(tokens, looping=False, TTT_LORA_PER_LOOP_SLOT=True)["nll"]
    off_unlooped = run_looped_phased(tokens, looping=False)["nll"]
    torch.testing.assert_close(on_unlooped, off_unlooped, rtol=0, atol=0)
    on = run_looped_phased(tokens, TTT_LORA_PER_LOOP_SLOT=True)["nll"]
    assert not torch.allclose(on, off)


class EagerCounter:
    """Dynamo's eager backend, counting the graphs it is handed: each is a (re)compile. (aot_eager
    with dynamic shapes takes minutes on a shared CPU.)"""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_per_loop_slot_compiled_forward_adds_no_recompiles():
    """compile_for_lora's dynamic-shape forward (forwards and backwards at several widths, with an
    eager global phase in between, as the phased pass runs it): per-slot adapters compile as often
    as shared ones (once), without graph breaks, and the compiled forward matches eager."""
    compiles = {}
    for per_slot in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        hp, model = looped_model(**ALL_TARGETS, TTT_LORA_RANK=3, TTT_LORA_PER_LOOP_SLOT=per_slot)
        model.eval()
        model.requires_grad_(False)
        lora = tg.LoRASet(model, 2, hp, torch.device("cpu"))
        set_b(lora)
        backend = EagerCounter()
        fwd = torch.compile(model.forward, backend=backend, dynamic=True)
        gen = torch.Generator().manual_seed(0)
        for width in (9, 16, 11, 5):
            if width == 11:  # a global phase: adapters off, the eager model trains
                lora.switch(False)
                model(torch.randint(0, V, (2, 16), generator=gen))
                lora.switch(True)
            x = torch.randint(0, V, (2, width), generator=gen)
            out = fwd(x)
            out.square().mean().backward()
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        compiles[per_slot] = backend.compiles
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert not breaks, breaks
    torch._dynamo.reset()
    assert compiles[True] == compiles[False] == 1, compiles  # dynamic widths: one graph for all


def test_record_phased_pass_compiles_only_in_its_warmup(monkeypatch):
    """The whole phased pass with both knobs, its forward compiled as compile_for_lora does (dynamic
    shapes; dynamo's eager backend on CPU): every graph is made in the warmup, none after, though
    the global phases switch the adapters off and the model to one-row document attention and back;
    the scores match the eager pass."""
    torch._dynamo.reset()
    backend = EagerCounter()
    monkeypatch.setattr(
        tg, "compile_for_lora", lambda fn, hp, rt: torch.compile(fn, backend=backend, dynamic=True)
    )
    tokens = random_tokens()
    marks = []
    compiled = run_looped_phased(tokens, log=lambda line: marks.append((line, backend.compiles)), **RECORD)
    torch._dynamo.reset()
    warm = next(n for line, n in marks if line.startswith("ttt_compile_warmup_s:"))
    assert compiled["ttt_phases_run"] == 2 and backend.compiles == warm, (warm, backend.compiles)
    monkeypatch.undo()
    torch.testing.assert_close(compiled["nll"], run_looped_phased(tokens, **RECORD)["nll"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- GLOBAL_TTT_RESPECT_DOC_BOUNDARIES


def record_segment_starts(x: np.ndarray, max_doc_len: int) -> list[int]:
    """R0427's _build_cu_seqlens(bos_pos, len(x), device, max_doc_len) boundaries, without padding."""
    bos = [int(i) for i in np.flatnonzero(x == tg.BOS_ID)]
    if not bos or bos[0] != 0:
        bos = [0] + bos
    starts = []
    for a, b in zip(bos, bos[1:] + [len(x)], strict=True):
        starts.extend(range(a, b, max_doc_len) if max_doc_len > 0 else [a])
    return starts + [len(x)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_doc_len", [0, 16, 7])
def test_document_layout_cuts_documents_as_the_record(monkeypatch, seed, max_doc_len):
    """Segments start at BOS, at the row's start, and every max_doc_len tokens from a document's
    start, as the record's boundaries (FA3's cu_seqlens; SDPA's mask keeps each token inside its
    segment)."""
    n = 640  # room in the static cu_seqlens (max_doc_len 0): 1 + 640/64 documents; at most 9 here
    rng = np.random.default_rng(seed)
    x = rng.integers(2, V, n)
    x[rng.choice(n, size=8, replace=False)] = tg.BOS_ID
    x[100:400] = np.where(x[100:400] == tg.BOS_ID, 5, x[100:400])  # a long document, cut many times
    ids = torch.from_numpy(x)[None]
    want = record_segment_starts(x, max_doc_len)
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "fa3")
    cu = tg.document_layout(ids, max_doc_len).tolist()
    if max_doc_len:  # a global phase: exactly the record's boundaries
        assert cu == want
    else:  # the static size of a compiled forward, padded with the row length
        assert cu[: len(want)] == want and set(cu[len(want) :]) <= {n}
    monkeypatch.setattr(tg, "ATTENTION_BACKEND", "sdpa")
    mask = tg.document_layout(ids, max_doc_len)[0, 0]
    seg = np.searchsorted(np.array(want), np.arange(n), side="right")
    ref = (seg[:, None] == seg[None, :]) & np.tri(n, dtype=bool)
    assert torch.equal(mask, torch.from_numpy(ref))


DOC_MODEL = dict(SMEAR_GATE_FORM="input", BIGRAM_BUCKETS=16, VALUE_RESIDUAL=True)


def row_nll(model: tg.GPT, row: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(row)[None]
    with torch.no_grad():
        return model(t[:, :-1], t[:, 1:], reduction="none")[0]


def test_a_documents_phase_loss_does_not_depend_on_its_row_mates():
    """Inside documents_within (as a global phase trains): a document's per-token loss is the same,
    bit for bit, whatever documents share its row, and equals its loss alone in a row (up to RoPE's
    fp32 absolute-position rounding: it is relative only in exact arithmetic). Control: plain
    windows see the neighbours."""
    hp, model = looped_model(**DOC_MODEL)
    rng = np.random.default_rng(0)

    def doc(n):
        d = rng.integers(2, V, n)
        d[0] = tg.BOS_ID
        return d

    a, d, b = doc(13), doc(12), doc(9)
    a2, b2 = doc(13), doc(9)
    span = slice(len(a), len(a) + len(d) - 1)  # d's positions, each predicting a token of d
    row, row2 = np.concatenate([a, d, b]), np.concatenate([a2, d, b2])
    with tg.documents_within(model, hp.eval_window):
        shared, shared2 = row_nll(model, row)[span], row_nll(model, row2)[span]
        alone = row_nll(model, d)
    torch.testing.assert_close(shared, shared2, rtol=0, atol=0)
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-5)
    assert not model.varlen_attn and model.max_doc_len == 0  # restored
    assert not torch.allclose(row_nll(model, row)[span], row_nll(model, row2)[span])


def test_fa3_cu_seqlens_train_the_phase_as_the_sdpa_mask(monkeypatch):
    """The FA3 path (flash_attn_varlen_func in plain torch) of a one-row phase step, a document cut
    twice at EVAL_SEQ_LEN included, gives the SDPA mask's losses."""
    hp, model = looped_model(**DOC_MODEL)
    row = np.random.default_rng(5).integers(2, V, 60)
    row[[0, 7, 50]] = tg.BOS_ID  # documents of 7, 43 (cut at 16 and 32) and 10 tokens
    with tg.documents_within(model, 0):  # documents, uncut
        uncut = row_nll(model, row)
    with tg.documents_within(model, hp.eval_window):
        sdpa = row_nll(model, row)
        monkeypatch.setattr(tg, "ATTENTION_BACKEND", "fa3")
        monkeypatch.setattr(tg, "flash_attn_varlen_func", reference_varlen)
        fa3 = row_nll(model, row)
    torch.testing.assert_close(fa3, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncut[: 7 + 16], sdpa[: 7 + 16], rtol=0, atol=0)
    assert not torch.allclose(uncut[7 + 16 : 50], sdpa[7 + 16 : 50])  # the cuts matter


def phase_calls(monkeypatch, **knobs) -> tuple[list, tg.GPT]:
    """Runs one global phase over the first four scored documents; returns (ids shape, varlen,
    max_doc_len) of each trunk call, and the trained model."""
    calls = []
    hidden = tg.GPT.hidden

    def spy(self, ids):
        calls.append((tuple(ids.shape), self.varlen_attn, self.max_doc_len))
        return hidden(self, ids)

    monkeypatch.setattr(tg.GPT, "hidden", spy)
    hp, model = looped_model(**dict(PHASED, **knobs))
    tokens = random_tokens()
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    stream = tg.EvalStream(torch.from_numpy(tokens.astype(np.int64)), torch.ones(len(tokens) - 1))
    trained = tg.global_phase(model, stream, scoring_order(tokens)[:4], hp, rt)
    assert trained == 128  # 4 x 37 tokens + 4 next BOS = 152, in chunks of 32: the last never trained
    return calls, model


def test_phase_steps_are_one_row_per_rank_with_the_knob(monkeypatch):
    """GLOBAL_TTT_BATCH_SEQS=2 sequences of 16: the record's step is one 32-token row attending
    within documents cut every 16; off, two 16-token rows as the model attends."""
    on, model = phase_calls(monkeypatch, GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=True)
    assert on == [((1, 32), True, 16)] * 4
    assert not model.varlen_attn and model.max_doc_len == 0
    off, _ = phase_calls(monkeypatch)
    assert off == [((2, 16), False, 0)] * 4


def test_one_row_phase_is_the_rows_when_documents_break_at_the_rows(monkeypatch):
    """One document with no BOS inside it: the record's cut every EVAL_SEQ_LEN from its start falls
    on the rows' starts, so with nothing reading across a cut but attention (no smear, no bigram)
    the one-row phase trains the model the rows train (VARLEN_ATTN rows), up to float rounding."""
    knobs = dict(PHASED, SMEAR_GATE=False, BIGRAM_BUCKETS=0)
    tokens = np.random.default_rng(3).integers(2, V, 129)
    tokens[0] = tg.BOS_ID
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "t")
    stream = tg.EvalStream(torch.from_numpy(tokens), torch.ones(128))
    states = []
    for within in (False, True):
        hp, model = looped_model(
            **dict(knobs, VARLEN_ATTN=not within, GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=within)
        )
        tg.global_phase(model, stream, [(0, 127)], hp, rt)
        states.append(model.state_dict())
    for name, rows in states[0].items():
        torch.testing.assert_close(states[1][name], rows, rtol=1e-4, atol=1e-5, msg=name)
    hp, fresh = looped_model(**knobs)
    assert not torch.allclose(
        fresh.state_dict()["blocks.0.attn.c_q.weight"], states[1]["blocks.0.attn.c_q.weight"]
    )


# ---------------------------------------------------------------- legality with both knobs on


def test_record_phased_scores_each_token_once_and_runs_its_phases():
    tokens = random_tokens()
    lines = []
    r = run_looped_phased(tokens, log=lines.append, **RECORD)
    assert r["tokens"] == len(tokens) - 1 and r["bytes"] == val_data(tokens).total_bytes
    assert r["scored_before_update"] is True and r["ttt_phases_run"] == 2
    plain = run_looped_phased(tokens, TTT_LORA_PER_LOOP_SLOT=True)["nll"]
    assert not torch.allclose(r["nll"], plain)  # the phases train differently within documents


@pytest.mark.parametrize("doc,offset", [(1, 36), (2, 10), (4, 5)])
def test_record_phased_scores_never_see_tokens_scored_later(doc, offset):
    tokens = random_tokens()
    base = run_looped_phased(tokens, **RECORD)["nll"]
    p = scoring_order(tokens)[doc][0] + offset
    changed = perturbed(tokens, later_in_scoring_order(tokens, doc, p), seed=doc)
    nll = run_looped_phased(changed, **RECORD)["nll"]
    keep = torch.tensor(earlier_positions(tokens, doc, p))
    torch.testing.assert_close(nll[keep], base[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(nll, base)


def test_record_phase_that_reads_unscored_documents_is_refused(monkeypatch):
    """Sabotage: the phase takes one more batch than has been scored."""
    real = tg.phase_documents
    monkeypatch.setattr(tg, "phase_documents", lambda batches, boundary: real(batches, boundary + 2))
    with pytest.raises(tg.LegalityError, match="not yet scored"):
        run_looped_phased(random_tokens(), **RECORD)


def test_record_scores_see_a_phase_that_reads_unscored_documents(monkeypatch):
    """Control: with the check silenced, a within-documents phase training one batch ahead changes
    scores that came before that batch was scored (the causality probe can see it)."""
    real = tg.phase_documents
    monkeypatch.setattr(tg, "phase_documents", lambda batches, boundary: real(batches, boundary + 2))
    monkeypatch.setattr(tg, "check_phase_scored", lambda *a: None)
    tokens = random_tokens()
    base = run_looped_phased(tokens, **RECORD)["nll"]
    p = scoring_order(tokens)[2][0] + 5
    changed = perturbed(tokens, later_in_scoring_order(tokens, 2, p), seed=2)
    keep = torch.tensor(earlier_positions(tokens, 2, p))
    assert not torch.allclose(
        run_looped_phased(changed, **RECORD)["nll"][keep], base[keep], rtol=0, atol=1e-6
    )


def test_record_preset_runs_both_and_no_longer_lists_them():
    preset = tg.PRESETS["record_0427"]
    assert preset["TTT_LORA_PER_LOOP_SLOT"] == "1" and preset["GLOBAL_TTT_RESPECT_DOC_BOUNDARIES"] == "1"
    missing = tg.PRESET_MISSING.get("record_0427", ())
    assert "ttt_lora_per_loop_slot" not in missing and "global_ttt_respect_doc_boundaries" not in missing
    hp = make_hp()
    assert not hp.ttt_lora_per_loop_slot and not hp.global_ttt_respect_doc_boundaries


def test_record_knobs_on_two_ranks_score_each_val_token_once(sample_shards, tmp_path):  # noqa: F811
    """The whole script on 2 gloo ranks, looping on from the start: per-slot adapters and one-row
    document-respecting phases (each rank its share of a step) score every val token once."""
    env = tiny_env(
        sample_shards,
        RUN_ID="phased_record",
        ITERATIONS="2",
        MAX_WALLCLOCK_SECONDS="0",
        TRAIN_BATCH_TOKENS="1536",
        MICROBATCH_TOKENS="256",
        NUM_LAYERS="3",
        NUM_LOOPS="1",
        LOOP_START="1",
        LOOP_END="1",
        ENABLE_LOOPING_AT="0",
        TTT_MODE="phased",
        TTT_LORA_CHUNK="64",
        TTT_LORA_DOCS="2",
        PHASED_TTT_PREFIX_DOCS="8",
        PHASED_TTT_NUM_PHASES="2",
        GLOBAL_TTT_CHUNK_TOKENS="512",
        GLOBAL_TTT_BATCH_SEQS="3",
        TTT_LORA_PER_LOOP_SLOT="1",
        GLOBAL_TTT_RESPECT_DOC_BOUNDARIES="1",
    )
    final, log = run_script(env, tmp_path, nproc=2)
    assert final["world_size"] == 2 and final["ttt_mode"] == "phased"
    assert final["scored_before_update"] is True
    assert final["scored_tokens"] == final["val_tokens"] and final["scored_bytes"] == final["val_bytes"]
    assert "ttt_phase:2 " in log and "final_eval:phased " in log
