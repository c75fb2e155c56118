"""Bytes, export time and quantisation error of the frontier records' quantisation knobs, one at a time.

    NUM_LAYERS=3 COMPRESSOR=zstd python3 bench/frontier_quant.py   # env knobs set the model
    COMPRESSOR=brotli python3 bench/frontier_quant.py --calib-tokens 16384 --containers
    COMPRESSOR=brotli VARLEN_ATTN=0 FUSED_MLP_ENABLED=0 python3 bench/frontier_quant.py \
        --preset record_0427 --calib-tokens 16384        # R0427's shape (vocab 8192, MLP 4x, loops)

Two stand-ins, neither a trained model:
- synthetic (the default): the model with heavy-tailed (Student-t, nu=3) matrices that keep each
  one's std, a few outlier input columns per matrix (as trained matrices have), non-zero gates, and
  a synthetic Hessian per matrix and for the tied embedding (activations with log-normal channel
  scales).
- `--calib-tokens N`: the export's own path at full size: the weights of the export reserve's dry
  run (train_gpt.trained_like_weights: every quantised tensor a Student-t nu=3 draw with its std),
  gates drawn N(0, 0.05), and Hessians collected as a run collects them (collect_hessians, looped
  blocks on, as at the end of training) over N tokens of DATA_PATH's training shards.
`--preset NAME` takes the shape (and every other knob) from PRESETS[NAME], the quantisation knobs
excepted: every variant starts from BASE. Env knobs win over both.

Each variant is BASE (GPTQ int6 with the clip search, int8 round-to-nearest embeddings, nothing
else) plus the knobs it names, as R0427 / PR #1908 run them, compressed as the export compresses
(COMPRESSOR, COMPRESS_STREAMS, COMPRESS_THREADS). Per variant: the compressed model bytes, with the
counted code (CODE_BYTES_MODE); CPU seconds (a shared machine's wall time measures its load) of
calibration, of GPTQ (incl. AWQ-lite's choice and LQER) and of compression (the sum of the stream
jobs: one core; the longest job: a core per job), and their sum `export_cpu_s`; the Hessian-weighted
output error of every quantised matrix relative to the baseline's (`rel_err`); the relative weight
error sqrt(sum |W - Q|^2 / sum |W|^2) of the quantised tensors (`rel_weight_err`); for LQER /
AWQ-lite the error of the matrices they touch, before and after. So that a full-size table takes
minutes, not an hour, each tensor is quantised and each stream compressed once per distinct input
and reused by the variants that give the same one (LQER, gates, AWQ-lite change a few tensors, not
all); a reused one counts the CPU seconds it first took, as an export computing it would spend
(`gptq_new_cpu_s`: what this variant computed itself; `compress_jobs_reused` of `compress_jobs`
were reused, so `compress_wall_s` is a real wall time only where none was).
`--containers`: after every variant, the stack's and the baseline's payloads again as one stream
(COMPRESS_STREAMS=0) and as streams at the COMPRESS_THREADS 1 and 2 the variant did not use,
compressed for real: bytes, wall seconds, jobs' CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

# The baseline every variant starts from, whatever the defaults or the preset say.
BASE = dict(
    QUANT_METHOD="gptq",
    QUANT_BITS="6",
    QUANT_EMBED_BITS="8",
    QUANT_EMBED_GPTQ="0",
    GPTQ_SDCLIP_K="0",
    MLP_CLIP_SIGMAS="0",
    ATTN_CLIP_SIGMAS="0",
    EMBED_CLIP_SIGMAS="0",
    GATED_ATTN_QUANT_GATE="0",
    LQER_ENABLED="0",
    LQER_ASYM_ENABLED="0",
    AWQ_LITE_ENABLED="0",
)
CLIPS = dict(MLP_CLIP_SIGMAS="11.5", ATTN_CLIP_SIGMAS="13.0", EMBED_CLIP_SIGMAS="14.0", GPTQ_SDCLIP_K="12.85")
EMBED7 = dict(QUANT_EMBED_BITS="7", QUANT_EMBED_GPTQ="1", EMBED_CLIP_SIGMAS="14.0")
LQER = dict(LQER_ENABLED="1", LQER_RANK="4", LQER_TOP_K="3")
VARIANTS = {
    "baseline": {},
    "sdclip_per_class": CLIPS,
    "embed_int7_gptq": EMBED7,
    "lqer_sym": dict(LQER, LQER_FACTOR_BITS="4"),
    "lqer_asym": dict(LQER, LQER_ASYM_ENABLED="1", LQER_ASYM_GROUP="64"),
    "awq_lite": dict(
        AWQ_LITE_ENABLED="1", AWQ_LITE_BITS="8", AWQ_LITE_GROUP_TOP_K="1", AWQ_LITE_GROUP_SIZE="64"
    ),
    "quant_gate": dict(GATED_ATTN_QUANT_GATE="1"),
    "r0427_stack": dict(CLIPS, **EMBED7, **LQER, LQER_ASYM_ENABLED="1", GATED_ATTN_QUANT_GATE="1"),
}
CONTAINERS = ((False, 1), (True, 1), (True, 2))  # (COMPRESS_STREAMS, COMPRESS_THREADS)


def variant_hp(knobs: dict[str, str], preset: str = "") -> tg.Hyperparameters:
    """BASE, then the env (so NUM_LAYERS=2 or COMPRESSOR=lzma apply), then the variant's knobs, over
    PRESETS[preset] as defaults."""
    env = {**BASE, **os.environ, **knobs}
    if preset:
        env["RUN_PRESET"] = preset
    return tg.Hyperparameters(env)


def shape_model(hp: tg.Hyperparameters) -> tg.GPT:
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    model.looping = hp.num_loops > 0  # as at the end of training, when the export runs
    return model


def stand_in(hp: tg.Hyperparameters) -> tuple[dict[str, torch.Tensor], tg.Hessians]:
    model = shape_model(hp)
    gen = torch.Generator().manual_seed(hp.seed)
    hessians = tg.Hessians()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in tg.quant_plan(model, hp):
                draw = torch.distributions.StudentT(3.0).sample(p.shape)
                p.copy_(draw / draw.std() * max(float(p.std()), 0.02))
                p[:, torch.randperm(p.size(1), generator=gen)[:3]] *= 8
                if name != "bigram.embed.weight":  # a lookup table has no input
                    d = p.size(1)
                    x = torch.randn(2 * d, d, generator=gen) * torch.exp(torch.randn(d, generator=gen))
                    hessians[name], hessians.rows[name] = x.T @ x, 2 * d
            elif name.endswith(tg.GATE_SUFFIXES):
                p.normal_(0, 0.05, generator=gen)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, hessians


def calibrated_stand_in(hp: tg.Hyperparameters, tokens: int) -> tuple[dict, tg.Hessians, float, float]:
    """The reserve probe's trained-like weights, non-zero gates, and Hessians over `tokens` training
    tokens (MICROBATCH_TOKENS per forward); returns the state, the Hessians, and their wall and CPU
    seconds."""
    model = shape_model(hp)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "bench")
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), rt)
    batches = max(1, tokens // hp.microbatch_tokens)
    gen = torch.Generator().manual_seed(hp.seed)
    with tg.trained_like_weights(model, hp), torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(tg.GATE_SUFFIXES):  # zero at init (R0427): nothing to quantise
                p.normal_(0, 0.05, generator=gen)
        t0, cpu0 = time.perf_counter(), time.process_time()
        hessians = tg.collect_hessians(model, loader, hp, rt, batches)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return state, hessians, seconds, cpu


class TensorMemo:
    """Each tensor's quantisation computed once per distinct recipe and reused by the variants that
    quantise it alike (LQER, gates and AWQ-lite change a few tensors, not all): with `install`, it
    stands in for train_gpt.quantize_tensor. `spent` sums each returned tensor's own measured CPU
    seconds (the first computation's), so a variant's GPTQ time counts every tensor it stores, as an
    export computing them all would, at a fraction of the bench's time."""

    def __init__(self):
        self.done: dict[tuple, tuple[tg.QuantTensor, float]] = {}
        self.spent = self.fresh = 0.0  # seconds of the tensors returned / computed since reset
        self.real = tg.quantize_tensor

    def recipe(self, name, bits, hessians, hp, max_clip, salient) -> tuple:
        gptq = tg.gptq_applies(name, hessians, hp)
        fine = (hp.awq_lite_bits, hp.awq_lite_group_size) if salient else ()
        knobs = (hp.gptq_clip_fracs, hp.gptq_damp, hp.gptq_block_size, hp.gptq_act_order) if gptq else ()
        return name, bits, bool(max_clip), tuple(salient), gptq, tg.clip_sigmas(name, hp), fine, knobs

    def __call__(self, name, w, bits, hessians, hp, max_clip=False, salient=()):
        key = self.recipe(name, bits, hessians, hp, max_clip, salient)
        if key not in self.done:
            t0 = time.thread_time()
            qt = self.real(name, w, bits, hessians, hp, max_clip, salient)
            self.done[key] = qt, time.thread_time() - t0
            self.fresh += self.done[key][1]
        qt, seconds = self.done[key]
        self.spent += seconds
        return qt

    @contextlib.contextmanager
    def install(self):
        tg.quantize_tensor = self
        try:
            yield
        finally:
            tg.quantize_tensor = self.real


class CompressMemo:
    """train_gpt.compress with each job's CPU seconds recorded (`jobs`), and, with `reuse`, each
    distinct (data, method) compressed once: format 2's streams that a variant leaves unchanged (most
    of them) are not compressed again; a reused job counts the seconds it first took."""

    def __init__(self, reuse: bool):
        self.done: dict[tuple[bytes, str], tuple[bytes, float]] = {}
        self.reuse, self.jobs, self.real, self.reused = reuse, [], tg.compress, 0

    def __call__(self, data: bytes, method: str) -> bytes:
        key = (hashlib.blake2b(data, digest_size=16).digest(), method)
        if key not in self.done or not self.reuse:
            t0 = time.thread_time()  # this thread's CPU: what the job costs, whatever else runs
            blob = self.real(data, method)
            self.done[key] = blob, time.thread_time() - t0
        else:
            self.reused += 1
        self.jobs.append(self.done[key][1])
        return self.done[key][0]

    @contextlib.contextmanager
    def install(self):
        self.jobs, self.reused = [], 0
        tg.compress = self
        try:
            yield
        finally:
            tg.compress = self.real


def errors(qz: tg.Quantizer, qstate: dict) -> dict[str, float]:
    out = {}
    for name, t in qstate.items():
        if isinstance(t, tg.QuantTensor) and name in qz.hessians:
            W = qz.state[name].float()
            out[name] = float(tg.output_error(W - t.dequantize(), qz.hessians[name]).sum())
    return out


def weight_error(qz: tg.Quantizer, qstate: dict) -> float:
    """sqrt(sum |W - Q(W)|^2 / sum |W|^2) over the quantised plan tensors (gates left out)."""
    diff = total = 0.0
    for name in qz.plan:
        W = qz.state[name].float()
        diff += float((W - qstate[name].dequantize()).square().sum())
        total += float(W.square().sum())
    return (diff / total) ** 0.5


def touched_errors(qz: tg.Quantizer, qstate: dict, err: dict, base_err: dict) -> dict:
    """LQER: its tensors' error with / without their correction; AWQ-lite: its matrices' error with /
    without the salient group (the baseline's); gates: the largest weight error."""
    out = {}
    ints = {n: t for n, t in qstate.items() if isinstance(t, tg.QuantTensor)}
    lqer = [n for n, t in ints.items() if t.lqer is not None]
    if lqer:
        plain = {n: tg.QuantTensor(ints[n].q, ints[n].scale, ints[n].bits, ints[n].salient) for n in lqer}
        out["lqer_tensors"] = ",".join(lqer)
        out["lqer_err_ratio"] = round(sum(err[n] for n in lqer) / sum(errors(qz, plain).values()), 4)
    awq = [n for n, t in ints.items() if t.salient is not None]
    if awq:
        out["awq_tensors"] = ",".join(awq)
        out["awq_err_ratio"] = round(sum(err[n] for n in awq) / sum(base_err[n] for n in awq), 4)
    gates = [n for n in ints if n.endswith(tg.GATE_SUFFIXES)]
    if gates:
        out["gate_max_abs_err"] = max(float((qz.state[n] - ints[n].dequantize()).abs().max()) for n in gates)
    return out


def compressed(payload: bytes, hp: tg.Hyperparameters, streams: bool, threads: int, memo: CompressMemo):
    """The payload compressed as the export does (compress_best); the body, the wall seconds, and the
    CPU seconds of every compression job (their sum: one core; their max: a core per job)."""
    t0 = time.perf_counter()
    with memo.install():
        _, body, _ = tg.compress_best(payload, tg.available_compressors(hp.compressor), streams, threads)
    return body, time.perf_counter() - t0, list(memo.jobs)


def measure(name: str, hp: tg.Hyperparameters, state, hessians, base: dict | None, code: int, memos) -> dict:
    """One variant's row. CPU seconds of GPTQ: Quantizer + qstate (AWQ-lite's choice, LQER) less the
    tensors it computed, plus each stored tensor's own measured seconds; of compression: the sum of
    its jobs' (reused or not) and the longest."""
    tensors, streams = memos
    model = shape_model(hp)
    model.load_state_dict(state)
    tensors.spent = tensors.fresh = 0.0
    t0 = time.thread_time()
    with tensors.install():
        qz = tg.Quantizer(model, hessians, hp)
        qstate = qz.qstate()
    gptq_s = time.thread_time() - t0 - tensors.fresh + tensors.spent
    payload = qz.payload(qstate)
    body, wall, jobs = compressed(payload, hp, hp.compress_streams, hp.compress_threads, streams)
    err = errors(qz, qstate)
    row = dict(variant=name, bytes_model=tg.artifact_size(body), bytes_total=tg.artifact_size(body) + code)
    row.update(gptq_cpu_s=round(gptq_s, 1), gptq_new_cpu_s=round(tensors.fresh, 1))
    row.update(compress_cpu_s=round(sum(jobs), 1), compress_job_max_s=round(max(jobs), 1))
    row.update(compress_wall_s=round(wall, 1), compress_jobs=len(jobs), compress_jobs_reused=streams.reused)
    row.update(rel_weight_err=round(weight_error(qz, qstate), 5))
    if base is not None:
        row["bytes_vs_baseline"] = row["bytes_model"] - base["bytes_model"]
        row["rel_err"] = round(sum(err.values()) / sum(base["err"].values()), 4)
        row.update(touched_errors(qz, qstate, err, base["err"]))
    return dict(row, err=err, payload=payload)


def containers(name: str, hp: tg.Hyperparameters, measured: dict) -> None:
    """The variant's payload in each other CONTAINERS setting, compressed for real (no reuse): bytes,
    wall seconds on this machine, CPU seconds of the jobs."""
    for streams, threads in CONTAINERS:
        row = dict(variant=name, compress_streams=int(streams), compress_threads=threads)
        if (streams, threads) == (hp.compress_streams, hp.compress_threads):
            continue  # the variant's own row
        body, wall, jobs = compressed(measured["payload"], hp, streams, threads, CompressMemo(reuse=False))
        row.update(bytes_model=tg.artifact_size(body), compress_wall_s=round(wall, 1))
        print(
            tg.kv(**row, compress_cpu_s=round(sum(jobs), 1), compress_job_max_s=round(max(jobs), 1)),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="", help="the shape of PRESETS[NAME] (its quant knobs left out)")
    parser.add_argument("--calib-tokens", type=int, help="trained-like weights, Hessians over N tokens")
    parser.add_argument("--variants", help="comma list of VARIANTS to run (default: all)")
    parser.add_argument("--containers", action="store_true", help="baseline and stack in every container")
    args = parser.parse_args()
    hp = variant_hp({}, args.preset)
    code = tg.code_bytes(Path(tg.__file__), hp.code_bytes_mode)[1]
    if args.calib_tokens:
        state, hessians, calib_s, calib_cpu_s = calibrated_stand_in(hp, args.calib_tokens)
        stand = f"trained_like_calibrated_{args.calib_tokens}"
    else:
        (state, hessians), calib_s, calib_cpu_s, stand = stand_in(hp), 0.0, 0.0, "synthetic"
    params = sum(t.numel() for t in state.values())
    head = dict(preset=args.preset or "none", stand_in=stand, params=params, calib_s=round(calib_s, 1))
    print(tg.kv(**head, calib_cpu_s=round(calib_cpu_s, 1)))
    print(tg.kv(bytes_code=code, code_bytes_mode=hp.code_bytes_mode, compressor=hp.compressor), flush=True)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    base, memos, kept = None, (TensorMemo(), CompressMemo(reuse=True)), {}
    for name in dict.fromkeys(["baseline", *names]):  # the baseline first: the others are relative to it
        vhp = variant_hp(VARIANTS[name], args.preset)
        row = measure(name, vhp, state, hessians, base, code, memos)
        base = base or row
        export = round(calib_cpu_s + row["gptq_cpu_s"] + row["compress_cpu_s"], 1)
        shown = {k: v for k, v in row.items() if k not in ("err", "payload")}
        print(tg.kv(**shown, export_cpu_s=export), flush=True)
        if args.containers and name in ("baseline", "r0427_stack"):
            kept[name] = vhp, row
    for name, (vhp, row) in reversed(kept.items()):  # after every variant (the stack first): slow
        containers(name, vhp, row)


if __name__ == "__main__":
    main()
