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
(62,021,632 sp1024 tokens) on `--project-gpus` GPUs, assuming time scales linearly with tokens and
inversely with GPUs (the mixer, which every rank runs whole, with tokens only): a planning figure,
not a measurement.
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
        t0 = time.perf_counter()
        result = tg.run_logged(model, stream, known[name], hp, rt, clock, log, result)
        seconds = time.perf_counter() - t0
        # every rank mixes the whole stream, so the mixer does not get faster with more GPUs
        gpu_factor = 1.0 if known[name].ngram or known[name].tilt else rt.world_size / args.project_gpus
        line = tg.kv(
            bench_pass=name,
            device=tg.gpu_names() if rt.device.type == "cuda" else "cpu",
            world_size=rt.world_size,
            tokens=result["tokens"],
            seconds=round(seconds, 2),
            scored_tokens_per_s=int(result["tokens"] / seconds),
            window_tokens_per_s=int(result["window_tokens_per_s"]),
            projected_s=round(seconds * args.project_tokens / args.tokens * gpu_factor, 1),
            projected_for=f"{args.project_tokens}_tokens_on_{args.project_gpus}_gpus",
        )
        log(line)
    if rt.distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
