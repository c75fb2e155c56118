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
counted code (CODE_BYTES_MODE), the seconds of GPTQ (incl. AWQ-lite's choice and LQER) and of
compression, the Hessian-weighted output error of every quantised matrix relative to the baseline's
(`rel_err`), the relative weight error sqrt(sum |W - Q|^2 / sum |W|^2) of the quantised tensors
(`rel_weight_err`), and for LQER / AWQ-lite the error of the matrices they touch, before and after.
`--containers`: the baseline's and the stack's payloads again as one stream (COMPRESS_STREAMS=0)
and as streams with COMPRESS_THREADS 1 and 2.
"""

from __future__ import annotations

import argparse
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


def calibrated_stand_in(hp: tg.Hyperparameters, tokens: int) -> tuple[dict, tg.Hessians, float]:
    """The reserve probe's trained-like weights, non-zero gates, and Hessians over `tokens` training
    tokens (MICROBATCH_TOKENS per forward); returns the state, the Hessians and their seconds."""
    model = shape_model(hp)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), 1, "bench")
    loader = tg.DistributedTokenLoader(tg.find_shards(hp.data_path, "train"), rt)
    batches = max(1, tokens // hp.microbatch_tokens)
    gen = torch.Generator().manual_seed(hp.seed)
    with tg.trained_like_weights(model, hp), torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(tg.GATE_SUFFIXES):  # zero at init (R0427): nothing to quantise
                p.normal_(0, 0.05, generator=gen)
        t0 = time.perf_counter()
        hessians = tg.collect_hessians(model, loader, hp, rt, batches)
        seconds = time.perf_counter() - t0
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return state, hessians, seconds


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


def compressed(payload: bytes, hp: tg.Hyperparameters, streams: bool, threads: int) -> tuple[bytes, float]:
    """The payload compressed as the export does (compress_best), and the wall seconds it took."""
    t0 = time.perf_counter()
    _, body, _ = tg.compress_best(payload, tg.available_compressors(hp.compressor), streams, threads)
    return body, time.perf_counter() - t0


def measure(name: str, hp: tg.Hyperparameters, state, hessians, base: dict | None, code: int) -> dict:
    model = shape_model(hp)
    model.load_state_dict(state)
    t0 = time.perf_counter()
    qz = tg.Quantizer(model, hessians, hp)
    qstate = qz.qstate()
    gptq_s = time.perf_counter() - t0
    payload = qz.payload(qstate)
    body, compress_s = compressed(payload, hp, hp.compress_streams, hp.compress_threads)
    err = errors(qz, qstate)
    row = dict(variant=name, bytes_model=tg.artifact_size(body), bytes_total=tg.artifact_size(body) + code)
    row.update(gptq_s=round(gptq_s, 1), compress_s=round(compress_s, 1))
    row.update(rel_weight_err=round(weight_error(qz, qstate), 5))
    if base is not None:
        row["bytes_vs_baseline"] = row["bytes_model"] - base["bytes_model"]
        row["rel_err"] = round(sum(err.values()) / sum(base["err"].values()), 4)
        row.update(touched_errors(qz, qstate, err, base["err"]))
    return dict(row, err=err, payload=payload)


def containers(name: str, hp: tg.Hyperparameters, payload: bytes) -> None:
    """The same payload in each CONTAINERS setting: bytes and wall seconds."""
    for streams, threads in CONTAINERS:
        body, seconds = compressed(payload, hp, streams, threads)
        row = dict(variant=name, compress_streams=int(streams), compress_threads=threads)
        print(tg.kv(**row, bytes_model=tg.artifact_size(body), compress_s=round(seconds, 1)), flush=True)


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
        state, hessians, calib_s = calibrated_stand_in(hp, args.calib_tokens)
        stand = f"trained_like_calibrated_{args.calib_tokens}"
    else:
        (state, hessians), calib_s, stand = stand_in(hp), 0.0, "synthetic"
    params = sum(t.numel() for t in state.values())
    print(tg.kv(preset=args.preset or "none", stand_in=stand, params=params, calib_s=round(calib_s, 1)))
    print(tg.kv(bytes_code=code, code_bytes_mode=hp.code_bytes_mode, compressor=hp.compressor), flush=True)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    base = None
    for name in dict.fromkeys(["baseline", *names]):  # the baseline first: the others are relative to it
        vhp = variant_hp(VARIANTS[name], args.preset)
        row = measure(name, vhp, state, hessians, base, code)
        base = base or row
        export_s = round(calib_s + row["gptq_s"] + row["compress_s"], 1)
        shown = {k: v for k, v in row.items() if k not in ("err", "payload")}
        print(tg.kv(**shown, export_s=export_s), flush=True)
        if args.containers and name in ("baseline", "r0427_stack"):
            containers(name, vhp, row["payload"])


if __name__ == "__main__":
    main()
