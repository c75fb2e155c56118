"""Bytes and quantisation error of the frontier records' quantisation knobs, one at a time.

    NUM_LAYERS=3 COMPRESSOR=zstd python3 bench/frontier_quant.py   # env knobs set the model

The stand-in: the default model (env knobs apply) with heavy-tailed (Student-t, nu=3) matrices that
keep each one's std, a few outlier input columns per matrix (as trained matrices have), non-zero
gates, and a synthetic Hessian per matrix and for the tied embedding (activations with log-normal
channel scales). Each variant is the baseline (GPTQ with the clip search, int8 round-to-nearest
embedding) plus the knobs it names, as R0427 / PR #1908 run them. Per variant: the compressed model
bytes, the Hessian-weighted output error of every quantised matrix relative to the baseline's
(`rel_err`), and for LQER / AWQ-lite the error of the matrices they touch, before and after.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

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


def stand_in(hp: tg.Hyperparameters) -> tuple[dict[str, torch.Tensor], tg.Hessians]:
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
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


def errors(qz: tg.Quantizer, qstate: dict) -> dict[str, float]:
    out = {}
    for name, t in qstate.items():
        if isinstance(t, tg.QuantTensor) and name in qz.hessians:
            W = qz.state[name].float()
            out[name] = float(tg.output_error(W - t.dequantize(), qz.hessians[name]).sum())
    return out


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


def measure(name: str, knobs: dict[str, str], state, hessians, base: dict | None) -> dict:
    hp = tg.Hyperparameters({**os.environ, **knobs})
    model = tg.GPT(hp)
    model.load_state_dict(state)
    t0 = time.perf_counter()
    qz = tg.Quantizer(model, hessians, hp)
    qstate = qz.qstate()
    seconds = time.perf_counter() - t0
    body = tg.compress(qz.payload(qstate), hp.compressor if hp.compressor != "auto" else "zstd")
    err = errors(qz, qstate)
    row = dict(variant=name, bytes_model=tg.artifact_size(body), quant_s=round(seconds, 1))
    if base is not None:
        row["bytes_vs_baseline"] = row["bytes_model"] - base["bytes_model"]
        row["rel_err"] = round(sum(err.values()) / sum(base["err"].values()), 4)
        row.update(touched_errors(qz, qstate, err, base["err"]))
    return dict(row, err=err)


def main() -> None:
    state, hessians = stand_in(tg.Hyperparameters())
    base = None
    for name, knobs in VARIANTS.items():
        row = measure(name, knobs, state, hessians, base)
        base = base or row
        print(tg.kv(**{k: v for k, v in row.items() if k != "err"}), flush=True)


if __name__ == "__main__":
    main()
