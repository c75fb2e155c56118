"""Times train_gpt.py's evaluation passes on random tokens (never validation data).

    python3 bench/eval_speed.py --tokens 3000000 --passes flat,sliding          # 1 GPU or CPU
    torchrun --standalone --nproc_per_node=8 bench/eval_speed.py --passes sliding,chunked,ngram_mix

The model (random weights) and every evaluation knob come from the same env vars as train_gpt.py
(EVAL_STRIDE, EVAL_SEQ_LEN, EVAL_BATCH_SEQS, TTT_*, COMPILE, ...). Random tokens carry BOS every
`--doc-tokens` tokens so LoRA TTT sees documents; `ngram_mix` mixes the pass listed before it.
Pass names are train_gpt.py's (`chunked`, `lora`, `phased` = TTT_MODE=..., `doc` = EVAL_MODE=doc,
`ngram_tilt` = NGRAM_TILT=1, `ngram_mix` = NGRAM_MIX=1); the older names `ttt` and `ngram` are still
accepted. `phased` takes its phases from PHASED_TTT_* and GLOBAL_TTT_*; with `ngram_tilt` the hints
are computed first (their own `ngram_tilt_hints` line) and every pass records log p(hint).
Prints one `key:value` line per pass. Each line also projects the pass to the official val set
(`--project-tokens`, default 62,021,632 sp1024 tokens; the SP8192 CaseOps records log val_tokens
47,851,520; both 50,000 documents, `--project-docs`) on `--project-gpus` GPUs: a planning figure, not
a measurement. The projection scales the measured seconds by the pass's work on that set over its
work here (`work_scale`), by train_gpt.py's own cost model (`projected_s`, which the eval budget
uses): windows forwarded (flat, sliding, doc), document chunks forwarded and trained (lora, and
phased's per-document part), positions (n-gram passes). phased's global phases are timed apart
(`phase_s` over `phase_tokens` trained) and projected to the tokens of the first
PHASED_TTT_PREFIX_DOCS documents, which do not grow with the val set (`projected_phase_s`). Every
document has the same length here and in the projection (`--doc-tokens`; there, tokens/documents):
real lengths vary, and phased scores the longest first, so its phases train on more tokens than this
assumes. Time is assumed linear in that work and inverse in GPUs, except the n-gram hints, tilt and
mixer, which every rank runs whole; a pass's setup before its own clock starts (`setup_s`: the
trunk's compile warmup, copies) is added once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def passes(hp: tg.Hyperparameters) -> dict[str, tg.Pass]:
    seq, stride, flat = hp.eval_window, hp.eval_stride, hp.train_seq_len
    return {
        "flat": tg.Pass("flat", flat, flat),
        "sliding": tg.Pass("sliding", seq, stride),
        "chunked": tg.Pass("chunked", seq, stride, ttt=True),
        "lora": tg.Pass("lora", seq, stride, lora=True),
        "phased": tg.Pass("phased", seq, stride, lora=True),
        "doc": tg.Pass("doc", seq, stride, doc=True),
        "ngram_tilt": tg.Pass("ngram_tilt", 0, 0, tilt=True),
        "ngram_mix": tg.Pass("ngram_mix", 0, 0, ngram=True),
    }


OLD_NAMES = {"ttt": "chunked", "ngram": "ngram_mix"}  # as logged before the passes were renamed


def projection_stream(n_tokens: int, doc_tokens: int) -> tg.EvalStream:
    """The set projected to, as the cost model reads it: a BOS every doc_tokens (the other ids are a
    constant filler, uint16, and the byte weights a zero-copy view: no memory for 62M positions)."""
    tokens = np.full(n_tokens + 1, 2, dtype=np.uint16)
    tokens[::doc_tokens] = tg.BOS_ID
    return tg.EvalStream(torch.from_numpy(tokens), torch.ones(1).expand(n_tokens))


def work_scale(p: tg.Pass, here: tg.EvalStream, there: tg.EvalStream, hp: tg.Hyperparameters) -> float:
    """The pass's work on the projected set over its work here, by train_gpt's cost model."""
    return tg.projected_s(p, there, 1.0, hp) / tg.projected_s(p, here, 1.0, hp)


class PhaseLog:
    """The log, also adding up the global phases' `ttt_phase:` lines (tokens trained, seconds)."""

    def __init__(self, log):
        self.log, self.seconds, self.tokens = log, 0.0, 0

    def __call__(self, line: str) -> None:
        if line.startswith("ttt_phase:"):
            fields = dict(item.split(":", 1) for item in line.split())
            self.seconds += float(fields["seconds"])
            self.tokens += int(fields["tokens"])
        self.log(line)


def phase_seconds_there(phases: PhaseLog, there: tg.EvalStream, hp: tg.Hyperparameters) -> float | None:
    """TTT_MODE=phased's global phases on the projected set, on one GPU, at the rate measured here
    (seconds per token trained); they train on PHASED_TTT_PREFIX_DOCS documents whatever the val
    set's size. None when no phase trained a token here (each phase's last GLOBAL_TTT_CHUNK_TOKENS
    chunk is never trained on, so a short benchmark stream can leave nothing to time)."""
    if not phases.tokens:
        return None
    spans = tg.document_spans(there.tokens.numpy(), there.n)
    return phases.seconds / phases.tokens * tg.phased_tokens(spans, hp)


