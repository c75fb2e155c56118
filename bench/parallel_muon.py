"""Muon step time with Newton-Schulz split across ranks (Parallel Muon), on the model's matrices.

Run from the repo root (model knobs are train_gpt.py's env vars):
    python3 bench/parallel_muon.py --steps 5                                    (world size 1)
    torchrun --standalone --nproc_per_node=2 bench/parallel_muon.py --steps 5  (gloo on CPU, NCCL on GPU)
Prints world_size, matrices, banks and muon_step_ms (mean over timed steps, slowest rank).
Gradients are random: only the time means anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    hp = tg.Hyperparameters()
    rt = tg.init_runtime(hp)
    torch.manual_seed(hp.seed)
    matrices = tg.split_params(tg.GPT(hp).to(rt.device))["matrix"]
    muon = tg.Muon(matrices, 0.02, 0.95, hp.muon_ns_steps, 0.0, True, rank=rt.rank, world_size=rt.world_size)
    gen = torch.Generator().manual_seed(0)
    for p in matrices:
        p.grad = torch.randn(p.shape, generator=gen).to(rt.device)
    for _ in range(args.warmup):
        muon.step()
    tg.sync(rt)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        muon.step()
    tg.sync(rt)
    ms = tg.max_over_ranks(1000 * (time.perf_counter() - t0) / args.steps, rt)
    banks = len({tuple(p.shape) for p in matrices})
    if rt.is_main:
        print(tg.kv(device=rt.device.type, world_size=rt.world_size, matrices=len(matrices), banks=banks))
        print(tg.kv(ns_steps=hp.muon_ns_steps, timed_steps=args.steps, muon_step_ms=round(ms, 2)))
    if rt.distributed:
        dist.destroy_process_group()
        tg.exit_without_finalization(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