def projected_seconds(
    p: tg.Pass, seconds: float, once_s: float, scale: float, world_size: int, project_gpus: int
) -> float:
    """Seconds on project_gpus GPUs: the pass's own seconds scaled by its work, each rank doing
    1/world_size of it (the n-gram tilt and mixer: every rank runs the whole stream), plus once_s
    (the setup before its clock starts, e.g. the trunk's compile warmup; phased: its global phases,
    already projected), not scaled."""
    gpu_factor = 1.0 if p.ngram or p.tilt else world_size / project_gpus
    return once_s + seconds * scale * gpu_factor  # unrounded: a tiny pass must not project to 0


def pass_line(name, seconds, result, phases: PhaseLog, here, there, hp, rt, args) -> str:
    """One pass's figures and its projection. phased: its scoring and adapting scale as lora's,
    its global phases by phase_seconds_there."""
    known = passes(hp)
    setup_s = max(seconds - result["seconds"], 0.0)  # before the pass's own clock: not scaled
    own_s, once_s, extra = result["seconds"], setup_s, {}
    if name == "phased":
        own_s -= phases.seconds
        there_s = phase_seconds_there(phases, there, hp)
        phase_s = None if there_s is None else there_s * rt.world_size / args.project_gpus
        once_s += phase_s or 0.0
        extra = dict(phase_s=round(phases.seconds, 2), phase_tokens=phases.tokens)
        extra["projected_phase_s"] = "n/a" if phase_s is None else phase_s
        if phase_s is None:
            print(
                "eval_speed: the global phases trained no token here, so projected_s leaves them out "
                "(lower GLOBAL_TTT_CHUNK_TOKENS or raise --tokens)",
                file=sys.stderr,
            )
    scale = work_scale(known["lora" if name == "phased" else name], here, there, hp)
    return tg.kv(
        bench_pass=name,
        device=tg.gpu_names() if rt.device.type == "cuda" else "cpu",
        world_size=rt.world_size,
        tokens=result["tokens"],
        seconds=round(seconds, 2),
        scored_tokens_per_s=int(result["tokens"] / seconds),
        window_tokens_per_s=int(result["window_tokens_per_s"]),
        setup_s=round(setup_s, 2),
        work_scale=round(scale, 2),
        **extra,
        projected_s=projected_seconds(known[name], own_s, once_s, scale, rt.world_size, args.project_gpus),
        projected_for=f"{args.project_tokens}_tokens_{args.project_docs}_docs_on_{args.project_gpus}_gpus",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=3_000_000, help="scored positions (default 3,000,000)")
    ap.add_argument(
        "--passes",
        default="flat,sliding",
        help="comma list: flat,sliding,doc,chunked,lora,phased,ngram_tilt,ngram_mix",
    )
    ap.add_argument("--doc-tokens", type=int, default=1200, help="a BOS every this many tokens")
    ap.add_argument("--project-tokens", type=int, default=62_021_632, help="val tokens to project to")
    ap.add_argument("--project-docs", type=int, default=50_000, help="val documents to project to")
    ap.add_argument("--project-gpus", type=int, default=8, help="GPUs to project to")
    args = ap.parse_args()
    hp = tg.Hyperparameters()
    rt = tg.init_runtime(hp)
    known = passes(hp)
    wanted = [OLD_NAMES.get(name, name) for name in args.passes.split(",")]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        ap.error(f"unknown pass(es) {unknown}; choose from {sorted(known)}")
    if wanted[0] in ("ngram_mix", "ngram_tilt"):
        ap.error(
            f"{wanted[0]} works on the pass before it: list a network pass first (e.g. sliding,{wanted[0]})"
        )
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp).to(rt.device)
    tokens = np.random.default_rng(hp.seed).integers(2, hp.vocab_size, args.tokens + 1)
    tokens[:: args.doc_tokens] = tg.BOS_ID
    t = torch.from_numpy(tokens).to(rt.device)
    stream = tg.EvalStream(t, torch.ones(args.tokens, device=rt.device))
    target = projection_stream(args.project_tokens, max(args.project_tokens // args.project_docs, 1))
    clock = tg.EvalClock(float("inf"), rt)
    log = print if rt.is_main else tg.Logger(None)  # rank 0 prints (no log file)
    if "ngram_tilt" in wanted:
        tg.sync(rt)
        t0 = time.perf_counter()
        tg.attach_tilt_hints(stream, hp)
        tg.sync(rt)
        seconds = time.perf_counter() - t0  # every rank computes every hint: no GPU factor
        projected = round(seconds * args.project_tokens / args.tokens, 1)
        log(tg.kv(bench_pass="ngram_tilt_hints", seconds=round(seconds, 2), projected_s=projected))
    result = None
    for name in wanted:
        tg.sync(rt)
        phases = PhaseLog(log)
        t0 = time.perf_counter()
        result = tg.run_logged(model, stream, known[name], hp, rt, clock, phases, result)
        seconds = time.perf_counter() - t0
        log(pass_line(name, seconds, result, phases, stream, target, hp, rt, args))
    if rt.distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
